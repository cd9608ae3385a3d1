// One job: overview with live log, samples, metrics, checkpoints and its config.
import { useState } from "react";
import { api, jobFileUrl } from "../lib/api";
import { usePoll } from "../lib/hooks";
import { bytes, duration, speed, time } from "../lib/format";
import { Link, navigate, useLocation } from "../lib/router";
import { firstProcess, getAt } from "../lib/jobconfig";
import type { InspectReport, JobDetail as Detail } from "../lib/types";
import { Card, Empty, ErrorBox, Loading, ProgressBar, Stat, StatusBadge, Tabs } from "../components/common";
import { JobActions } from "../components/JobActions";
import { stepLabel } from "../components/JobTable";
import { LogView } from "../components/LogView";
import { StoredJobPlan } from "../components/MemoryPlan";
import { MetricsPanel } from "../components/MetricsPanel";
import { SampleGallery } from "../components/SampleGallery";
import { FailureBox } from "../components/FailureBox";
import { FetchJobModels } from "../components/ModelFetch";
import { PublishCard } from "../components/PublishCard";

type Tab = "overview" | "samples" | "metrics" | "checkpoints" | "config";
const TABS: { id: Tab; label: string }[] = [
  { id: "overview", label: "Overview" },
  { id: "samples", label: "Samples" },
  { id: "metrics", label: "Metrics" },
  { id: "checkpoints", label: "Checkpoints" },
  { id: "config", label: "Config" },
];

/** The preview prompts of the job, in file order (sample.samples[].prompt, else sample.prompts), trigger filled in. */
function promptsOf(d: Detail): string[] {
  const process = firstProcess(d.config);
  const trigger = String(getAt(process, ["trigger_word"]) ?? "");
  const samples = getAt(process, ["sample", "samples"]);
  const listed = Array.isArray(samples) && samples.length
    ? samples.map((s) => String(getAt(s, ["prompt"]) ?? ""))
    : (getAt(process, ["sample", "prompts"]) as unknown[] | undefined ?? []).map(String);
  return listed.map((p) => p.replaceAll("[trigger]", trigger).replace(/\s--\w+.*$/, ""));
}

function Overview({ d, onChange }: { d: Detail; onChange: () => void }) {
  const job = d.job;
  const beforeStart = job.status !== "running" && job.status !== "stopping"; // the plan is for the next run
  const lastSamples = d.samples[d.samples.length - 1];
  return (
    <>
      <div className="stats">
        <Stat label="step" value={stepLabel(job)} />
        <Stat label="speed" value={speed(job.speed)} />
        <Stat label="ETA" value={job.status === "running" ? duration(job.eta_s) : "–"} />
        <Stat label="started" value={time(job.started_at)} />
        <Stat label="finished" value={time(job.finished_at)} />
        <Stat label="model" value={job.summary.arch ?? "?"} hint={job.summary.model} />
        <Stat label="trigger word" value={job.summary.trigger_word || "–"} />
        <Stat label="GPUs" value={job.gpu_ids || "auto"} hint={job.summary.device ? `device ${job.summary.device}` : undefined} />
      </div>
      {job.summary.datasets?.length ? (
        <p className="small">Datasets: {job.summary.datasets.map((p) => <code key={p}>{p}</code>)}</p>
      ) : null}
      {beforeStart ? <StoredJobPlan job={job} yaml={d.yaml} onChange={onChange} /> : null}
      {lastSamples ? (
        <Card title={`Latest previews (step ${lastSamples.step})`}>
          <SampleGallery jobId={job.id} samples={[lastSamples]} prompts={promptsOf(d)} />
        </Card>
      ) : null}
      <Card title="Log" actions={<a className="btn btn-small" href={jobFileUrl(job.id, "log.txt", true)}>log.txt</a>}>
        <LogView lines={d.log_tail} />
      </Card>
    </>
  );
}

