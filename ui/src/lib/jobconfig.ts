// Job files as plain data: reading and writing a value at a path, problem messages mapped to
// paths and YAML lines, a YAML writer for the form -> editor switch, and the alpha schedule's
// phase rules for the metrics page.
import type { JobConfig } from "./types";

export type Path = (string | number)[];
type Obj = Record<string, unknown>;

export function isObject(value: unknown): value is Obj {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

export function getAt(root: unknown, path: Path): unknown {
  let node: unknown = root;
  for (const key of path) {
    if (Array.isArray(node) && typeof key === "number") node = node[key];
    else if (isObject(node) && typeof key === "string") node = node[key];
    else return undefined;
  }
  return node;
}

/** A copy of `root` with `value` at `path` (undefined removes the key); missing parents are made. */
export function setAt<T>(root: T, path: Path, value: unknown): T {
  if (path.length === 0) return value as T;
  const [key, ...rest] = path as [string | number, ...Path];
  if (typeof key === "number") {
    const list = Array.isArray(root) ? [...root] : [];
    if (value === undefined && rest.length === 0) list.splice(key, 1);
    else list[key] = setAt(list[key], rest, value);
    return list as T;
  }
  const obj: Obj = isObject(root) ? { ...root } : {};
  if (value === undefined && rest.length === 0) delete obj[key];
  else obj[key] = setAt(obj[key], rest, value);
  return obj as T;
}

/** "config.process.0.train.steps": the form's field ids and the tests' selectors. */
export function pathKey(path: Path): string {
  return path.join(".");
}

export interface Problem {
  text: string;
  path: Path | null;
  line: number | null;
}

const PATH_RE = /^([A-Za-z_][\w-]*(?:\[\d+\]|\.[\w-]+)*):\s/;

/** A loader message ("config.process[0].train.steps: ...", "line 3, column 1: ...") and where it points. */
export function parseProblem(text: string): Problem {
  const line = /^line (\d+)/.exec(text);
  if (line) return { text, path: null, line: Number(line[1]) };
  const found = PATH_RE.exec(text);
  if (!found || !found[1]) return { text, path: null, line: null };
  const path: Path = [];
  for (const part of found[1].split(".")) {
    const m = /^([^[]+)((?:\[\d+\])*)$/.exec(part);
    if (!m || !m[1]) return { text, path: null, line: null };
    path.push(m[1]);
    for (const index of (m[2] ?? "").matchAll(/\[(\d+)\]/g)) path.push(Number(index[1]));
  }
  return { text, path, line: null };
}

// ---------------------------------------------------------------------------------- YAML out

const RESERVED = /^(true|false|yes|no|on|off|null|~|y|n)$/i;
const PLAIN = /^[A-Za-z_/][A-Za-z0-9_ ./,()+@=-]*$/;

function scalar(value: unknown): string {
  if (value === null || value === undefined) return "null";
  if (typeof value === "boolean") return value ? "true" : "false";
  if (typeof value === "number") {
    if (Number.isNaN(value)) return ".nan";
    if (!Number.isFinite(value)) return value > 0 ? ".inf" : "-.inf";
    const text = String(value);
    // YAML 1.1 (PyYAML) reads 1e-07 as a string: it wants a dot in the mantissa
    return /e/.test(text) && !/\./.test(text) ? text.replace("e", ".0e") : text;
  }
  const text = String(value);
  if (text === "") return '""';
  if (PLAIN.test(text) && !RESERVED.test(text) && !text.endsWith(" ") && !/ #|: /.test(text)) return text;
  return JSON.stringify(text); // a JSON string is a valid double-quoted YAML scalar
}

function key(name: string): string {
  return PLAIN.test(name) && !RESERVED.test(name) && !name.includes(" ") ? name : JSON.stringify(name);
}

function nonEmpty(value: unknown): boolean {
  return (Array.isArray(value) && value.length > 0) || (isObject(value) && Object.keys(value).length > 0);
}

function render(value: unknown, level: number): string[] {
  const pad = "  ".repeat(level);
  if (Array.isArray(value)) {
    if (value.length === 0) return [`${pad}[]`];
    const out: string[] = [];
    for (const item of value) {
      if (nonEmpty(item)) {
        const inner = render(item, level + 1);
        inner[0] = `${pad}- ${(inner[0] ?? "").slice(pad.length + 2)}`;
        out.push(...inner);
      } else {
        out.push(`${pad}- ${Array.isArray(item) ? "[]" : isObject(item) ? "{}" : scalar(item)}`);
      }
    }
    return out;
  }
  if (isObject(value)) {
    const entries = Object.entries(value).filter(([, v]) => v !== undefined);
    if (entries.length === 0) return [`${pad}{}`];
    const out: string[] = [];
    for (const [k, v] of entries) {
      if (nonEmpty(v)) {
        out.push(`${pad}${key(k)}:`);
        out.push(...render(v, level + 1));
      } else {
        out.push(`${pad}${key(k)}: ${Array.isArray(v) ? "[]" : isObject(v) ? "{}" : scalar(v)}`);
      }
    }
    return out;
  }
  return [pad + scalar(value)];
}

export function toYaml(value: unknown): string {
  return `${render(value, 0).join("\n")}\n`;
}

// ---------------------------------------------------------------------------------- YAML lines

interface LineInfo {
  indent: number; // column of the first character (the dash on list lines)
  dash: boolean;
  keyCol: number; // column of the content after the dashes
  key: string | null;
}

const KEY_RE = /^(?:"([^"]*)"|'([^']*)'|([^\s:#'"][^:#]*?))\s*:(?:\s|$)/;

function lineInfo(line: string): LineInfo | null {
  const m = /^( *)((?:- +)*)(.*)$/.exec(line);
  if (!m) return null;
  const indent = (m[1] ?? "").length;
  const dashes = m[2] ?? "";
  const rest = (m[3] ?? "").trimEnd();
  if (!dashes && (rest === "" || rest.startsWith("#"))) return null;
  const k = KEY_RE.exec(rest);
  return { indent, dash: dashes.length > 0, keyCol: indent + dashes.length, key: k ? (k[1] ?? k[2] ?? k[3] ?? null) : null };
}

/**
 * The 1-based line of `path` in a YAML text written in block style (as people write job files),
 * or of its deepest part that is there; null when not even the first part is found.
 */
export function yamlLineOf(text: string, path: Path): number | null {
  const infos = text.split("\n").map(lineInfo);
  let from = 0;
  let to = infos.length;
  let best: number | null = null;
  for (const segment of path) {
    const inRange: [number, LineInfo][] = [];
    for (let i = from; i < to; i++) {
      const info = infos[i];
      if (info) inRange.push([i, info]);
    }
    if (inRange.length === 0) break;
    if (typeof segment === "number") {
      const col = Math.min(...inRange.map(([, info]) => info.indent));
      const starts = inRange.filter(([, info]) => info.dash && info.indent === col).map(([i]) => i);
      const start = starts[segment];
      if (start === undefined) break;
      best = start + 1;
      from = start;
      to = starts[segment + 1] ?? to;
    } else {
      const keyed = inRange.filter(([, info]) => info.key !== null);
      if (keyed.length === 0) break;
      const col = Math.min(...keyed.map(([, info]) => info.keyCol));
      const hit = keyed.find(([, info]) => info.key === segment && info.keyCol === col);
      if (!hit) break;
      const [at, info] = hit;
      best = at + 1;
      let end = at + 1;
      while (end < to) {
        const next = infos[end];
        if (next && (next.indent < info.keyCol || (next.indent === info.keyCol && !next.dash))) break;
        end++;
      }
      from = at + 1;
      to = end;
    }
  }
  return best;
}

// ---------------------------------------------------------------------------------- alpha schedule

export interface PhaseRule {
  name: string;
  alpha: number | null;
  minSteps: number;
  last: boolean;
  // exit criteria (not for the last phase, which never exits)
  slopeBelow: number | null;
  minStability: number | null;
  minR2: number | null;
  maxCv: number | null;
  minSamples: number | null;
}

// ExitCriteria / AlphaPhase defaults of the job schema (GET /api/schema)
const DEFAULT_MIN_STEPS = 500;
const DEFAULT_SLOPE = 0.001;
const DEFAULT_STABILITY = 0.55;
const DEFAULT_SAMPLES = 100;

function numberOr(value: unknown, fallback: number | null): number | null {
  return typeof value === "number" && Number.isFinite(value) ? value : fallback;
}

export function firstProcess(job: JobConfig | null | undefined): Obj | null {
  const process = getAt(job, ["config", "process", 0]);
  return isObject(process) ? process : null;
}

function phaseMap(schedule: Obj): Obj | null {
  for (const name of ["conv_alpha_phases", "alpha_phases", "linear_alpha_phases"]) {
    const map = schedule[name];
    if (isObject(map) && Object.keys(map).length > 0) return map;
  }
  return null;
}

/** The phases of the job's alpha schedule (with an expert's overrides), or null when it is off. */
export function phaseRules(job: JobConfig | null | undefined, expert: string | null = null): PhaseRule[] | null {
  const schedule = getAt(firstProcess(job), ["network", "alpha_schedule"]);
  if (!isObject(schedule) || schedule.enabled !== true) return null;
  const base = phaseMap(schedule);
  if (!base) return null;
  const override = expert ? getAt(schedule, ["per_expert", expert]) : undefined;
  const own = isObject(override) ? phaseMap(override) : null;
  const names = Object.keys(own ?? base);
  return names.map((name, i) => {
    const a = isObject(base[name]) ? (base[name] as Obj) : {};
    const b = own && isObject(own[name]) ? (own[name] as Obj) : {};
    const exitA = isObject(a.exit_criteria) ? a.exit_criteria : {};
    const exitB = isObject(b.exit_criteria) ? b.exit_criteria : {};
    const exit: Obj = { ...exitA, ...exitB };
    const last = i === names.length - 1;
    return {
      name,
      alpha: numberOr(b.alpha ?? a.alpha ?? b.linear_alpha ?? a.linear_alpha, null),
      minSteps: numberOr(b.min_steps ?? a.min_steps, DEFAULT_MIN_STEPS) ?? DEFAULT_MIN_STEPS,
      last,
      slopeBelow: last ? null : numberOr(exit.loss_improvement_rate_below, DEFAULT_SLOPE),
      minStability: last ? null : numberOr(exit.min_gradient_stability, DEFAULT_STABILITY),
      minR2: last ? null : numberOr(exit.min_loss_r2, null),
      maxCv: last ? null : numberOr(exit.max_loss_cv, null),
      minSamples: last ? null : numberOr(exit.min_samples, DEFAULT_SAMPLES),
    };
  });
}
