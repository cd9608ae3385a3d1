// Previews by step: one row per step (newest first), one column per prompt; images, videos and
// animated previews; a click opens the file large, with the arrow keys moving between steps.
import { useEffect, useState } from "react";
import { jobFileUrl } from "../lib/api";
import type { SampleFile, SampleStep } from "../lib/types";
import { Empty } from "./common";

function Media({ jobId, file, large }: { jobId: number; file: SampleFile; large?: boolean }) {
  const url = jobFileUrl(jobId, file.path);
  if (file.kind === "video") {
    return <video src={url} controls={large} autoPlay={large} muted loop playsInline preload="metadata" className="sample-media" />;
  }
  return <img src={url} alt={`step ${file.name}`} loading="lazy" className="sample-media" />;
}

/** Video previews come as an mp4 with an animated webp beside it: show the video, one per prompt. */
function perPrompt(files: SampleFile[]): SampleFile[] {
  const byIndex = new Map<number, SampleFile>();
  for (const f of files) {
    const seen = byIndex.get(f.index);
    if (!seen || (seen.kind === "animation" && f.kind === "video")) byIndex.set(f.index, f);
  }
  return [...byIndex.values()].sort((a, b) => a.index - b.index);
}

export function SampleGallery({ jobId, samples, limit, size = 256, prompts = [] }: {
  jobId: number; samples: SampleStep[]; limit?: number; size?: number; prompts?: string[];
}) {
  const [open, setOpen] = useState<{ step: number; index: number } | null>(null);
  const steps = [...samples].reverse().slice(0, limit).map((s) => ({ step: s.step, files: perPrompt(s.files) }));
  const columns = Math.max(1, ...steps.map((s) => s.files.length));

  useEffect(() => {
    if (!open) return;
    const onKey = (event: KeyboardEvent) => {
      const order = samples.map((s) => s.step);
      const at = order.indexOf(open.step);
      if (event.key === "Escape") setOpen(null);
      if (event.key === "ArrowLeft" && at > 0) setOpen({ ...open, step: order[at - 1] as number });
      if (event.key === "ArrowRight" && at < order.length - 1) setOpen({ ...open, step: order[at + 1] as number });
    };
    window.addEventListener("keydown", onKey);
    return () => window.removeEventListener("keydown", onKey);
  }, [open, samples]);

  if (samples.length === 0) return <Empty>No previews yet. They appear at every <code>sample_every</code> steps.</Empty>;
  const found = open ? samples.find((s) => s.step === open.step) : undefined;
  const shown = open && found ? perPrompt(found.files).find((f) => f.index === open.index) : undefined;

  return (
    <div className="gallery" data-testid="samples">
      {prompts.length ? (
        <div className="gallery-row gallery-head">
          <div className="gallery-step" />
          <div className="gallery-files" style={{ gridTemplateColumns: `repeat(${columns}, minmax(0, ${size}px))` }}>
            {Array.from({ length: columns }, (_, i) => <div key={i} className="small muted" title={prompts[i]}>{prompts[i] ?? ""}</div>)}
          </div>
        </div>
      ) : null}
      {steps.map((s) => (
        <div key={s.step} className="gallery-row">
          <div className="gallery-step">step {s.step}</div>
          <div className="gallery-files" style={{ gridTemplateColumns: `repeat(${columns}, minmax(0, ${size}px))` }}>
            {s.files.map((f) => (
              <button key={f.name} type="button" className="gallery-item" onClick={() => setOpen({ step: s.step, index: f.index })}
                title={`${f.name} (prompt ${f.index + 1})`}>
                <Media jobId={jobId} file={f} />
              </button>
            ))}
          </div>
        </div>
      ))}
      {open && shown ? (
        <div className="lightbox" role="dialog" onClick={() => setOpen(null)}>
          <div className="lightbox-body" onClick={(e) => e.stopPropagation()}>
            <Media jobId={jobId} file={shown} large />
            <div className="lightbox-caption">
              step {open.step} · prompt {open.index + 1}{prompts[open.index] ? `: ${prompts[open.index]}` : ""} · <a href={jobFileUrl(jobId, shown.path, true)}>download</a>
              <span className="muted"> (← → other steps, Esc closes)</span>
            </div>
          </div>
        </div>
      ) : null}
    </div>
  );
}