function Checkpoints({ d }: { d: Detail }) {
  const id = d.job.id;
  return (
    <>
      <Card title="LoRA files">
        {d.lora_files.length ? (
          <table className="table" data-testid="lora-files">
            <thead><tr><th>File</th><th>Step</th><th>Size</th><th>Written</th><th /></tr></thead>
            <tbody>
              {[...d.lora_files].sort((a, b) => (b.step ?? Infinity) - (a.step ?? Infinity)).map((f) => (
                <tr key={f.name}>
                  <td>{f.name} {f.final ? <span className="badge badge-completed">final</span> : null}</td>
                  <td>{f.step ?? "–"}</td><td>{bytes(f.size)}</td><td>{time(f.modified)}</td>
                  <td><a className="btn btn-small" href={jobFileUrl(id, f.path, true)} download>Download</a></td>
                </tr>
              ))}
            </tbody>
          </table>
        ) : <Empty>No LoRA file saved yet.</Empty>}
      </Card>
      <Card title="Checkpoints (for resuming)">
        {d.checkpoints.length ? d.checkpoints.map((c) => (
          <details key={c.name} className="checkpoint">
            <summary>
              step {c.step} <span className={`badge ${c.complete ? "badge-completed" : "badge-error"}`}>{c.complete ? "complete" : "incomplete"}</span>
              <span className="muted small"> {c.files.length} files</span>
            </summary>
            <ul>
              {c.files.map((f) => <li key={f.path}><a href={jobFileUrl(id, f.path, true)}>{f.name}</a></li>)}
            </ul>
          </details>
        )) : <Empty>No checkpoint yet.</Empty>}
      </Card>
    </>
  );
}

function Config({ d }: { d: Detail }) {
  const [report, setReport] = useState<InspectReport | null>(null);
  const [error, setError] = useState<string | null>(null);
  const inspect = () => {
    setError(null);
    api.get<InspectReport>(`/api/jobs/${d.job.id}/inspect`).then(setReport).catch((e) => setError(String(e.message ?? e)));
  };
  return (
    <>
      <Card title="Job file" actions={<a className="btn btn-small" href={`/api/jobs/${d.job.id}/yaml`}>Download YAML</a>}>
        <p className="muted small">Run folder: <code>{d.run_folder}</code></p>
        <pre className="code" data-testid="job-yaml">{d.yaml}</pre>
      </Card>
      <Card title="Dataset inspection" actions={<button type="button" className="btn btn-small" onClick={inspect}>Inspect datasets</button>}>
        {error ? <ErrorBox message={error} /> : null}
        {report ? <pre className={`code ${report.ok ? "" : "code-bad"}`}>{report.lines.join("\n")}</pre>
          : <p className="muted">What the trainer will see in the job's dataset folders: counts, captions, sizes, buckets.</p>}
      </Card>
    </>
  );
}

export function JobDetail({ jobId }: { jobId: number }) {
  const { query } = useLocation();
  const tab = (query.get("tab") as Tab | null) ?? "overview";
  const [live, setLive] = useState(true);
  const { data, error, reload } = usePoll(async () => {
    const d = await api.get<Detail>(`/api/jobs/${jobId}`);
    setLive(["queued", "running", "stopping"].includes(d.job.status));
    return d;
  }, live ? 1500 : 8000, [jobId]);

  if (!data) return <div className="page">{error ? <ErrorBox message={error} /> : <Loading what="job" />}</div>;
  const job = data.job;
  const active = job.status === "running" || job.status === "stopping";
  return (
    <div className="page" data-testid="job-detail">
      <div className="page-head">
        <h1><Link to="/jobs">Jobs</Link> / {job.name}</h1>
        <StatusBadge status={job.status} runState={job.run_state} />
      </div>
      <ProgressBar value={job.progress} label={stepLabel(job)} />
      {error ? <ErrorBox message={error} /> : null}
      <FailureBox job={job} />
      {job.info ? <p className="muted">{job.info}</p> : null}
      <JobActions job={job} onChange={reload} />
      {job.status === "completed" ? <PublishCard job={job} /> : null}
      {!active && job.status !== "completed" ? <FetchJobModels job={job} /> : null}
      <Tabs tabs={TABS} active={tab} onChange={(t) => navigate(`/jobs/${jobId}${t === "overview" ? "" : `?tab=${t}`}`, { replace: true })} />
      {tab === "overview" ? <Overview d={data} onChange={reload} /> : null}
      {tab === "samples" ? <SampleGallery jobId={job.id} samples={data.samples} prompts={promptsOf(data)} /> : null}
      {tab === "metrics" ? <MetricsPanel jobId={job.id} live={active} job={data.config} /> : null}
      {tab === "checkpoints" ? <Checkpoints d={data} /> : null}
      {tab === "config" ? <Config d={data} /> : null}
    </div>
  );
}
