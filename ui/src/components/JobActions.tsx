// Start, stop, clone, edit and delete, as the job's status allows; used by the list and the detail page.
import { api } from "../lib/api";
import { useAction } from "../lib/hooks";
import { navigate } from "../lib/router";
import type { Job } from "../lib/types";
import { ConfirmButton } from "./common";

const STARTABLE = new Set(["idle", "completed", "stopped", "error"]);

export function JobActions({ job, onChange, compact }: { job: Job; onChange: () => void; compact?: boolean }) {
  const { busy, error, run } = useAction();
  const act = (action: () => Promise<unknown>) => run(action).then(onChange);
  const startable = STARTABLE.has(job.status);
  const active = job.status === "running" || job.status === "stopping";
  return (
    <div className="actions">
      {startable ? (
        <button type="button" className="btn btn-primary" disabled={busy} data-testid="start-job"
          onClick={() => act(() => api.post(`/api/jobs/${job.id}/start`))}>
          {job.status === "idle" ? "Start" : "Start again"}
        </button>
      ) : null}
      {job.status === "queued" || job.status === "running" ? (
        <button type="button" className="btn btn-warn" disabled={busy} data-testid="stop-job"
          onClick={() => act(() => api.post(`/api/jobs/${job.id}/stop`))}>
          {job.status === "queued" ? "Remove from queue" : "Stop"}
        </button>
      ) : null}
      {job.status === "stopping" ? <span className="muted small">saving a checkpoint, then stopping…</span> : null}
      {!compact && job.status === "running" ? (
        <>
          <button type="button" className="btn" disabled={busy} onClick={() => act(() => api.post(`/api/jobs/${job.id}/save-now`))}>Save now</button>
          <button type="button" className="btn" disabled={busy} onClick={() => act(() => api.post(`/api/jobs/${job.id}/sample-now`))}>Sample now</button>
        </>
      ) : null}
      <button type="button" className="btn" disabled={busy} data-testid="clone-job"
        onClick={() => run(() => api.post<{ job: Job }>(`/api/jobs/${job.id}/clone`)).then((r) => r && navigate(`/jobs/${r.job.id}/edit`))}>
        Clone
      </button>
      {!compact && startable ? (
        <button type="button" className="btn" onClick={() => navigate(`/jobs/${job.id}/edit`)}>Edit</button>
      ) : null}
      {!active ? (
        <ConfirmButton label="Delete" question={`Delete ${job.name}?`} extra="and its output folder" disabled={busy}
          onConfirm={(files) => run(() => api.del(`/api/jobs/${job.id}?delete_files=${files}`)).then((done) => {
            if (!done) return; // refused: the message shows next to the buttons
            if (compact) onChange(); else navigate("/jobs");
          })} />
      ) : null}
      {error ? <span className="inline-error" role="alert">{error}</span> : null}
    </div>
  );
}
