// The advanced editor: a plain textarea with line numbers; lines with a problem are marked in the
// gutter and the messages below jump to their line.
import { useRef, type UIEvent } from "react";
import { yamlLineOf, type Problem } from "../lib/jobconfig";

export interface LocatedProblem extends Problem {
  at: number | null; // 1-based line in the text
}

export function locate(text: string, problems: Problem[]): LocatedProblem[] {
  return problems.map((p) => ({ ...p, at: p.line ?? (p.path ? yamlLineOf(text, p.path) : null) }));
}

export function YamlEditor({ value, onChange, problems, warnings }: {
  value: string; onChange: (text: string) => void; problems: Problem[]; warnings: Problem[];
}) {
  const area = useRef<HTMLTextAreaElement>(null);
  const gutter = useRef<HTMLDivElement>(null);
  const located = locate(value, problems);
  const warned = locate(value, warnings);
  const marks = new Map<number, string[]>();
  for (const p of located) if (p.at !== null) marks.set(p.at, [...(marks.get(p.at) ?? []), p.text]);
  const warnMarks = new Set(warned.map((w) => w.at).filter((n): n is number => n !== null));
  const count = value.split("\n").length;

  const onScroll = (event: UIEvent<HTMLTextAreaElement>) => {
    if (gutter.current) gutter.current.scrollTop = event.currentTarget.scrollTop;
  };

  const goTo = (line: number) => {
    const element = area.current;
    if (!element) return;
    const lines = value.split("\n");
    const start = lines.slice(0, line - 1).reduce((n, l) => n + l.length + 1, 0);
    element.focus();
    element.setSelectionRange(start, start + (lines[line - 1]?.length ?? 0));
    const lineHeight = parseFloat(getComputedStyle(element).lineHeight) || 18;
    element.scrollTop = Math.max(0, (line - 4) * lineHeight);
  };

  return (
    <div className="yaml-editor">
      <div className="yaml-frame">
        <div className="gutter" ref={gutter} aria-hidden="true">
          {Array.from({ length: count }, (_, i) => {
            const n = i + 1;
            const bad = marks.get(n);
            return (
              <div key={n} className={bad ? "gutter-line gutter-bad" : warnMarks.has(n) ? "gutter-line gutter-warn" : "gutter-line"}
                title={bad?.join("\n")}>
                {bad ? "● " : ""}{n}
              </div>
            );
          })}
        </div>
        <textarea ref={area} className="yaml-text" data-testid="yaml-editor" value={value} spellCheck={false}
          wrap="off" onScroll={onScroll} onChange={(e) => onChange(e.target.value)} aria-label="job file (YAML)" />
      </div>
      {located.length || warned.length ? (
        <ul className="yaml-problems" data-testid="yaml-problems">
          {located.map((p) => (
            <li key={p.text} className="problem">
              {p.at !== null ? <button type="button" className="link" onClick={() => goTo(p.at as number)}>line {p.at}</button> : null}{" "}
              {p.text}
            </li>
          ))}
          {warned.map((p) => (
            <li key={p.text} className="warning">
              {p.at !== null ? <button type="button" className="link" onClick={() => goTo(p.at as number)}>line {p.at}</button> : null}{" "}
              ⚠ {p.text}
            </li>
          ))}
        </ul>
      ) : (
        <p className="ok-line" data-testid="yaml-ok">✓ valid</p>
      )}
    </div>
  );
}
