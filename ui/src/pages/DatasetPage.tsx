// One dataset: upload (drag and drop), thumbnails with captions to edit, delete, and the inspection report.
import { useState } from "react";
import { api, upload } from "../lib/api";
import { useAction, usePoll } from "../lib/hooks";
import { bytes } from "../lib/format";
import { Link, navigate } from "../lib/router";
import type { DatasetDetail, InspectReport, PresetInfo } from "../lib/types";
import { Card, ConfirmButton, Empty, ErrorBox, Loading, ProgressBar } from "../components/common";
import { CaptionEditor } from "../components/CaptionEditor";
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
      {data.items.length ? (
        <div className="items" data-testid="dataset-items">
          {data.items.map((item) => (
            <CaptionEditor key={`${item.name}:${item.modified}`} dataset={data.name} item={item} onDeleted={reload} />
          ))}
        </div>
      ) : <Empty>This dataset is empty. Drop images or videos above.</Empty>}
      <Inspect name={data.name} />
    </div>
  );
}
