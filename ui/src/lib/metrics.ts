// Metrics of a job, kept fresh while it runs: one full answer (downsampled by the server), then
// only the lines after the last step (`since_step`) appended every few seconds, and a full answer
// again now and then so the downsampling and the trend line stay right.
import { useEffect, useState } from "react";
import { api, messageOf } from "./api";
import type { MetricSeries, MetricsAnswer } from "./types";

const POINTS = 800;
const FULL_EVERY_MS = 20_000;
const POLL_MS = 2_000;

export function seriesKey(field: string, expert: string | null): string {
  return `${field}|${expert ?? ""}`;
}

/** Trend buckets: about one per eight steps on short runs, 50 on long ones. */
function trendPoints(rows: number): number {
  return Math.max(5, Math.min(50, Math.floor(rows / 8)));
}

function append(old: MetricSeries, extra: MetricSeries): MetricSeries {
  const last = old.step.length ? (old.step[old.step.length - 1] as number) : -Infinity;
  const step = [...old.step];
  const value = [...old.value];
  extra.step.forEach((s, i) => {
    if (s > last) {
      step.push(s);
      value.push(extra.value[i] ?? null);
    }
  });
  return { ...old, count: old.count + extra.count, step, value };
}

export function mergeMetrics(current: MetricsAnswer, next: MetricsAnswer): MetricsAnswer {
  const byKey = new Map(current.series.map((s) => [seriesKey(s.field, s.expert), s]));
  for (const s of next.series) {
    const key = seriesKey(s.field, s.expert);
    const old = byKey.get(key);
    byKey.set(key, old ? append(old, s) : s);
  }
  return {
    ...next,
    first_step: current.first_step ?? next.first_step,
    series: [...byKey.values()],
    latest: Object.keys(next.latest).length ? next.latest : current.latest,
  };
}

export function useMetrics(jobId: number, live: boolean): { data: MetricsAnswer | null; error: string | null } {
  const [data, setData] = useState<MetricsAnswer | null>(null);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    let cancelled = false;
    let timer: number | undefined;
    let current: MetricsAnswer | null = null;
    let fullAt = 0;
    let appended = 0;
    const base = `/api/jobs/${jobId}/metrics?points=${POINTS}`;

    const full = async (): Promise<MetricsAnswer> => {
      let answer = await api.get<MetricsAnswer>(`${base}&trend_points=${trendPoints(current?.rows ?? 400)}`);
      const wanted = trendPoints(answer.rows);
      if (wanted !== trendPoints(current?.rows ?? 400) && answer.rows > 0) {
        answer = await api.get<MetricsAnswer>(`${base}&trend_points=${wanted}`);
      }
      fullAt = Date.now();
      appended = 0;
      return answer;
    };

    const tick = async () => {
      try {
        if (!current || current.last_step === null || !current.complete || appended > POINTS
            || Date.now() - fullAt > FULL_EVERY_MS) {
          current = await full();
        } else {
          const next = await api.get<MetricsAnswer>(`${base}&since_step=${current.last_step}`);
          const rewritten = next.rows < current.rows || (next.last_step ?? -1) < (current.last_step ?? -1)
            || next.first_step !== current.first_step;
          if (rewritten) current = await full();
          else {
            appended += next.rows - current.rows;
            current = mergeMetrics(current, next);
          }
        }
        if (!cancelled) {
          setData(current);
          setError(null);
        }
      } catch (err) {
        if (!cancelled) setError(messageOf(err));
      }
      // a partial answer (the server was still reading a large file) is completed even when not live
      const again = live || (current !== null && !current.complete);
      if (!cancelled && again) timer = window.setTimeout(tick, document.hidden ? POLL_MS * 5 : POLL_MS);
    };
    tick();
    return () => {
      cancelled = true;
      if (timer !== undefined) window.clearTimeout(timer);
    };
  }, [jobId, live]);

  return { data, error };
}
