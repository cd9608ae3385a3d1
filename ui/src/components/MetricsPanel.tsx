// The metrics tab: statistics cards (spec/metrics.md) and charts of loss (with its trend and per
// expert), gradient stability (with the schedule's target band), learning rate, alpha and phase
// (transitions marked), and speed.
import { useMemo, useState } from "react";
import { LineChart, type ChartBand, type ChartMarker, type ChartSeries } from "./LineChart";
import { Empty, ErrorBox, Loading, Stat } from "./common";
import { useMetrics, seriesKey } from "../lib/metrics";
import { phaseRules, type PhaseRule } from "../lib/jobconfig";
import { num } from "../lib/format";
import type { JobConfig, MetricSeries, MetricsAnswer, MetricsLine, Transition } from "../lib/types";

const EXPERT_COLORS = ["#d9480f", "#1971c2", "#2f9e44", "#9c36b5"];
const PHASE_FILLS = ["rgba(25,113,194,0.07)", "rgba(47,158,68,0.08)", "rgba(217,72,15,0.07)", "rgba(156,54,181,0.07)"];

function find(data: MetricsAnswer, field: string, expert: string | null): MetricSeries | undefined {
  return data.series.find((s) => seriesKey(s.field, s.expert) === seriesKey(field, expert));
}

function line(data: MetricsAnswer, field: string, expert: string | null, extra: Partial<ChartSeries> & { label: string; color: string }): ChartSeries[] {
  const s = find(data, field, expert);
  return s ? [{ key: `${field}|${expert ?? ""}`, steps: s.step, values: s.value, ...extra }] : [];
}

function trend(data: MetricsAnswer, field: string, expert: string | null, label: string, color: string): ChartSeries[] {
  const s = find(data, field, expert);
  return s && s.trend.step.length > 1
    ? [{ key: `${field}|${expert ?? ""}|trend`, label, color, steps: s.trend.step, values: s.trend.value, width: 2.5 }]
    : [];
}

function markersOf(transitions: Transition[], multi: boolean): ChartMarker[] {
  return transitions.map((t) => ({
    x: t.step,
    label: `${multi && t.expert ? `${t.expert}: ` : ""}${t.from_phase ?? "?"} → ${t.to_phase ?? "?"}`,
  }));
}

interface Segment {
  from: number;
  to: number;
  phase: string | null;
}

/** The run cut at the transitions of one expert (null: single-model runs). */
function segments(data: MetricsAnswer, expert: string | null, rules: PhaseRule[] | null): Segment[] {
  const first = data.first_step ?? 0;
  const last = data.last_step ?? first;
  const own = data.transitions.filter((t) => (t.expert ?? null) === expert).sort((a, b) => a.step - b.step);
  const out: Segment[] = [];
  let from = first;
  let phase: string | null = own[0]?.from_phase ?? rules?.[0]?.name ?? null;
  for (const t of own) {
    out.push({ from, to: t.step, phase });
    from = t.step;
    phase = t.to_phase;
  }
  out.push({ from, to: last, phase });
  return out;
}

/** The target band of each phase that has one (the last phase never exits: no target). */
function stabilityBands(data: MetricsAnswer, job: JobConfig | null, experts: (string | null)[]): ChartBand[] {
  const labelled = new Set<number>();
  return experts.flatMap((expert) => {
    const rules = phaseRules(job, expert);
    if (!rules) return [];
    return segments(data, expert, rules).flatMap((seg) => {
      const rule = rules.find((r) => r.name === seg.phase);
      if (!rule || rule.minStability === null) return [];
      const first = !labelled.has(rule.minStability);
      labelled.add(rule.minStability);
      return [{ x0: seg.from, x1: seg.to, y0: rule.minStability, y1: 1, color: "rgba(47,158,68,0.12)",
        label: first ? `target ≥ ${rule.minStability}` : undefined }];
    });
  });
}

function phaseBands(data: MetricsAnswer, job: JobConfig | null, expert: string | null, yTop: number): ChartBand[] {
  const rules = phaseRules(job, expert);
  return segments(data, expert, rules).map((seg, i) => ({
    x0: seg.from, x1: seg.to, y0: 0, y1: yTop, color: PHASE_FILLS[i % PHASE_FILLS.length] as string,
    label: seg.phase ?? undefined,
  }));
}

function value(line: MetricsLine | undefined, field: string): number | null {
  const v = line?.[field];
  return typeof v === "number" && Number.isFinite(v) ? v : null;
}

function check(ok: boolean | null, text: string): { hint: string; tone: "ok" | "bad" | "" } {
  return { hint: text, tone: ok === null ? "" : ok ? "ok" : "bad" };
}

