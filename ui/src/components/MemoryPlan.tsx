// The memory plan of a job before it starts (docs/ui.md, "Memory plan"): the GPU peak split into
// what holds it, the host peak, whether it fits the budget (the job's GPU, or a size the user sets),
// and when it does not, the cheapest settings that fit with an Apply button. Planning takes 1-30 s
// on the server, so only one request per card is in flight: a change made meanwhile is planned
// when that one answers (the server keeps finished plans, so going back and forth is free).
import { useEffect, useRef, useState } from "react";
import { api, messageOf, plans } from "../lib/api";
import { bytes } from "../lib/format";
import { useDebounced } from "../lib/hooks";
import type { DeviceSplit, Job, JobConfig, MemoryPlan, PlanAnswer, PlanBudget } from "../lib/types";
import { Card, ErrorBox } from "./common";
import "./MemoryPlan.css";

export type PlanSource =
  /** A job being edited: its validated YAML (null while it has problems) and its GPUs. */
  | { kind: "draft"; yaml: string | null; gpuIds: string }
  /** A stored job; `version` changes when the job does (its YAML and GPUs), which plans it again. */
  | { kind: "job"; jobId: number; version: string };

export interface Suggested {
  yaml: string;
  config: JobConfig | null;
}

const BUDGET_KEY = "aitk.plan.gpuMemory"; // the budget the user set, kept across pages and visits
const SIZE_RE = /^\s*[0-9]*\.?[0-9]+\s*[kmgt]?i?b?\s*$/i; // what the server reads as a size (aitk.plan parse_size)
const SETTLE_MS = 800; // the editor changes on every keystroke: plan what it settles on
const SEGMENTS: { key: keyof Omit<DeviceSplit, "total">; label: string; hint: string }[] = [
  { key: "weights", label: "weights", hint: "frozen model weights on the GPU" },
  { key: "trainable", label: "trainable", hint: "the network being trained" },
  { key: "optimizer", label: "optimizer state", hint: "optimizer state (and the EMA copy)" },
  { key: "gradients", label: "gradients", hint: "gradients of the trainable parameters" },
  { key: "activations", label: "activations", hint: "saved for backward" },
  { key: "workspace", label: "workspace", hint: "backward temporaries, recomputation" },
];

function storedBudget(): string {
  try {
    return window.localStorage.getItem(BUDGET_KEY) ?? "";
  } catch {
    return "";
  }
}

function flops(n: number): string {
  return n >= 1e12 ? `${(n / 1e12).toFixed(2)} TFLOP` : `${(n / 1e9).toFixed(2)} GFLOP`;
}

/** Plans `request` (a key and how to load it), at most one at a time, the latest key winning. */
function useLatestPlan(request: { key: string; load: () => Promise<PlanAnswer> } | null) {
  const [answer, setAnswer] = useState<{ key: string; value: PlanAnswer } | null>(null);
  const [running, setRunning] = useState<{ key: string; since: number } | null>(null);
  const [now, setNow] = useState(Date.now());
  const alive = useRef(true);
  const loadRef = useRef(request?.load);
  loadRef.current = request?.load;
  const wanted = request?.key ?? null;

  useEffect(() => () => { alive.current = false; }, []);
  useEffect(() => {
    const load = loadRef.current;
    if (wanted === null || running !== null || answer?.key === wanted || !load) return;
    setRunning({ key: wanted, since: Date.now() });
    load()
      .catch((err): PlanAnswer => ({ ok: false, error: messageOf(err), problems: [], budget: null }))
      .then((value) => {
        if (!alive.current) return;
        setAnswer({ key: wanted, value });
        setRunning(null);
      });
  }, [wanted, running, answer]);
  useEffect(() => {
    if (!running) return;
    const timer = window.setInterval(() => setNow(Date.now()), 500);
    return () => window.clearInterval(timer);
  }, [running]);

  return {
    answer: answer?.value ?? null,
    stale: answer !== null && answer.key !== wanted,
    runningFor: running ? Math.max(0, Math.round((now - running.since) / 1000)) : null,
  };
}

