// A plain SVG line chart: several series over training steps, shaded bands, marked steps, a
// hover read-out and a legend that hides and shows series. No chart library.
import { useMemo, useState, type MouseEvent } from "react";
import { useWidth } from "../lib/hooks";
import { num } from "../lib/format";

export interface ChartSeries {
  key: string;
  label: string;
  color: string;
  steps: number[];
  values: (number | null)[];
  width?: number;
  opacity?: number;
  dash?: string;
  stepped?: boolean;
}

export interface ChartBand {
  x0: number;
  x1: number;
  y0: number;
  y1: number;
  color: string;
  label?: string;
}

export interface ChartMarker {
  x: number;
  label: string;
}

interface Props {
  series: ChartSeries[];
  bands?: ChartBand[];
  markers?: ChartMarker[];
  height?: number;
  xDomain?: [number, number];
  yDomain?: [number | null, number | null];
  markerLabels?: boolean;
  formatY?: (value: number) => string;
  testId?: string;
  emptyText?: string;
}

const MARGIN = { left: 58, right: 14, top: 14, bottom: 26 };

export function niceTicks(lo: number, hi: number, count: number): number[] {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / Math.max(1, count);
  const power = 10 ** Math.floor(Math.log10(raw));
  const unit = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw) ?? raw;
  const ticks: number[] = [];
  for (let t = Math.ceil(lo / unit) * unit; t <= hi + unit * 1e-9; t += unit) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

function nearestIndex(steps: number[], step: number): number {
  let lo = 0;
  let hi = steps.length - 1;
  if (hi < 0) return -1;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if ((steps[mid] as number) < step) lo = mid + 1;
    else hi = mid;
  }
  if (lo > 0 && Math.abs((steps[lo - 1] as number) - step) <= Math.abs((steps[lo] as number) - step)) return lo - 1;
  return lo;
}

