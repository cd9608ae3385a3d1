// The Caption action of the dataset page and Quick train (docs/captions.md): which model and how,
// and a caption task's progress (done / total, polled), its outcome and the files it skipped.
import { useEffect, useState } from "react";
import { CAPTION_FINAL, captions, type CaptionModel, type CaptionSettings, type CaptionTask } from "../lib/api";
import { useTaskPoll } from "../lib/hooks";
import { ProgressBar } from "./common";

export const defaultCaptionSettings: CaptionSettings = {
  model: "", detailed: false, prompt: "", overwrite: false, prefix: "", suffix: "", max_length: "",
};

/** Polls a caption task every second until it ends; `onEnd` runs once when it does. */
export function useCaptionTask(load: (() => Promise<CaptionTask | null>) | null, onEnd: (task: CaptionTask) => void) {
  const { task, setTask, error } = useTaskPoll(load, CAPTION_FINAL, 1000, onEnd);
  return { task, setTask, error };
}

export function CaptionSettingsForm({ value, onChange, overwriteLabel }: {
  value: CaptionSettings;
  onChange: (next: CaptionSettings) => void;
  overwriteLabel?: string; // shown as a checkbox when given
}) {
  const [models, setModels] = useState<CaptionModel[]>([]);
  const [custom, setCustom] = useState(false);
  useEffect(() => {
    captions.models().then((r) => setModels(r.models)).catch(() => setModels([]));
  }, []);
  const set = (patch: Partial<CaptionSettings>) => onChange({ ...value, ...patch });
  const choice = custom ? "custom" : value.detailed ? "detailed" : "short";
  const pick = (next: string) => {
    setCustom(next === "custom");
    if (next === "custom") set({ detailed: false });
    else set({ model: "", detailed: next === "detailed" });
  };
  const label = (detailed: boolean, fallback: string) => models.find((m) => m.detailed === detailed)?.label ?? fallback;
  return (
    <div className="fields" data-testid="caption-settings">
      <div className="field">
        <label htmlFor="caption-model">Caption model</label>
        <select id="caption-model" value={choice} onChange={(e) => pick(e.target.value)} data-testid="caption-model">
          <option value="short">{label(false, "Florence-2 large: short captions")}</option>
          <option value="detailed">{label(true, "Qwen2.5-VL 7B Instruct: detailed captions")}</option>
          <option value="custom">another Florence-2 / Qwen2.5-VL model…</option>
        </select>
        {custom ? (
          <input value={value.model} onChange={(e) => set({ model: e.target.value })} placeholder="hub id or folder on the server"
            aria-label="caption model id" data-testid="caption-model-id" />
        ) : null}
        <div className="help">Runs on the server's GPU when it has one (Qwen2.5-VL 7B needs about 20 GB).</div>
      </div>
      <div className="field">
        <label htmlFor="caption-prefix">Put in front</label>
        <input id="caption-prefix" value={value.prefix} onChange={(e) => set({ prefix: e.target.value })} placeholder="e.g. a trigger word" />
      </div>
      <div className="field">
        <label htmlFor="caption-suffix">Put after</label>
        <input id="caption-suffix" value={value.suffix} onChange={(e) => set({ suffix: e.target.value })} placeholder="optional" />
      </div>
      <div className="field">
        <label htmlFor="caption-max">Longest caption (tokens)</label>
        <input id="caption-max" value={value.max_length} inputMode="numeric" onChange={(e) => set({ max_length: e.target.value })}
          placeholder="the model's default" />
      </div>
      <div className="field field-wide">
        <label htmlFor="caption-prompt">Prompt</label>
        <input id="caption-prompt" value={value.prompt} onChange={(e) => set({ prompt: e.target.value })}
          placeholder="the model's default (Florence-2: <DETAILED_CAPTION>)" />
      </div>
      {overwriteLabel ? (
        <label className="inline"><input type="checkbox" checked={value.overwrite} onChange={(e) => set({ overwrite: e.target.checked })}
          data-testid="caption-overwrite" /> {overwriteLabel}</label>
      ) : null}
    </div>
  );
}

export function CaptionProgress({ task, onStop, stopping }: { task: CaptionTask; onStop?: () => void; stopping?: boolean }) {
  const final = CAPTION_FINAL.includes(task.state);
  const fraction = task.total ? task.done / task.total : 0;
  const doing = task.state === "starting" ? "starting…" : task.state === "loading" ? `loading ${task.model ?? "the model"}…`
    : `captioning ${task.done}/${task.total}`;
  return (
    <div className="caption-task" data-testid="caption-progress" data-state={task.state} data-done={task.done} data-total={task.total}>
      {final ? (
        <p className={task.state === "completed" ? "ok-line" : "inline-error"} data-testid="caption-outcome">
          Captions {task.state}: {task.message || `${task.done}/${task.total}`}
        </p>
      ) : (
        <div className="row">
          <ProgressBar value={fraction} label={doing} />
          {onStop ? <button type="button" className="btn btn-small btn-warn" disabled={stopping} onClick={onStop}>Stop</button> : null}
        </div>
      )}
      {task.failures.length ? (
        <ul className="problems small" data-testid="caption-failures">
          {task.failures.map((f) => <li key={f.file}>{f.file}: {f.reason}</li>)}
        </ul>
      ) : null}
      {task.state === "failed" && task.log?.length ? <pre className="code code-bad">{task.log.join("\n")}</pre> : null}
    </div>
  );
}
