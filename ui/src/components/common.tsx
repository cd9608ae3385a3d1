import { useState, type ReactNode } from "react";
import type { JobStatus } from "../lib/types";

export function StatusBadge({ status, runState }: { status: JobStatus | string; runState?: string | null }) {
  const detail = runState && runState !== status && (status === "running" || status === "stopping") ? runState : null;
  return (
    <span className={`badge badge-${status}`} data-testid="job-status" data-status={status}>
      {status}
      {detail ? <span className="badge-detail"> · {detail}</span> : null}
    </span>
  );
}

export function ProgressBar({ value, label }: { value: number | null | undefined; label?: string }) {
  const fraction = value === null || value === undefined ? 0 : Math.max(0, Math.min(1, value));
  return (
    <div className="progress" role="progressbar" aria-valuemin={0} aria-valuemax={100}
      aria-valuenow={Math.round(fraction * 100)} aria-label={label ?? "progress"}>
      <div className="progress-fill" style={{ width: `${fraction * 100}%` }} />
      {label ? <span className="progress-label">{label}</span> : null}
    </div>
  );
}

export function ErrorBox({ message, problems, warnings }: { message?: string | null; problems?: string[]; warnings?: string[] }) {
  if (!message && !problems?.length && !warnings?.length) return null;
  return (
    <div className={message || problems?.length ? "alert alert-error" : "alert alert-warn"} role="alert">
      {message ? <div>{message}</div> : null}
      {problems?.length ? (
        <ul className="problems">{problems.map((p) => <li key={p}>{p}</li>)}</ul>
      ) : null}
      {warnings?.length ? (
        <ul className="warnings">{warnings.map((w) => <li key={w}>⚠ {w}</li>)}</ul>
      ) : null}
    </div>
  );
}

export function Card({ title, children, actions, className }: {
  title?: ReactNode; children: ReactNode; actions?: ReactNode; className?: string;
}) {
  return (
    <section className={`card ${className ?? ""}`}>
      {title || actions ? (
        <header className="card-head">
          {title ? <h2>{title}</h2> : <span />}
          {actions ? <div className="card-actions">{actions}</div> : null}
        </header>
      ) : null}
      {children}
    </section>
  );
}

export function Stat({ label, value, hint, tone }: { label: string; value: ReactNode; hint?: ReactNode; tone?: "ok" | "bad" | "" }) {
  return (
    <div className={`stat ${tone ? `stat-${tone}` : ""}`}>
      <div className="stat-label">{label}</div>
      <div className="stat-value">{value}</div>
      {hint ? <div className="stat-hint">{hint}</div> : null}
    </div>
  );
}

/** A button that asks again in place ("Delete?" -> Yes / No) before acting. */
export function ConfirmButton({ label, question, onConfirm, disabled, className, extra }: {
  label: string;
  question: string;
  onConfirm: (extraChecked: boolean) => void;
  disabled?: boolean;
  className?: string;
  extra?: string; // a checkbox offered with the question
}) {
  const [asking, setAsking] = useState(false);
  const [checked, setChecked] = useState(false);
  if (!asking) {
    return (
      <button type="button" className={className ?? "btn btn-danger"} disabled={disabled} onClick={() => setAsking(true)}>
        {label}
      </button>
    );
  }
  return (
    <span className="confirm">
      <span>{question}</span>
      {extra ? (
        <label className="inline">
          <input type="checkbox" checked={checked} onChange={(e) => setChecked(e.target.checked)} /> {extra}
        </label>
      ) : null}
      <button type="button" className="btn btn-danger" onClick={() => { setAsking(false); onConfirm(checked); }}>
        Yes, {label.toLowerCase()}
      </button>
      <button type="button" className="btn" onClick={() => setAsking(false)}>Cancel</button>
    </span>
  );
}

export function Tabs<T extends string>({ tabs, active, onChange }: {
  tabs: { id: T; label: string }[]; active: T; onChange: (id: T) => void;
}) {
  return (
    <nav className="tabs" role="tablist">
      {tabs.map((tab) => (
        <button key={tab.id} type="button" role="tab" aria-selected={tab.id === active}
          className={tab.id === active ? "tab tab-active" : "tab"} onClick={() => onChange(tab.id)}>
          {tab.label}
        </button>
      ))}
    </nav>
  );
}

export function Loading({ what }: { what?: string }) {
  return <p className="muted">Loading{what ? ` ${what}` : ""}…</p>;
}

export function Empty({ children }: { children: ReactNode }) {
  return <div className="empty">{children}</div>;
}