/** The statistics cards of one series of lines (all, or one expert), measured against the phase's exit criteria. */
function StatCards({ latest, rules, title }: { latest: MetricsLine; rules: PhaseRule[] | null; title: string }) {
  const phase = typeof latest.phase === "string" ? latest.phase : null;
  const rule = rules?.find((r) => r.name === phase) ?? null;
  const steps = value(latest, "steps_in_phase");
  const slope = value(latest, "loss_slope");
  const r2 = value(latest, "loss_r2");
  const cv = value(latest, "loss_cv");
  const samples = value(latest, "loss_samples");
  const stability = value(latest, "gradient_stability_avg");
  const exits = rule && !rule.last;
  const minSteps = exits && steps !== null ? check(steps >= rule.minSteps, `min ${rule.minSteps}`) : { hint: rule?.last ? "last phase" : "", tone: "" as const };
  const slopeOk = exits && rule.slopeBelow !== null ? check(slope === null ? null : Math.abs(slope) <= rule.slopeBelow, `|slope| ≤ ${num(rule.slopeBelow)}`) : { hint: "", tone: "" as const };
  const r2Ok = exits && rule.minR2 !== null ? check(r2 === null ? null : r2 >= rule.minR2, `≥ ${num(rule.minR2)}`) : { hint: "", tone: "" as const };
  const cvOk = exits && rule.maxCv !== null ? check(cv === null ? null : cv < rule.maxCv, `< ${num(rule.maxCv)}`) : { hint: "", tone: "" as const };
  const samplesOk = exits && rule.minSamples !== null ? check(samples === null ? null : samples >= rule.minSamples, `min ${rule.minSamples}`) : { hint: "", tone: "" as const };
  const stabilityOk = exits && rule.minStability !== null ? check(stability === null ? null : stability >= rule.minStability, `target ≥ ${rule.minStability}`) : { hint: "", tone: "" as const };
  return (
    <div className="stats-block" data-testid="metric-cards">
      <h3>{title} <span className="muted">step {String(latest.step ?? "–")}</span></h3>
      <div className="stats">
        <Stat label="loss" value={num(value(latest, "loss"))} />
        <Stat label="learning rate" value={num(value(latest, "learning_rate"))} />
        <Stat label="grad norm" value={num(value(latest, "grad_norm"))} />
        <Stat label="gradient stability (avg)" value={num(stability, 3)} {...stabilityOk} />
        {latest.alpha_enabled ? (
          <>
            <Stat label="phase" value={phase ?? "–"} hint={latest.phase_idx !== undefined ? `#${String(latest.phase_idx)}` : undefined} />
            <Stat label="steps in phase" value={num(steps)} {...minSteps} />
            <Stat label="loss slope" value={num(slope)} {...slopeOk} />
            <Stat label="loss R²" value={num(r2, 3)} {...r2Ok} />
            <Stat label="loss CV" value={num(cv, 3)} {...cvOk} />
            <Stat label="loss samples" value={num(samples)} {...samplesOk} />
            <Stat label="linear alpha" value={num(value(latest, "linear_alpha"))} />
            <Stat label="conv alpha" value={num(value(latest, "conv_alpha"))} />
          </>
        ) : null}
      </div>
    </div>
  );
}

