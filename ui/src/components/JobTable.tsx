import { Link } from "../lib/router";
import { duration, speed } from "../lib/format";
import type { Job } from "../lib/types";
import { ProgressBar, StatusBadge } from "./common";
import { FailureSummary } from "./FailureBox";
import { JobActions } from "./JobActions";

export function stepLabel(job: Job): string {
  if (job.total_steps) return `${job.step ?? 0} / ${job.total_steps}`;
  return job.step !== null ? String(job.step) : "–";
}

export function JobTable({ jobs, onChange, actions = true }: { jobs: Job[]; onChange: () => void; actions?: boolean }) {
  return (
    <table className="table" data-testid="jobs-table">
      <thead>
        <tr>
          <th>Name</th><th>Status</th><th>Progress</th><th>Speed</th><th>ETA</th><th>Model</th><th>GPU</th>
          {actions ? <th /> : null}
        </tr>
      </thead>
      <tbody>
        {jobs.map((job) => (
          <tr key={job.id} data-job={job.name}>
            <td><Link to={`/jobs/${job.id}`}>{job.name}</Link>
              {job.queue_position !== null ? <span className="muted small"> #{job.queue_position} in queue</span> : null}
            </td>
            <td><StatusBadge status={job.status} runState={job.run_state} /><FailureSummary job={job} /></td>
            <td className="cell-progress"><ProgressBar value={job.progress} label={stepLabel(job)} /></td>
            <td>{job.status === "running" ? speed(job.speed) : "–"}</td>
            <td>{job.status === "running" ? duration(job.eta_s) : "–"}</td>
            <td className="small" title={job.summary.model}>{job.summary.arch ?? "?"}</td>
            <td className="small">{job.gpu_ids || "auto"}</td>
            {actions ? <td><JobActions job={job} onChange={onChange} compact /></td> : null}
          </tr>
        ))}
      </tbody>
    </table>
  );
}
