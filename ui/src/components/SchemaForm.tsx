// The new-job form, generated from the job file's JSON schema (GET /api/schema). Each input edits
// one value of the job at its path; clearing an input removes the key, so the trainer's default
// applies (shown as the placeholder). Problems from /api/validate appear under their field.
import { useState, type ReactNode } from "react";
import { getAt, isObject, pathKey, setAt, type Path, type Problem } from "../lib/jobconfig";
import type { JobConfig, JsonSchema } from "../lib/types";

interface Ctx {
  root: JsonSchema;
  job: JobConfig;
  set: (path: Path, value: unknown) => void;
  problemsAt: (path: Path) => string[];
}

/** Fields the UI owns or that only old job files use: not in the form. */
const HIDDEN = new Set(["config.process.0.training_folder", "config.process.0.type"]);
const OPEN_SECTIONS = new Set(["model", "datasets", "train", "network", "sample", "save"]);
/** The process's sections in the order people fill them in; others follow in schema order. */
const SECTION_ORDER = ["model", "datasets", "network", "train", "sample", "save", "logging"];

function resolve(root: JsonSchema, schema: JsonSchema | undefined): JsonSchema {
  let s = schema ?? {};
  for (let i = 0; i < 10 && s.$ref; i++) {
    const name = s.$ref.split("/").pop() ?? "";
    s = { ...(root.$defs?.[name] ?? {}), ...s, $ref: undefined };
  }
  return s;
}

/** `anyOf: [X, null]` -> X (and that null is allowed). */
function unwrap(root: JsonSchema, schema: JsonSchema | undefined): { s: JsonSchema; nullable: boolean } {
  const s = resolve(root, schema);
  if (s.anyOf) {
    const options = s.anyOf.filter((o) => o.type !== "null");
    if (options.length === 1) {
      return { s: { ...resolve(root, options[0]), description: s.description, default: s.default, title: s.title }, nullable: true };
    }
  }
  return { s, nullable: false };
}

type Kind = "object" | "map" | "dict" | "objects" | "strings" | "numbers" | "int-or-list" | "enum" | "boolean" | "integer" | "number" | "string" | "json";

function kindOf(root: JsonSchema, s: JsonSchema): Kind {
  if (s.enum) return "enum";
  if (s.anyOf) {
    const types = s.anyOf.map((o) => resolve(root, o));
    if (types.some((t) => t.type === "integer") && types.some((t) => t.type === "array")) return "int-or-list";
    const enumOption = types.find((t) => t.enum);
    if (enumOption) return "enum";
    return "json";
  }
  if (s.type === "object") {
    if (s.properties) return "object";
    if (isObject(s.additionalProperties) && resolve(root, s.additionalProperties).properties) return "map";
    return "dict";
  }
  if (s.type === "array") {
    const items = resolve(root, s.items);
    if (items.properties) return "objects";
    if (items.type === "string") return "strings";
    if (items.type === "integer" || items.type === "number") return "numbers";
    return "json";
  }
  if (s.type === "boolean" || s.type === "integer" || s.type === "number" || s.type === "string") return s.type;
  return "json";
}

function label(name: string, s: JsonSchema): string {
  return s.title ?? name.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());
}

function defaultText(s: JsonSchema): string {
  if (s.default === undefined || s.default === null || s.default === "") return "";
  return typeof s.default === "object" ? JSON.stringify(s.default) : String(s.default);
}

function parseNumber(text: string, integer: boolean): number | string {
  const t = text.trim();
  if (!/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(t)) return text; // the server explains what is wrong
  const n = Number(t);
  return integer && !Number.isInteger(n) ? text : n;
}

function Field({ id, name, help, problems, children, wide }: {
  id: string; name: string; help?: string; problems: string[]; children: ReactNode; wide?: boolean;
}) {
  return (
    <div className={`field ${problems.length ? "field-bad" : ""} ${wide ? "field-wide" : ""}`}>
      <label htmlFor={id}>{name}</label>
      {children}
      {help ? <div className="help">{help}</div> : null}
      {problems.map((p) => <div key={p} className="field-problem">{p}</div>)}
    </div>
  );
}

