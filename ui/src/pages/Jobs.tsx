import { api } from "../lib/api";
import { usePoll } from "../lib/hooks";
import { Link } from "../lib/router";
import type { Job } from "../lib/types";
import { Empty, ErrorBox, Loading } from "../components/common";
import { JobTable } from "../components/JobTable";

export function Jobs() {
  const { data, error, reload } = usePoll(() => api.get<{ jobs: Job[] }>("/api/jobs"), 2000, []);
  const jobs = data ? [...data.jobs].sort((a, b) => b.id - a.id) : [];
  return (
    <div className="page">
      <div className="page-head">
        <h1>Jobs</h1>
        <div className="actions">
          <Link to="/jobs/new" className="btn btn-primary">New job</Link>
          <Link to="/quick-train" className="btn">Quick train</Link>
        </div>
      </div>
      {error ? <ErrorBox message={error} /> : null}
      {!data ? <Loading /> : jobs.length ? <JobTable jobs={jobs} onChange={reload} /> : (
        <Empty>No jobs yet. <Link to="/jobs/new">Create one from a model preset</Link> or try <Link to="/quick-train">quick train</Link>.</Empty>
      )}
    </div>
  );
}
