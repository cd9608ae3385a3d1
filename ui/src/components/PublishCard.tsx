// "Publish to the Hub" on a completed job (docs/hub.md): the upload the trainer does at the end of a run
// (save.push_to_hub; `aitk push`), on demand: repo id and visibility from the job's save section or this
// form, the upload running on the server, then the repo's URL or the one-line reason.
import { useCallback, useEffect, useState, type FormEvent } from "react";
import { messageOf, publishing } from "../lib/api";
import type { Job, PublishAnswer } from "../lib/types";
import { Card } from "./common";

export function PublishCard({ job }: { job: Job }) {
  const [answer, setAnswer] = useState<PublishAnswer | null>(null);
  const [repoId, setRepoId] = useState<string | null>(null); // null: the job's default
  const [isPrivate, setPrivate] = useState<boolean | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const [tick, setTick] = useState(0);
  const running = answer?.publish?.state === "running";

  const load = useCallback(() => {
    publishing.state(job.id).then((a) => { setAnswer(a); setError(null); }).catch((e) => setError(messageOf(e)));
  }, [job.id]);
  useEffect(load, [load, job.status, tick]);
  useEffect(() => {
    if (!running) return;
    const timer = window.setTimeout(() => setTick((t) => t + 1), 800);
    return () => window.clearTimeout(timer);
  }, [running, answer]);

  if (!answer || !answer.publishable) return null;
  const defaults = answer.defaults;
  const shownRepo = repoId ?? defaults.repo_id ?? "";
  const shownPrivate = isPrivate ?? defaults.private;
  const p = answer.publish;
  const submit = (event: FormEvent) => {
    event.preventDefault();
    setBusy(true);
    setError(null);
    publishing.start(job.id, shownRepo, shownPrivate)
      .then((r) => setAnswer({ ...answer, publish: r.publish }))
      .catch((e) => setError(messageOf(e)))
      .finally(() => setBusy(false));
  };
  return (
    <Card title="Publish to the Hugging Face Hub" className="publish-card">
      <form className="row" onSubmit={submit} data-testid="publish-form">
        <input value={shownRepo} onChange={(e) => setRepoId(e.target.value)} placeholder={`your-name/${job.name}`}
          aria-label="Hub repo id" data-testid="publish-repo" />
        <label className="inline">
          <input type="checkbox" checked={shownPrivate} onChange={(e) => setPrivate(e.target.checked)} data-testid="publish-private" /> private
        </label>
        <button type="submit" className="btn btn-primary" disabled={busy || running} data-testid="publish-job">
          {p?.state === "uploaded" ? "Publish again" : "Publish to the Hub"}
        </button>
      </form>
      <div className="help">
        Uploads the final LoRA file(s), a model card and the samples, with the token saved in Settings
        {defaults.repo_id ? "" : `; left empty, the repo is <the token's user>/${job.name}`}. Visibility applies when the repo is created.
      </div>
      {p ? (
        <div data-testid="publish-state" data-state={p.state}>
          {p.state === "running" ? <p className="muted">Uploading to {p.repo_id ?? "the Hub"}… {p.message}</p> : null}
          {p.state === "uploaded" && p.url ? (
            <p className="ok-line">Published: <a href={p.url} target="_blank" rel="noreferrer" data-testid="publish-url">{p.url}</a></p>
          ) : null}
          {p.state === "failed" || p.state === "skipped" ? <p className="inline-error" role="alert">{p.message}</p> : null}
        </div>
      ) : null}
      {error ? <p className="inline-error" role="alert">{error}</p> : null}
    </Card>
  );
}