export function LineChart({ series, bands = [], markers = [], height = 220, xDomain, yDomain, formatY = num, testId, emptyText, markerLabels = true }: Props) {
  const [ref, width] = useWidth<HTMLDivElement>();
  const [hidden, setHidden] = useState<Set<string>>(new Set());
  const [hover, setHover] = useState<number | null>(null);
  const shown = useMemo(() => series.filter((s) => !hidden.has(s.key)), [series, hidden]);

  const scale = useMemo(() => {
    let xMin = Infinity;
    let xMax = -Infinity;
    let yMin = Infinity;
    let yMax = -Infinity;
    for (const s of shown) {
      s.steps.forEach((step, i) => {
        const v = s.values[i];
        if (v === null || v === undefined || !Number.isFinite(v)) return;
        xMin = Math.min(xMin, step);
        xMax = Math.max(xMax, step);
        yMin = Math.min(yMin, v);
        yMax = Math.max(yMax, v);
      });
    }
    if (!Number.isFinite(xMin)) return null;
    if (xDomain) {
      xMin = Math.min(xMin, xDomain[0]);
      xMax = Math.max(xMax, xDomain[1]);
    }
    for (const band of bands) {
      if (band.x1 >= xMin && band.x0 <= xMax) {
        yMin = Math.min(yMin, band.y0);
        yMax = Math.max(yMax, Math.min(band.y1, Math.max(yMax, band.y0)));
      }
    }
    if (yDomain?.[0] !== null && yDomain?.[0] !== undefined) yMin = yDomain[0];
    if (yDomain?.[1] !== null && yDomain?.[1] !== undefined) yMax = yDomain[1];
    if (xMax === xMin) { xMin -= 1; xMax += 1; }
    if (yMax === yMin) { const pad = Math.abs(yMin) * 0.1 || 1; yMin -= pad; yMax += pad; }
    else if (!yDomain) { const pad = (yMax - yMin) * 0.05; yMin -= pad; yMax += pad; }
    const w = Math.max(10, width - MARGIN.left - MARGIN.right);
    const h = Math.max(10, height - MARGIN.top - MARGIN.bottom);
    const x = (step: number) => MARGIN.left + ((step - xMin) / (xMax - xMin)) * w;
    const y = (value: number) => MARGIN.top + (1 - (value - yMin) / (yMax - yMin)) * h;
    return { xMin, xMax, yMin, yMax, w, h, x, y };
  }, [shown, bands, xDomain, yDomain, width, height]);

  const paths = useMemo(() => {
    if (!scale) return [];
    return shown.map((s) => {
      let d = "";
      let pen = false;
      let lastY = 0;
      s.steps.forEach((step, i) => {
        const v = s.values[i];
        if (v === null || v === undefined || !Number.isFinite(v)) { pen = false; return; }
        const px = scale.x(step).toFixed(1);
        const py = scale.y(Math.max(scale.yMin, Math.min(scale.yMax, v))).toFixed(1);
        if (!pen) d += `M${px},${py}`;
        else if (s.stepped) d += `H${px}V${py}`;
        else d += `L${px},${py}`;
        pen = true;
        lastY = Number(py);
      });
      return { s, d, lastY };
    });
  }, [shown, scale]);

  const onMove = (event: MouseEvent<SVGRectElement>) => {
    if (!scale) return;
    const box = event.currentTarget.getBoundingClientRect();
    const fraction = (event.clientX - box.left) / box.width;
    setHover(scale.xMin + fraction * (scale.xMax - scale.xMin));
  };

  const toggle = (key: string) => setHidden((old) => {
    const next = new Set(old);
    if (next.has(key)) next.delete(key); else next.add(key);
    return next;
  });

  const readout = hover === null || !scale ? null : shown.map((s) => {
    const i = nearestIndex(s.steps, hover);
    return { s, step: i >= 0 ? s.steps[i] : undefined, value: i >= 0 ? s.values[i] : null };
  });
  const hoverStep = readout?.find((r) => r.step !== undefined)?.step;

  return (
    <div className="chart" data-testid={testId}>
      <div className="legend">
        {series.map((s) => (
          <button type="button" key={s.key} className={hidden.has(s.key) ? "legend-item legend-off" : "legend-item"}
            onClick={() => toggle(s.key)} title="show / hide">
            <span className="swatch" style={{ background: s.color, opacity: s.opacity ?? 1 }} />
            {s.label}
          </button>
        ))}
      </div>
      <div ref={ref} className="chart-area" style={{ height }}>
        {!scale ? (
          <div className="chart-empty">{emptyText ?? "No data yet."}</div>
        ) : width > 0 ? (
          <svg width={width} height={height} role="img" aria-label={series.map((s) => s.label).join(", ")}>
            {bands.map((band, i) => {
              const x0 = scale.x(Math.max(scale.xMin, band.x0));
              const x1 = scale.x(Math.min(scale.xMax, band.x1));
              const y0 = scale.y(Math.max(scale.yMin, Math.min(scale.yMax, band.y1)));
              const y1 = scale.y(Math.max(scale.yMin, Math.min(scale.yMax, band.y0)));
              if (x1 <= x0 || y1 <= y0) return null;
              return (
                <g key={`band${i}`} className="band">
                  <rect x={x0} y={y0} width={x1 - x0} height={y1 - y0} fill={band.color} />
                  <line x1={x0} x2={x1} y1={y1} y2={y1} stroke={band.color} className="band-edge" />
                  {band.label ? <text x={x0 + 4} y={y0 + 11} className="band-label">{band.label}</text> : null}
                </g>
              );
            })}
            {niceTicks(scale.yMin, scale.yMax, Math.max(2, Math.floor(scale.h / 40))).map((t) => (
              <g key={`y${t}`}>
                <line x1={MARGIN.left} x2={MARGIN.left + scale.w} y1={scale.y(t)} y2={scale.y(t)} className="grid" />
                <text x={MARGIN.left - 6} y={scale.y(t) + 4} className="tick" textAnchor="end">{formatY(t)}</text>
              </g>
            ))}
            {niceTicks(scale.xMin, scale.xMax, Math.max(2, Math.floor(scale.w / 90))).filter(Number.isInteger).map((t) => (
              <text key={`x${t}`} x={scale.x(t)} y={height - 8} className="tick" textAnchor="middle">{t}</text>
            ))}
            {markers.filter((m) => m.x >= scale.xMin && m.x <= scale.xMax).map((m, i) => {
              const x = scale.x(m.x);
              const right = x > MARGIN.left + scale.w * 0.6; // labels near the right edge go to the left of their line
              return (
                <g key={`m${i}`} className="marker">
                  <title>{`step ${m.x}: ${m.label}`}</title>
                  <line x1={x} x2={x} y1={MARGIN.top} y2={MARGIN.top + scale.h} />
                  {markerLabels ? (
                    <text x={right ? x - 3 : x + 3} y={MARGIN.top + 10 + (i % 4) * 11} textAnchor={right ? "end" : "start"}>{m.label}</text>
                  ) : null}
                </g>
              );
            })}
            {paths.map(({ s, d }) => (
              <path key={s.key} d={d} fill="none" stroke={s.color} strokeWidth={s.width ?? 1.5}
                strokeOpacity={s.opacity ?? 1} strokeDasharray={s.dash} strokeLinejoin="round" />
            ))}
            {hoverStep !== undefined ? (
              <line className="hover-line" x1={scale.x(hoverStep)} x2={scale.x(hoverStep)} y1={MARGIN.top} y2={MARGIN.top + scale.h} />
            ) : null}
            <rect x={MARGIN.left} y={MARGIN.top} width={scale.w} height={scale.h} fill="transparent"
              onMouseMove={onMove} onMouseLeave={() => setHover(null)} />
          </svg>
        ) : null}
        {readout && hoverStep !== undefined && scale ? (
          <div className="chart-tip" style={{ left: Math.min(scale.x(hoverStep) + 10, Math.max(0, width - 190)) }}>
            <div className="muted">step {hoverStep}</div>
            {readout.map(({ s, value }) => (
              <div key={s.key}><span className="swatch" style={{ background: s.color }} /> {s.label}: {num(value)}</div>
            ))}
          </div>
        ) : null}
      </div>
    </div>
  );
}