/** A text input that keeps what is typed while the value it stands for is re-derived. */
function TextInput({ id, path, value, placeholder, onCommit, multiline }: {
  id: string; path: Path; value: string; placeholder?: string; onCommit: (text: string) => void; multiline?: boolean;
}) {
  const [draft, setDraft] = useState<string | null>(null);
  const shown = draft ?? value;
  const common = {
    id, "data-path": pathKey(path), value: shown, placeholder,
    onFocus: () => setDraft(value),
    onBlur: () => setDraft(null),
  };
  if (multiline) {
    return <textarea {...common} rows={Math.min(8, Math.max(2, shown.split("\n").length + 1))}
      onChange={(e) => { setDraft(e.target.value); onCommit(e.target.value); }} />;
  }
  return <input type="text" {...common} onChange={(e) => { setDraft(e.target.value); onCommit(e.target.value); }} />;
}

function ValueField({ ctx, path, name, schema }: { ctx: Ctx; path: Path; name: string; schema: JsonSchema }) {
  const { s, nullable } = unwrap(ctx.root, schema);
  const kind = kindOf(ctx.root, s);
  const id = `f-${pathKey(path)}`;
  const current = getAt(ctx.job, path);
  const problems = ctx.problemsAt(path);
  const help = s.description;
  const title = label(name, schema); // the property's own title: a $ref'd model's title names the class

  if (kind === "object") {
    return <ObjectSection ctx={ctx} path={path} name={title} schema={s} optional={nullable} help={help} />;
  }
  if (kind === "map") return <MapField ctx={ctx} path={path} name={title} schema={s} help={help} />;
  if (kind === "objects") return <ObjectList ctx={ctx} path={path} name={title} schema={s} help={help} />;

  let input: ReactNode;
  switch (kind) {
    case "boolean": {
      const checked = typeof current === "boolean" ? current : s.default === true;
      input = (
        <span className="check">
          <input id={id} data-path={pathKey(path)} type="checkbox" checked={checked}
            onChange={(e) => ctx.set(path, e.target.checked)} />
          <span className="muted small">{current === undefined ? "default" : ""}</span>
        </span>
      );
      break;
    }
    case "enum": {
      const options = (s.enum ?? s.anyOf?.flatMap((o) => resolve(ctx.root, o).enum ?? []) ?? []).map(String);
      input = (
        <select id={id} data-path={pathKey(path)} value={current === undefined || current === null ? "" : String(current)}
          onChange={(e) => ctx.set(path, e.target.value === "" ? undefined : e.target.value)}>
          <option value="">{s.default !== undefined && s.default !== null ? `default (${String(s.default)})` : "not set"}</option>
          {options.map((o) => <option key={o} value={o}>{o}</option>)}
        </select>
      );
      break;
    }
    case "integer":
    case "number":
      input = <TextInput id={id} path={path} value={current === undefined || current === null ? "" : String(current)}
        placeholder={defaultText(s)} onCommit={(t) => ctx.set(path, t.trim() === "" ? undefined : parseNumber(t, kind === "integer"))} />;
      break;
    case "string":
      input = <TextInput id={id} path={path} value={typeof current === "string" ? current : current == null ? "" : String(current)}
        placeholder={defaultText(s)} onCommit={(t) => ctx.set(path, t === "" && (nullable || s.default !== undefined) ? undefined : t)} />;
      break;
    case "strings":
      input = <TextInput id={id} path={path} multiline value={Array.isArray(current) ? current.join("\n") : ""}
        placeholder="one per line" onCommit={(t) => ctx.set(path, t.trim() === "" ? undefined : t.split("\n").filter((x) => x.trim() !== ""))} />;
      break;
    case "numbers":
    case "int-or-list":
      input = <TextInput id={id} path={path} value={Array.isArray(current) ? current.join(", ") : current == null ? "" : String(current)}
        placeholder={defaultText(s) || "e.g. 512, 768"} onCommit={(t) => {
          const parts = t.split(/[,\s]+/).filter(Boolean).map((x) => parseNumber(x, true));
          if (parts.length === 0) ctx.set(path, undefined);
          else if (kind === "int-or-list" && parts.length === 1 && !Array.isArray(current)) ctx.set(path, parts[0]);
          else ctx.set(path, parts);
        }} />;
      break;
    default:
      input = <JsonInput id={id} path={path} value={current} onCommit={(v) => ctx.set(path, v)} />;
  }
  return <Field id={id} name={title} help={help} problems={problems} wide={kind === "strings" || kind === "dict" || kind === "json"}>{input}</Field>;
}

