// Quick train: a name, a trigger word, images with their captions and a model -> a queued job.
// Captions can be written by a model on the server first (the Caption action), then edited here.
import { useCallback, useEffect, useMemo, useState, type FormEvent } from "react";
import { api, ApiError, captions, upload, type CaptionTask } from "../lib/api";
import { useAction, usePoll } from "../lib/hooks";
import { navigate } from "../lib/router";
import type { Job, PresetInfo } from "../lib/types";
import { Card, ErrorBox, ProgressBar } from "../components/common";
import { DropZone } from "../components/DropZone";
import { CaptionProgress, CaptionSettingsForm, defaultCaptionSettings, useCaptionTask } from "../components/CaptionAction";

interface Picked {
  file: File;
  url: string;
  caption: string;
}

/** Caption the picked files on the server (those without a caption, or all) and fill in the answers. */
function QuickCaption({ files, disabled, onCaptions }: {
  files: Picked[];
  disabled: boolean;
  onCaptions: (byFile: Map<File, string>) => void; // files removed meanwhile are simply not there
}) {
  const [settings, setSettings] = useState(defaultCaptionSettings);
  const [open, setOpen] = useState(false);
  const [started, setStarted] = useState<{ id: string; sent: File[] } | null>(null);
  const start = useAction();
  const load = useCallback(
    () => (started ? captions.task(started.id).then((r) => r.task) : Promise.resolve(null)), [started]);
  const onEnd = (task: CaptionTask) => {
    if (!started) return;
    const filled = new Map<File, string>();
    (task.captions ?? []).forEach((caption, j) => {
      const file = started.sent[j];
      if (caption && file !== undefined) filled.set(file, caption);
    });
    onCaptions(filled);
    void captions.remove(task.id).catch(() => undefined); // its copy of the files is no longer needed
  };
  const { task, error } = useCaptionTask(started ? load : null, onEnd);
  const running = task !== null && !["completed", "failed", "stopped"].includes(task.state);
  const run = () => {
    const chosen = files.filter((f) => settings.overwrite || !f.caption.trim()).map((f) => f.file);
    if (!chosen.length) return;
    void start.run(() => captions.startFiles(chosen, settings)).then((r) => {
      if (r) {
        setOpen(false);
        setStarted({ id: r.task.id, sent: chosen });
      }
    });
  };
  const missing = files.filter((f) => !f.caption.trim()).length;
  return (
    <div className="section">
      <div className="row">
        <button type="button" className="btn" data-testid="qt-caption" disabled={disabled || running || start.busy || !files.length}
          onClick={() => (open ? run() : setOpen(true))}>
          {open ? "Start captioning" : "Caption with a model"}
        </button>
        <span className="small muted">{missing} of {files.length} without a caption</span>
      </div>
      {open && !running ? (
        <>
          <CaptionSettingsForm value={settings} onChange={setSettings} overwriteLabel="replace the captions typed here too" />
          <button type="button" className="btn btn-quiet" onClick={() => setOpen(false)}>Cancel</button>
        </>
      ) : null}
      {start.error || error ? <ErrorBox message={start.error ?? error} /> : null}
      {task ? <CaptionProgress task={task} /> : null}
    </div>
  );
}

