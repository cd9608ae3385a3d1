import type { Job } from "../lib/types";

// aitk/trainer/failure.py REASONS, in words
const REASON_LABELS: Record<string, string> = {
  oom: "Out of memory",
  nan: "Loss not finite",
  io: "Disk write failed",
  config: "Job file",
  data: "Dataset",
  model: "Model files",
  killed: "Killed",
  internal: "Internal error",
};

export function reasonLabel(reason: string | null): string {
  return reason ? REASON_LABELS[reason] ?? reason : "Error";
}

/** The job page's account of a failed run: reason, message, fix, then the log's last lines. */
export function FailureBox({ job }: { job: Job }) {
  if (job.status !== "error" && !job.error) return null;
  return (
    <div className="alert alert-error" data-testid="failure" data-reason={job.reason ?? ""}>
      <strong>Failed: {reasonLabel(job.reason)}</strong>
      {job.exit_code !== null ? <span className="muted small"> (exit code {job.exit_code})</span> : null}
      {job.message ? <p className="failure-message">{job.message}</p> : null}
      {job.fix ? <p className="failure-fix"><strong>Fix: </strong>{job.fix}</p> : null}
      {job.error ? (
        <details>
          <summary>Last lines of the output</summary>
          <pre className="code">{job.error}</pre>
        </details>
      ) : null}
    </div>
  );
}

/** One or two lines for the job list. */
export function FailureSummary({ job }: { job: Job }) {
  if (job.status !== "error") return null;
  const first = (job.message ?? job.error ?? "").split("\n")[0];
  return (
    <div className="small failure-summary" data-testid="failure-summary" title={job.fix ?? undefined}>
      <strong>{reasonLabel(job.reason)}</strong>{first ? `: ${first}` : null}
      {job.fix ? <div className="muted">Fix: {job.fix}</div> : null}
    </div>
  );
}