/** Free-form values (optimizer_params, model_kwargs, meta): JSON text. */
function JsonInput({ id, path, value, onCommit }: { id: string; path: Path; value: unknown; onCommit: (v: unknown) => void }) {
  const [error, setError] = useState<string | null>(null);
  return (
    <>
      <TextInput id={id} path={path} multiline value={value === undefined ? "" : JSON.stringify(value)} placeholder='JSON, e.g. {"weight_decay": 0.01}'
        onCommit={(t) => {
          if (t.trim() === "") { setError(null); onCommit(undefined); return; }
          try { onCommit(JSON.parse(t)); setError(null); } catch { setError("not valid JSON yet"); }
        }} />
      {error ? <div className="field-problem">{error}</div> : null}
    </>
  );
}

function Fields({ ctx, path, schema }: { ctx: Ctx; path: Path; schema: JsonSchema }) {
  const props = Object.entries(schema.properties ?? {}).filter(([name]) => !HIDDEN.has(pathKey([...path, name])));
  const simple = props.filter(([, p]) => { const k = kindOf(ctx.root, unwrap(ctx.root, p).s); return !["object", "map", "objects"].includes(k); });
  const nested = props.filter((entry) => !simple.includes(entry));
  return (
    <>
      {simple.length ? (
        <div className="fields">
          {simple.map(([name, p]) => <ValueField key={name} ctx={ctx} path={[...path, name]} name={name} schema={p} />)}
        </div>
      ) : null}
      {nested.map(([name, p]) => <ValueField key={name} ctx={ctx} path={[...path, name]} name={name} schema={p} />)}
    </>
  );
}

function ObjectSection({ ctx, path, name, schema, optional, help, open }: {
  ctx: Ctx; path: Path; name: string; schema: JsonSchema; optional?: boolean; help?: string; open?: boolean;
}) {
  const current = getAt(ctx.job, path);
  const present = current !== undefined && current !== null;
  const last = path[path.length - 1];
  const startOpen = open ?? (typeof last === "string" && OPEN_SECTIONS.has(last) && path.length <= 4);
  return (
    <details className="section" open={startOpen} data-section={pathKey(path)}>
      <summary>
        {name}
        {optional ? (
          <label className="inline section-toggle" onClick={(e) => e.stopPropagation()}>
            <input type="checkbox" data-path={`${pathKey(path)}.__on`} checked={present}
              onChange={(e) => ctx.set(path, e.target.checked ? {} : undefined)} /> use
          </label>
        ) : null}
      </summary>
      {help ? <div className="help">{help}</div> : null}
      {ctx.problemsAt(path).map((p) => <div key={p} className="field-problem">{p}</div>)}
      {!optional || present ? <Fields ctx={ctx} path={path} schema={schema} /> : <p className="muted small">Off.</p>}
    </details>
  );
}

function ObjectList({ ctx, path, name, schema, help }: { ctx: Ctx; path: Path; name: string; schema: JsonSchema; help?: string }) {
  const items = getAt(ctx.job, path);
  const list = Array.isArray(items) ? items : [];
  const itemSchema = resolve(ctx.root, schema.items);
  const singular = name.replace(/s$/, "");
  const last = path[path.length - 1];
  return (
    <details className="section" open={typeof last === "string" && OPEN_SECTIONS.has(last)} data-section={pathKey(path)}>
      <summary>{name} <span className="muted small">({list.length})</span></summary>
      {help ? <div className="help">{help}</div> : null}
      {ctx.problemsAt(path).map((p) => <div key={p} className="field-problem">{p}</div>)}
      {list.map((_, i) => (
        <fieldset key={i} className="item">
          <legend>
            {singular} {i + 1}{" "}
            <button type="button" className="btn btn-small" onClick={() => ctx.set([...path, i], undefined)}>remove</button>
          </legend>
          <Fields ctx={ctx} path={[...path, i]} schema={itemSchema} />
        </fieldset>
      ))}
      <button type="button" className="btn btn-small" onClick={() => ctx.set([...path, list.length], {})}>+ add {singular.toLowerCase()}</button>
    </details>
  );
}