export function QuickTrain() {
  const { data } = usePoll(() => api.get<{ presets: PresetInfo[]; quick_train_refused: Record<string, string> }>("/api/presets"), null, []);
  const [name, setName] = useState("");
  const [trigger, setTrigger] = useState("");
  const [preset, setPreset] = useState("sd15");
  const [files, setFiles] = useState<Picked[]>([]);
  const [advanced, setAdvanced] = useState(false);
  const [modelPath, setModelPath] = useState("");
  const [steps, setSteps] = useState("");
  const [device, setDevice] = useState("");
  const [gpuIds, setGpuIds] = useState("");
  const [start, setStart] = useState(true);
  const [progress, setProgress] = useState<number | null>(null);
  const [error, setError] = useState<ApiError | null>(null);

  const presets = useMemo(() => (data?.presets ?? []).filter((p) => !(p.id in (data?.quick_train_refused ?? {}))), [data]);
  useEffect(() => () => files.forEach((f) => URL.revokeObjectURL(f.url)), [files]);

  const add = (picked: File[]) => setFiles((old) => [...old, ...picked.map((file) => ({ file, url: URL.createObjectURL(file), caption: "" }))]);
  const setCaption = (i: number, caption: string) => setFiles((old) => old.map((f, j) => (j === i ? { ...f, caption } : f)));
  const removeAt = (i: number) => setFiles((old) => old.filter((_, j) => j !== i));

  const submit = async (event: FormEvent) => {
    event.preventDefault();
    setError(null);
    const form = new FormData();
    form.append("name", name.trim());
    form.append("trigger_word", trigger.trim());
    form.append("preset", preset);
    if (modelPath.trim()) form.append("model_path", modelPath.trim());
    if (steps.trim()) form.append("steps", steps.trim());
    if (device.trim()) form.append("device", device.trim());
    if (gpuIds.trim()) form.append("gpu_ids", gpuIds.trim());
    form.append("start", String(start));
    form.append("captions", JSON.stringify(files.map((f) => f.caption)));
    for (const f of files) form.append("files", f.file, f.file.name);
    setProgress(0);
    try {
      const r = await upload<{ job: Job }>("/api/quick-train", form, setProgress);
      navigate(`/jobs/${r.job.id}`);
    } catch (err) {
      setError(err instanceof ApiError ? err : new ApiError(0, String(err)));
    } finally {
      setProgress(null);
    }
  };

  const chosen = presets.find((p) => p.id === preset);
  return (
    <div className="page">
      <h1>Quick train</h1>
      <p className="muted">One page from images to a LoRA: a dataset named like the job is made from your images and
        captions, and a job with the preset's settings is queued.</p>
      <form onSubmit={submit} className="quick-train">
        <Card title="1. Name and trigger word">
          <div className="fields">
            <div className="field">
              <label htmlFor="qt-name">LoRA name</label>
              <input id="qt-name" value={name} onChange={(e) => setName(e.target.value)} required placeholder="my_dog_v1"
                pattern="[A-Za-z0-9][A-Za-z0-9._\-]*" title="letters, digits, '.', '_' or '-'" />
            </div>
            <div className="field">
              <label htmlFor="qt-trigger">Trigger word</label>
              <input id="qt-trigger" value={trigger} onChange={(e) => setTrigger(e.target.value)} placeholder="e.g. sks dog" />
              <div className="help">Put in front of every caption while training; use it in prompts to call the LoRA.</div>
            </div>
          </div>
        </Card>
        <Card title={`2. Images and captions (${files.length})`}>
          <DropZone onFiles={add} disabled={progress !== null} />
          <QuickCaption files={files} disabled={progress !== null}
            onCaptions={(filled) => setFiles((old) => old.map((f) => (filled.has(f.file) ? { ...f, caption: filled.get(f.file)! } : f)))} />
          <div className="items">
            {files.map((f, i) => (
              <div className="item-card" key={f.url}>
                <div className="thumb">
                  {f.file.type.startsWith("video/") ? <video src={f.url} muted /> : <img src={f.url} alt={f.file.name} />}
                </div>
                <div className="item-name">{f.file.name}</div>
                <textarea rows={3} value={f.caption} data-testid="qt-caption-text" placeholder={trigger ? `e.g. ${trigger} sitting on a sofa` : "caption"}
                  onChange={(e) => setCaption(i, e.target.value)} />
                <button type="button" className="btn btn-small" onClick={() => removeAt(i)}>remove</button>
              </div>
            ))}
          </div>
        </Card>
        <Card title="3. Model">
          <select value={preset} onChange={(e) => setPreset(e.target.value)} data-testid="qt-preset">
            {presets.map((p) => <option key={p.id} value={p.id}>{p.label}</option>)}
          </select>
          {chosen ? <p className="small muted">{chosen.description}</p> : null}
          <label className="inline"><input type="checkbox" checked={advanced} onChange={(e) => setAdvanced(e.target.checked)} /> more options</label>
          {advanced ? (
            <div className="fields">
              <div className="field"><label htmlFor="qt-model">Base model (hub id or local path)</label>
                <input id="qt-model" value={modelPath} onChange={(e) => setModelPath(e.target.value)} placeholder="the preset's model" /></div>
              <div className="field"><label htmlFor="qt-steps">Steps</label>
                <input id="qt-steps" value={steps} onChange={(e) => setSteps(e.target.value)} inputMode="numeric" placeholder="the preset's" /></div>
              <div className="field"><label htmlFor="qt-device">Device</label>
                <input id="qt-device" value={device} onChange={(e) => setDevice(e.target.value)} placeholder="cuda, cpu, mps (default: best)" /></div>
              <div className="field"><label htmlFor="qt-gpus">GPUs</label>
                <input id="qt-gpus" value={gpuIds} onChange={(e) => setGpuIds(e.target.value)} placeholder="auto, 0, 0,1 or cpu" /></div>
            </div>
          ) : null}
        </Card>
        {error ? <ErrorBox message={error.message} problems={error.problems} /> : null}
        {progress !== null ? <ProgressBar value={progress} label={`uploading ${Math.round(progress * 100)} %`} /> : null}
        <div className="actions">
          <label className="inline"><input type="checkbox" checked={start} onChange={(e) => setStart(e.target.checked)} /> start right away</label>
          <button type="submit" className="btn btn-primary" disabled={progress !== null || files.length === 0 || !name}>
            {start ? "Train" : "Create job"}
          </button>
        </div>
      </form>
    </div>
  );
}
