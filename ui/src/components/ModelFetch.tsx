// Models fetched ahead of a run (docs/hub.md): the settings page's model cache (where it is, its size,
// the cached models, a model id to fetch) and a job page's "Fetch models"; a fetch runs on the server
// (one at a time) and its bytes done / total are polled here.
import { useCallback, useEffect, useState, type FormEvent } from "react";
import { FETCH_FINAL, messageOf, models } from "../lib/api";
import { ago, bytes } from "../lib/format";
import type { FetchTask, Job, ModelCacheAnswer } from "../lib/types";
import { useTaskPoll } from "../lib/hooks";
import { Card, ConfirmButton, Empty, ErrorBox, ProgressBar } from "./common";

const loadFetchTask = async (): Promise<FetchTask | null> => (await models.fetchState()).task;

/** The server's newest fetch, polled while it runs; `start` begins one; `onEnd` runs once when one ends. */
export function useFetchTask(onEnd?: (task: FetchTask) => void) {
  const [tick, setTick] = useState(0);
  const { task, setTask, error, setError } = useTaskPoll(loadFetchTask, FETCH_FINAL, 700, onEnd, tick);
  const start = useCallback(async (action: () => Promise<{ task: FetchTask }>) => {
    setError(null);
    try {
      const answer = await action();
      setTask(answer.task);
      setTick((t) => t + 1);
    } catch (err) {
      setError(messageOf(err));
    }
  }, []);
  return { task, error, start };
}

export function FetchProgress({ task }: { task: FetchTask }) {
  const fraction = task.total_bytes ? task.done_bytes / task.total_bytes : 0;
  const label = task.state === "planning"
    ? `asking the Hub about ${task.current ?? task.label}…`
    : `${bytes(task.done_bytes)} / ${bytes(task.total_bytes)}${task.current ? ` · ${task.current}` : ""}`;
  return (
    <div className="fetch-task" data-testid="fetch-progress" data-state={task.state} data-done={task.done_bytes}
      data-total={task.total_bytes}>
      {task.state === "completed" ? (
        <p className="ok-line" data-testid="fetch-outcome">
          Fetched {task.label}: {task.files} file(s), {bytes(task.total_bytes)} downloaded
          {task.cached_bytes ? `, ${bytes(task.cached_bytes)} already in the cache` : ""}.
        </p>
      ) : task.state === "failed" ? (
        <p className="inline-error" data-testid="fetch-outcome">Fetching {task.label} failed: {task.error}</p>
      ) : (
        <ProgressBar value={fraction} label={label} />
      )}
      {task.notes.length ? <ul className="small muted">{task.notes.map((n) => <li key={n}>{n}</li>)}</ul> : null}
    </div>
  );
}

/** The settings page's card: the hub cache's location and size, its models, and a model id to fetch. */
export function ModelCacheCard() {
  const [cache, setCache] = useState<ModelCacheAnswer | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [repoId, setRepoId] = useState("");
  const [revision, setRevision] = useState("");
  const load = useCallback(() => {
    models.cache().then((c) => { setCache(c); setError(null); }).catch((e) => setError(messageOf(e)));
  }, []);
  useEffect(load, [load]);
  const fetching = useFetchTask(load);
  const running = fetching.task !== null && !FETCH_FINAL.includes(fetching.task.state);
  const submit = (event: FormEvent) => {
    event.preventDefault();
    void fetching.start(() => models.fetchRepo(repoId.trim(), revision));
  };
  const remove = (id: string) => {
    setError(null);
    models.remove(id).then((r) => setCache(r.cache)).catch((e) => setError(messageOf(e)));
  };
  return (
    <Card title="Model cache" actions={<button type="button" className="btn btn-small" onClick={load}>Refresh</button>}>
      <div data-testid="model-cache">
        {cache ? (
          <>
            <p className="small">
              Models downloaded from the Hugging Face Hub are kept in its cache, <code data-testid="cache-path">{cache.hub_cache}</code>
              {" "}(HF_HOME <code>{cache.hf_home}</code>); every run and tool reads them from there. Set <code>HF_HOME</code> (or
              <code> HF_HUB_CACHE</code>) before starting <code>aitk ui</code> to use another folder.
            </p>
            <p data-testid="cache-size" data-bytes={cache.size_on_disk}>
              Total size: <strong>{bytes(cache.size_on_disk)}</strong> in {cache.repos.length} cached repo(s)
              {cache.exists ? "" : " (the folder does not exist yet)"}.
            </p>
          </>
        ) : null}
        <ErrorBox message={error ?? fetching.error} warnings={cache?.warnings} />
        <form className="row" onSubmit={submit}>
          <input value={repoId} onChange={(e) => setRepoId(e.target.value)} placeholder="owner/name" aria-label="model id to fetch"
            data-testid="fetch-model-id" />
          <input value={revision} onChange={(e) => setRevision(e.target.value)} placeholder="main" aria-label="revision"
            style={{ maxWidth: "8rem" }} />
          <button type="submit" className="btn btn-primary" disabled={running || !repoId.trim()} data-testid="fetch-model">Fetch</button>
        </form>
        <div className="help">Downloads a model ahead of a run (the files a run loads), in the background: the same as
          <code> aitk fetch-model owner/name</code>. One fetch at a time.</div>
        {fetching.task ? <FetchProgress task={fetching.task} /> : null}
        {cache && cache.repos.length ? (
          <table className="table" data-testid="cached-models">
            <thead><tr><th>Model</th><th>Size</th><th>Files</th><th>Last used</th><th /></tr></thead>
            <tbody>
              {cache.repos.map((r) => (
                <tr key={`${r.repo_type}/${r.repo_id}`} data-repo={r.repo_id} data-bytes={r.size_on_disk}>
                  <td>{r.repo_id}{r.repo_type !== "model" ? <span className="muted small"> ({r.repo_type})</span> : null}</td>
                  <td>{bytes(r.size_on_disk)}</td>
                  <td>{r.nb_files}</td>
                  <td title={r.last_accessed ? new Date(r.last_accessed * 1000).toLocaleString() : undefined}>{ago(r.last_accessed)}</td>
                  <td>
                    {r.repo_type === "model" ? (
                      <ConfirmButton label="Delete" className="btn btn-small btn-danger" disabled={running}
                        question={`Delete ${r.repo_id} from the cache (${bytes(r.size_on_disk)})?`} onConfirm={() => remove(r.repo_id)} />
                    ) : null}
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        ) : cache ? <Empty>No model in the cache yet.</Empty> : null}
      </div>
    </Card>
  );
}

/** A job page's "Fetch models": every hub model the job names, downloaded before it runs. */
export function FetchJobModels({ job }: { job: Job }) {
  const fetching = useFetchTask();
  const task = fetching.task && fetching.task.job_id === job.id ? fetching.task : null;
  const running = fetching.task !== null && !FETCH_FINAL.includes(fetching.task.state);
  return (
    <div className="fetch-job" data-testid="fetch-job">
      <div className="row">
        <button type="button" className="btn" disabled={running} data-testid="fetch-job-models"
          onClick={() => void fetching.start(() => models.fetchJob(job.id))}>
          Fetch models
        </button>
        <span className="muted small">downloads the job's hub models into the cache now, so the run starts without waiting</span>
      </div>
      {fetching.error ? <p className="inline-error" role="alert">{fetching.error}</p> : null}
      {task ? <FetchProgress task={task} /> : null}
    </div>
  );
}