export function MetricsPanel({ jobId, live, job }: { jobId: number; live: boolean; job: JobConfig | null }) {
  const { data, error } = useMetrics(jobId, live);
  const [split, setSplit] = useState(true);

  const charts = useMemo(() => {
    if (!data) return null;
    const experts = data.experts;
    const multi = experts.length > 1;
    const perExpert = multi && split;
    const markers = markersOf(data.transitions, multi);
    const colorOf = (i: number) => EXPERT_COLORS[i % EXPERT_COLORS.length] as string;

    const loss: ChartSeries[] = perExpert
      ? experts.flatMap((e, i) => [
          ...line(data, "loss", e, { label: `loss ${e}`, color: colorOf(i), opacity: 0.35, width: 1 }),
          ...trend(data, "loss", e, `trend ${e}`, colorOf(i)),
        ])
      : [
          ...line(data, "loss", null, { label: "loss", color: "#1971c2", opacity: 0.4, width: 1 }),
          ...trend(data, "loss", null, "trend", "#d9480f"),
        ];

    const stabilitySeries: ChartSeries[] = perExpert
      ? experts.flatMap((e, i) => [
          ...line(data, "gradient_stability", e, { label: `stability ${e}`, color: colorOf(i), opacity: 0.3, width: 1 }),
          ...line(data, "gradient_stability_avg", e, { label: `average ${e}`, color: colorOf(i), width: 2.2 }),
        ])
      : [
          ...line(data, "gradient_stability", null, { label: "stability", color: "#868e96", opacity: 0.45, width: 1 }),
          ...line(data, "gradient_stability_avg", null, { label: "average (EMA-50)", color: "#2f9e44", width: 2.2 }),
        ];
    const bands = stabilityBands(data, job, perExpert ? experts : [multi ? (experts[0] ?? null) : null]);

    const lr = line(data, "learning_rate", null, { label: "learning rate", color: "#7048e8" });

    const alphaSeries: ChartSeries[] = perExpert
      ? experts.flatMap((e, i) => [
          ...line(data, "linear_alpha", e, { label: `linear alpha ${e}`, color: colorOf(i), stepped: true, width: 2 }),
          ...line(data, "conv_alpha", e, { label: `conv alpha ${e}`, color: colorOf(i), stepped: true, dash: "5 3" }),
        ])
      : [
          ...line(data, "linear_alpha", null, { label: "linear alpha", color: "#1971c2", stepped: true, width: 2 }),
          ...line(data, "conv_alpha", null, { label: "conv alpha", color: "#e8590c", stepped: true, dash: "5 3" }),
        ];
    const alphaTop = Math.max(1, ...alphaSeries.flatMap((s) => s.values.filter((v): v is number => v !== null))) * 1.15;
    const alphaBands = data.series.some((s) => s.field === "phase_idx")
      ? phaseBands(data, job, multi ? (experts[0] ?? null) : null, alphaTop)
      : [];

    const speed = line(data, "samples_per_s", null, { label: "samples / s", color: "#0c8599" });
    const xDomain: [number, number] = [data.first_step ?? 0, data.last_step ?? 0];
    return { loss, stabilitySeries, bands, lr, alphaSeries, alphaTop, alphaBands, speed, markers, multi, xDomain };
  }, [data, job, split]);

  if (error && !data) return <ErrorBox message={error} />;
  if (!data || !charts) return <Loading what="metrics" />;
  if (data.rows === 0) return <Empty>No metrics yet: the first line appears after the first training step.</Empty>;

  const rulesAll = phaseRules(job, null);
  // on multi-expert runs the cards of each expert say everything; "all" would repeat the last one
  const latestKeys = Object.keys(data.latest).filter((k) => !(k === "all" && data.experts.length > 1));
  return (
    <div className="metrics" data-testid="metrics">
      {!data.complete ? <p className="muted">Reading the metrics file… (partial)</p> : null}
      {latestKeys.map((key) => (
        <StatCards key={key} latest={data.latest[key] as MetricsLine} title={key === "all" ? "Latest" : `Expert ${key}`}
          rules={key === "all" ? rulesAll : phaseRules(job, key)} />
      ))}
      {charts.multi ? (
        <label className="inline">
          <input type="checkbox" checked={split} onChange={(e) => setSplit(e.target.checked)} /> split by expert
        </label>
      ) : null}
      <div className="chart-grid">
        <div className="chart-card">
          <h3>Loss <span className="muted small">(dashed lines: phase transitions)</span></h3>
          <LineChart testId="chart-loss" series={charts.loss} markers={charts.markers} xDomain={charts.xDomain} markerLabels={!charts.multi} />
        </div>
        <div className="chart-card">
          <h3>Gradient stability</h3>
          <LineChart testId="chart-stability" series={charts.stabilitySeries} bands={charts.bands} markers={charts.markers}
            xDomain={charts.xDomain} yDomain={[0, 1]} markerLabels={false} emptyText="No gradient stability reported." />
          {!rulesAll ? <p className="muted small">No target band: alpha scheduling is off for this job.</p> : null}
        </div>
        <div className="chart-card">
          <h3>Learning rate</h3>
          <LineChart testId="chart-lr" series={charts.lr} markers={charts.markers} xDomain={charts.xDomain} markerLabels={false} />
        </div>
        <div className="chart-card">
          <h3>Alpha and phase</h3>
          <LineChart testId="chart-alpha" series={charts.alphaSeries} bands={charts.alphaBands} markers={charts.markers}
            xDomain={charts.xDomain} yDomain={[0, charts.alphaTop]} emptyText="No alpha values: alpha scheduling is off for this job." />
        </div>
        <div className="chart-card">
          <h3>Speed</h3>
          <LineChart testId="chart-speed" series={charts.speed} height={160} xDomain={charts.xDomain} />
        </div>
      </div>
    </div>
  );
}
