import { api } from "../lib/api";
import { usePoll } from "../lib/hooks";
import { bytes } from "../lib/format";
import { Link } from "../lib/router";
import type { SystemAnswer } from "../lib/types";
import { Card, Empty, ErrorBox, Loading, ProgressBar, Stat } from "../components/common";
import { JobTable } from "../components/JobTable";

export function Dashboard() {
  const { data, error, reload } = usePoll(() => api.get<SystemAnswer>("/api/system"), 3000, []);
  if (!data) return <div className="page"><h1>Dashboard</h1>{error ? <ErrorBox message={error} /> : <Loading />}</div>;
  const { system, worker, running, queued } = data;
  return (
    <div className="page">
      <h1>Dashboard</h1>
      {error ? <ErrorBox message={error} /> : null}
      {!worker.alive ? (
        <div className="alert alert-warn">No worker is running: queued jobs wait. <code>aitk ui</code> starts one, or run <code>aitk worker</code>.</div>
      ) : null}
      <div className="stats" data-testid="system">
        <Stat label="CPU" value={`${system.cpu.percent.toFixed(0)} %`} hint={`${system.cpu.count} cores`} />
        <Stat label="Memory" value={`${system.memory.percent.toFixed(0)} %`} hint={`${bytes(system.memory.used)} of ${bytes(system.memory.total)}`} />
        {system.disks.map((d) => (
          <Stat key={d.path} label={`Free disk: ${d.path.split("/").filter(Boolean).pop() ?? d.path}`} value={bytes(d.free)} hint={`of ${bytes(d.total)} · ${d.path}`} />
        ))}
        <Stat label="Worker" value={worker.alive ? "running" : "stopped"} tone={worker.alive ? "ok" : "bad"} hint={worker.pid ? `pid ${worker.pid}` : undefined} />
      </div>
      <Card title="GPUs">
        {system.gpus === null ? (
          <p className="muted">No GPU information (nvidia-ml-py not installed, or no NVIDIA GPU).</p>
        ) : system.gpus.length === 0 ? (
          <p className="muted">No GPU found.</p>
        ) : (
          <div className="gpus">
            {system.gpus.map((g) => (
              <div key={g.index} className="gpu">
                <div><strong>GPU {g.index}</strong> {g.name}{g.temperature !== null ? <span className="muted"> · {g.temperature} °C</span> : null}</div>
                <div className="small">use</div>
                <ProgressBar value={g.utilization / 100} label={`${g.utilization} %`} />
                <div className="small">memory</div>
                <ProgressBar value={g.memory_total ? g.memory_used / g.memory_total : 0} label={`${bytes(g.memory_used)} / ${bytes(g.memory_total)}`} />
              </div>
            ))}
          </div>
        )}
      </Card>
      <Card title={`Running (${running.length})`} actions={<Link to="/jobs/new" className="btn btn-primary">New job</Link>}>
        {running.length ? <JobTable jobs={running} onChange={reload} /> : <Empty>Nothing is training right now.</Empty>}
      </Card>
      <Card title={`Queued (${queued.length})`}>
        {queued.length ? <JobTable jobs={queued} onChange={reload} /> : <Empty>The queue is empty.</Empty>}
      </Card>
    </div>
  );
}
