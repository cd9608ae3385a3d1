// One dataset: upload (drag and drop), thumbnails with captions to edit, delete, captions written by a
// model (the Caption action), and the inspection report.
import { useCallback, useState } from "react";
import { api, captions, upload } from "../lib/api";
import { useAction, usePoll } from "../lib/hooks";
import { bytes } from "../lib/format";
import { Link, navigate } from "../lib/router";
import type { DatasetDetail, InspectReport, PresetInfo } from "../lib/types";
import { Card, ConfirmButton, Empty, ErrorBox, Loading, ProgressBar } from "../components/common";
import { CaptionEditor } from "../components/CaptionEditor";
import { CaptionProgress, CaptionSettingsForm, defaultCaptionSettings, useCaptionTask } from "../components/CaptionAction";
import { DropZone } from "../components/DropZone";

function Inspect({ name }: { name: string }) {
  const [arch, setArch] = useState("sd1");
  const [resolution, setResolution] = useState("512");
  const [frames, setFrames] = useState("1");
  const [report, setReport] = useState<InspectReport | null>(null);
  const action = useAction();
  const { data: presets } = usePoll(() => api.get<{ presets: PresetInfo[] }>("/api/presets"), null, []);
  const archs = [...new Set((presets?.presets ?? []).map((p) => p.arch))];
  const run = () => void action.run(() => api.get<InspectReport>(
    `/api/datasets/${encodeURIComponent(name)}/inspect?arch=${encodeURIComponent(arch)}&resolution=${Number(resolution) || 512}&num_frames=${Number(frames) || 1}`,
  )).then((r) => r && setReport(r));
  return (
    <Card title="Inspection report">
      <div className="row">
        <label className="inline">model
          <select value={arch} onChange={(e) => setArch(e.target.value)}>
            {(archs.length ? archs : ["sd1"]).map((a) => <option key={a}>{a}</option>)}
          </select>
        </label>
        <label className="inline">resolution <input className="narrow" value={resolution} onChange={(e) => setResolution(e.target.value)} /></label>
        <label className="inline">frames <input className="narrow" value={frames} onChange={(e) => setFrames(e.target.value)} /></label>
        <button type="button" className="btn" disabled={action.busy} data-testid="inspect-dataset" onClick={run}>Inspect</button>
      </div>
      {action.error ? <ErrorBox message={action.error} /> : null}
      {report ? <pre className={`code ${report.ok ? "" : "code-bad"}`} data-testid="inspect-report">{report.lines.join("\n")}</pre> : null}
    </Card>
  );
}

/** Caption the dataset with a vision-language model on the server; the captions land in the editors below. */
function Captioning({ name, onCaptioned }: { name: string; onCaptioned: () => void }) {
  const [settings, setSettings] = useState(defaultCaptionSettings);
  const [open, setOpen] = useState(false);
  const [round, setRound] = useState(0);
  const start = useAction();
  const stop = useAction();
  // eslint-disable-next-line react-hooks/exhaustive-deps
  const load = useCallback(() => captions.ofDataset(name).then((r) => r.task), [name, round]);
  const { task, error } = useCaptionTask(load, onCaptioned);
  const running = task !== null && !["completed", "failed", "stopped"].includes(task.state);
  const run = () => void start.run(() => captions.startDataset(name, settings)).then((r) => {
    if (r) {
      setOpen(false);
      setRound((n) => n + 1);
    }
  });
  return (
    <Card title="Captions by a model" actions={
      <button type="button" className="btn btn-primary" disabled={running || start.busy} data-testid="caption-dataset"
        onClick={() => (open ? run() : setOpen(true))}>
        {open ? "Start captioning" : "Caption"}
      </button>
    }>
      <p className="muted small">Writes a caption for every image and video that has none, with Florence-2 (short) or
        Qwen2.5-VL (detailed), in the background; a stopped run goes on where it was when started again.</p>
      {open && !running ? (
        <>
          <CaptionSettingsForm value={settings} onChange={setSettings} overwriteLabel="replace existing captions too" />
          <div className="actions">
            <button type="button" className="btn btn-quiet" onClick={() => setOpen(false)}>Cancel</button>
          </div>
        </>
      ) : null}
      {start.error ? <ErrorBox message={start.error} /> : null}
      {stop.error || error ? <ErrorBox message={stop.error ?? error} /> : null}
      {task ? <CaptionProgress task={task} stopping={stop.busy}
        onStop={() => void stop.run(() => captions.stopDataset(name))} /> : null}
    </Card>
  );
}

export function DatasetPage({ name }: { name: string }) {
  const { data, error, reload } = usePoll(() => api.get<DatasetDetail>(`/api/datasets/${encodeURIComponent(name)}`), null, [name]);
  const [progress, setProgress] = useState<number | null>(null);
  const [uploadError, setUploadError] = useState<string | null>(null);
  const [note, setNote] = useState<string | null>(null);
  const remove = useAction();

  const onFiles = async (files: File[]) => {
    const form = new FormData();
    for (const f of files) form.append("files", f, f.name);
    setUploadError(null);
    setNote(null);
    setProgress(0);
    try {
      const r = await upload<{ saved: { name: string; original: string }[] }>(`/api/datasets/${encodeURIComponent(name)}/upload`, form, setProgress);
      const renamed = r.saved.filter((s) => s.name !== s.original).map((s) => `${s.original} → ${s.name}`);
      setNote(`${r.saved.length} file(s) uploaded.${renamed.length ? ` Renamed: ${renamed.join(", ")}` : ""}`);
      reload();
    } catch (err) {
      setUploadError(err instanceof Error ? err.message : String(err));
    } finally {
      setProgress(null);
    }
  };

  if (!data) return <div className="page">{error ? <ErrorBox message={error} /> : <Loading what="dataset" />}</div>;
  return (
    <div className="page" data-testid="dataset-page">
      <div className="page-head">
        <h1><Link to="/datasets">Datasets</Link> / {data.name}</h1>
        <ConfirmButton label="Delete dataset" question={`Delete ${data.name} and all its files?`} disabled={remove.busy}
          onConfirm={() => void remove.run(() => api.del(`/api/datasets/${encodeURIComponent(name)}`)).then((r) => r && navigate("/datasets"))} />
      </div>
      {remove.error ? <ErrorBox message={remove.error} /> : null}
      <p className="muted small">
        {data.images} images · {data.videos} videos · {data.captions} captions · {bytes(data.bytes)} · <code>{data.path}</code>
      </p>
      <DropZone onFiles={(f) => void onFiles(f)} disabled={progress !== null} />
      {progress !== null ? <ProgressBar value={progress} label={`uploading ${Math.round(progress * 100)} %`} /> : null}
      {uploadError ? <ErrorBox message={uploadError} /> : null}
      {note ? <p className="ok-line" data-testid="upload-note">{note}</p> : null}
      {data.items.length ? <Captioning name={data.name} onCaptioned={reload} /> : null}
      {data.items.length ? (
        <div className="items" data-testid="dataset-items">
          {data.items.map((item) => (
            <CaptionEditor key={`${item.name}:${item.modified}:${item.caption ?? ""}`} dataset={data.name} item={item} onDeleted={reload} />
          ))}
        </div>
      ) : <Empty>This dataset is empty. Drop images or videos above.</Empty>}
      <Inspect name={data.name} />
    </div>
  );
}