export function MemoryPlanCard({ source, onApply, applyHint, auto = true }: {
  source: PlanSource;
  /** Puts the suggested job in place (the editor, or a stored job); without it there is no Apply button. */
  onApply?: (suggested: Suggested) => Promise<void> | void;
  /** Why Apply is not offered, shown in its place (a queued job cannot be changed). */
  applyHint?: string;
  /** Plan without being asked; otherwise a button starts it. */
  auto?: boolean;
}) {
  const [budgetText, setBudgetText] = useState(storedBudget);
  const [asked, setAsked] = useState(auto);
  const [attempt, setAttempt] = useState(0);
  const budget = useDebounced(budgetText.trim(), SETTLE_MS);
  // settled as text: the pages build a new `source` object on every render
  const s = JSON.parse(useDebounced(JSON.stringify(source), SETTLE_MS)) as PlanSource;

  useEffect(() => {
    try {
      if (!budget) window.localStorage.removeItem(BUDGET_KEY);
      else if (SIZE_RE.test(budget)) window.localStorage.setItem(BUDGET_KEY, budget); // a typo stays on this page
    } catch {
      // private browsing: the budget lasts for this page only
    }
  }, [budget]);

  const ready = asked && (s.kind === "job" || s.yaml !== null);
  const request = !ready ? null : {
    key: JSON.stringify([attempt, budget, s.kind === "job" ? [s.jobId, s.version] : [s.yaml, s.gpuIds]]),
    load: () => (s.kind === "job" ? plans.job(s.jobId, budget) : plans.draft(s.yaml ?? "", s.gpuIds, budget)),
  };
  const { answer, stale, runningFor } = useLatestPlan(request);
  const waiting = source.kind === "draft" && source.yaml === null;

  return (
    <Card className="memory-plan" title="Memory plan" actions={
      <div className="plan-budget">
        <label htmlFor="plan-budget">GPU memory</label>
        <input id="plan-budget" data-testid="plan-budget" value={budgetText} size={10}
          placeholder={answer?.budget && answer.budget.source !== "set" ? `auto: ${bytes(answer.budget.bytes)}` : "auto"}
          title="The budget to plan for, e.g. 24GB or 16000MB (GB = GiB). Empty: the job's GPU, else 24 GB."
          onChange={(e) => setBudgetText(e.target.value)} />
      </div>
    }>
      <div data-testid="memory-plan">
        {runningFor !== null || (asked && !waiting && !answer) ? (
          <p className="plan-running" data-testid="plan-running">
            <span className="spinner" aria-hidden="true" /> planning{stale || answer ? " again" : ""}…
            {runningFor !== null ? ` ${runningFor} s` : ""}
            <span className="muted small"> (the model is built without weights and one training step is traced)</span>
          </p>
        ) : null}
        {waiting && !answer ? <p className="muted">The plan follows once the job is valid.</p> : null}
        {!asked ? (
          <p>
            <button type="button" className="btn" data-testid="plan-start" onClick={() => setAsked(true)}>Plan GPU memory</button>
            <span className="muted small"> what a run of this job needs on the GPU, before it starts</span>
          </p>
        ) : null}
        {answer ? (
          <div className={stale ? "plan-stale" : ""}>
            {answer.ok ? (
              <PlanView plan={answer.plan} budget={answer.budget} suggested={answer.suggested}
                onApply={onApply} applyHint={applyHint} seconds={answer.cached ? null : answer.seconds} />
            ) : (
              <div data-testid="plan-error">
                <ErrorBox message={`No memory plan: ${answer.error}`} problems={answer.problems} />
                <button type="button" className="btn btn-small" onClick={() => setAttempt((a) => a + 1)}>Plan again</button>
              </div>
            )}
          </div>
        ) : null}
      </div>
    </Card>
  );
}

/** The plan of a stored job (its page): Apply saves the suggestion into the job, unless it is queued. A
 * completed job is planned on request only (it has run; its page is visited for the results). */
export function StoredJobPlan({ job, yaml, onChange }: { job: Job; yaml: string; onChange: () => void }) {
  const editable = !["queued", "running", "stopping"].includes(job.status);
  const apply = async (suggested: Suggested) => {
    await api.put(`/api/jobs/${job.id}`, { yaml: suggested.yaml });
    onChange();
  };
  return (
    <MemoryPlanCard source={{ kind: "job", jobId: job.id, version: `${job.gpu_ids}\n${yaml}` }}
      onApply={editable ? apply : undefined} auto={job.status !== "completed"}
      applyHint={editable ? undefined : "Remove the job from the queue (Stop) to change its settings, then apply."} />
  );
}

function Verdict({ plan, budget }: { plan: MemoryPlan; budget: PlanBudget }) {
  const where = budget.gpu ? `GPU ${budget.gpu.index} (${budget.gpu.name})` : budget.source === "set" ? "the budget set" : "the default budget";
  if (plan.fits === null) return null;
  return plan.fits ? (
    <div className="plan-verdict plan-fits" data-testid="plan-verdict" data-fits="true">
      ✓ fits in {bytes(budget.bytes)} of {where}, {bytes(budget.bytes - plan.peak_device)} to spare
    </div>
  ) : (
    <div className="plan-verdict plan-nofit" data-testid="plan-verdict" data-fits="false">
      ✗ does not fit in {bytes(budget.bytes)} of {where}: it needs {bytes(plan.peak_device)},{" "}
      {bytes(plan.peak_device - budget.bytes)} more. A run would stop with an out-of-memory error.
    </div>
  );
}