/** Named entries in order (alpha phases: foundation, balance, emphasis). */
function MapField({ ctx, path, name, schema, help }: { ctx: Ctx; path: Path; name: string; schema: JsonSchema; help?: string }) {
  const current = getAt(ctx.job, path);
  const map = isObject(current) ? current : {};
  const entrySchema = resolve(ctx.root, isObject(schema.additionalProperties) ? schema.additionalProperties : {});
  const keys = Object.keys(map);
  const rename = (from: string, to: string) => {
    if (!to || to === from || to in map) return;
    const next: Record<string, unknown> = {};
    for (const k of keys) next[k === from ? to : k] = map[k];
    ctx.set(path, next);
  };
  return (
    <details className="section" open data-section={pathKey(path)}>
      <summary>{name} <span className="muted small">({keys.length})</span></summary>
      {help ? <div className="help">{help}</div> : null}
      {ctx.problemsAt(path).map((p) => <div key={p} className="field-problem">{p}</div>)}
      {keys.map((k) => (
        <fieldset key={k} className="item">
          <legend>
            <input className="key-input" defaultValue={k} aria-label="name" onBlur={(e) => rename(k, e.target.value.trim())} />{" "}
            <button type="button" className="btn btn-small" onClick={() => ctx.set([...path, k], undefined)}>remove</button>
          </legend>
          <Fields ctx={ctx} path={[...path, k]} schema={entrySchema} />
        </fieldset>
      ))}
      <button type="button" className="btn btn-small" onClick={() => {
        let i = keys.length + 1;
        while (`phase_${i}` in map) i++;
        ctx.set([...path, `phase_${i}`], {});
      }}>+ add entry</button>
    </details>
  );
}

export function SchemaForm({ schema, job, onChange, problems }: {
  schema: JsonSchema; job: JobConfig; onChange: (job: JobConfig) => void; problems: Problem[];
}) {
  const byPath = new Map<string, string[]>();
  for (const p of problems) {
    if (!p.path) continue;
    const key = pathKey(p.path);
    byPath.set(key, [...(byPath.get(key) ?? []), p.text]);
  }
  const ctx: Ctx = {
    root: schema,
    job,
    set: (path, value) => onChange(setAt(job, path, value)),
    problemsAt: (path) => byPath.get(pathKey(path)) ?? [],
  };
  const jobConfig = resolve(schema, schema.properties?.config);
  const process = resolve(schema, resolve(schema, jobConfig.properties?.process).items);
  const procPath: Path = ["config", "process", 0];
  const scalars = Object.fromEntries(Object.entries(process.properties ?? {}).filter(([n, p]) => {
    const k = kindOf(schema, unwrap(schema, p).s);
    return !["object", "map", "objects"].includes(k) && !HIDDEN.has(pathKey([...procPath, n]));
  }));
  const rank = (n: string) => (SECTION_ORDER.includes(n) ? SECTION_ORDER.indexOf(n) : SECTION_ORDER.length);
  const sections = Object.entries(process.properties ?? {})
    .filter(([n]) => !(n in scalars) && !HIDDEN.has(pathKey([...procPath, n])))
    .sort(([a], [b]) => rank(a) - rank(b));
  return (
    <div className="schema-form">
      <details className="section" open>
        <summary>General</summary>
        <div className="fields">
          <ValueField ctx={ctx} path={["config", "name"]} name="name" schema={jobConfig.properties?.name ?? { type: "string" }} />
          {Object.entries(scalars).map(([n, p]) => <ValueField key={n} ctx={ctx} path={[...procPath, n]} name={n} schema={p} />)}
        </div>
      </details>
      {sections.map(([n, p]) => <ValueField key={n} ctx={ctx} path={[...procPath, n]} name={n} schema={p} />)}
      <ValueField ctx={ctx} path={["meta"]} name="meta" schema={schema.properties?.meta ?? { type: "object" }} />
    </div>
  );
}
