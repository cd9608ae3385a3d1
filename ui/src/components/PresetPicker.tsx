import type { PresetInfo } from "../lib/types";

export function PresetPicker({ presets, selected, onPick }: { presets: PresetInfo[]; selected: string | null; onPick: (id: string) => void }) {
  return (
    <div className="presets" data-testid="presets">
      {presets.map((p) => (
        <button key={p.id} type="button" data-preset={p.id}
          className={`preset ${selected === p.id ? "preset-on" : ""} ${p.id === "video_training" ? "preset-video" : ""}`}
          onClick={() => onPick(p.id)}>
          <strong>{p.label}</strong>
          <span className="muted small">{p.arch}</span>
          <span className="small">{p.description}</span>
        </button>
      ))}
    </div>
  );
}