function SplitBar({ split, peak, budget }: { split: DeviceSplit; peak: number; budget: number }) {
  const scale = Math.max(peak, budget, 1);
  return (
    <div className="plan-bar" aria-hidden="true">
      {SEGMENTS.map((seg) => (split[seg.key] > 0 ? (
        <span key={seg.key} className={`plan-seg plan-seg-${seg.key}`} style={{ width: `${(split[seg.key] / scale) * 100}%` }}
          title={`${seg.label}: ${bytes(split[seg.key])}`} />
      ) : null))}
      <span className="plan-budget-mark" style={{ left: `${Math.min(1, budget / scale) * 100}%` }} title={`budget ${bytes(budget)}`} />
    </div>
  );
}

function PlanView({ plan, budget, suggested, onApply, applyHint, seconds }: {
  plan: MemoryPlan;
  budget: PlanBudget;
  suggested: { yaml: string | null; config: JobConfig | null; problems: string[] } | null;
  onApply?: (suggested: Suggested) => Promise<void> | void;
  applyHint?: string;
  seconds: number | null;
}) {
  const [applying, setApplying] = useState(false);
  const [applyError, setApplyError] = useState<string | null>(null);
  const split = plan.step;
  const parts = Object.entries(plan.weights_by_part).filter(([, v]) => v > 0).map(([k, v]) => `${k} ${bytes(v)}`).join(", ");
  const otherPhases = Object.entries(plan.phases).filter(([k]) => k !== "training step");
  const host = Object.entries(plan.host).filter(([, v]) => v > 0).map(([k, v]) => `${k} ${bytes(v)}`).join(", ");
  const apply = async () => {
    if (!onApply || !suggested?.yaml) return;
    setApplying(true);
    setApplyError(null);
    try {
      await onApply({ yaml: suggested.yaml, config: suggested.config });
    } catch (err) {
      setApplyError(messageOf(err));
    } finally {
      setApplying(false);
    }
  };

  return (
    <>
      <div className="plan-head">
        <div>
          <span className="plan-peak" data-testid="plan-peak">{bytes(plan.peak_device)}</span>
          <span className="muted"> GPU peak ({plan.peak_phase}) · host peak {bytes(plan.peak_host)}</span>
        </div>
        <Verdict plan={plan} budget={budget} />
      </div>
      {budget.source !== "set" && budget.note ? <p className="muted small">Budget: {budget.note}.</p> : null}
      <SplitBar split={split} peak={plan.peak_device} budget={budget.bytes} />
      <table className="plan-split" data-testid="plan-split">
        <tbody>
          {SEGMENTS.map((seg) => (
            <tr key={seg.key}>
              <td><span className={`plan-swatch plan-seg-${seg.key}`} />{seg.label}</td>
              <td className="num">{bytes(split[seg.key])}</td>
              <td className="muted small">
                {seg.key === "weights" && parts ? parts
                  : seg.key === "trainable" ? `${plan.trainable_parameters.toLocaleString()} parameters`
                  : seg.hint}
              </td>
            </tr>
          ))}
          <tr className="plan-total"><td>training step</td><td className="num">{bytes(split.total)}</td><td /></tr>
          {otherPhases.map(([name, value]) => (
            <tr key={name}><td>{name}</td><td className="num">{bytes(value)}</td><td className="muted small">another phase of the run</td></tr>
          ))}
          <tr><td>host (RAM)</td><td className="num">{bytes(plan.peak_host)}</td><td className="muted small">{host}</td></tr>
        </tbody>
      </table>
      <p className="muted small">
        {plan.model} ({plan.arch}), {Object.entries(plan.setup).map(([k, v]) => `${k} ${v}`).join(" · ")} ·{" "}
        {flops(plan.flops_per_step)} per step{seconds !== null ? ` · planned in ${seconds.toFixed(1)} s` : ""}
      </p>
      {plan.notes.length ? <ul className="small plan-notes">{plan.notes.map((n) => <li key={n}>{n}</li>)}</ul> : null}

      {plan.fits === false ? (
        <div className="plan-fix" data-testid="plan-suggestion">
          {plan.suggestion_yaml ? (
            <>
              <p>
                <strong>Settings that fit</strong> (planned peak {bytes(plan.suggestion_peak)}); the cheapest found, changed
                in the job:
              </p>
              <pre className="code">{plan.suggestion_yaml}</pre>
              {suggested?.problems.length ? (
                <ErrorBox message="The suggestion cannot be applied as is:" problems={suggested.problems} />
              ) : onApply ? (
                <button type="button" className="btn btn-primary" data-testid="plan-apply" disabled={applying} onClick={() => void apply()}>
                  {applying ? "Applying…" : "Apply to the job"}
                </button>
              ) : applyHint ? <p className="muted small">{applyHint}</p> : null}
              {applyError ? <ErrorBox message={applyError} /> : null}
            </>
          ) : (
            <p>{plan.suggestion_note ?? "No setting found that fits this budget."}</p>
          )}
        </div>
      ) : null}

      <details className="plan-not-counted" data-testid="plan-not-counted">
        <summary>What the plan does not count ({plan.not_counted.length})</summary>
        <ul className="small">{plan.not_counted.map((n) => <li key={n}>{n}</li>)}</ul>
      </details>
    </>
  );
}
