// The last lines of a run's output, kept scrolled to the end unless the reader scrolled up.
import { useEffect, useRef } from "react";

export function LogView({ lines }: { lines: string[] }) {
  const box = useRef<HTMLPreElement>(null);
  const follow = useRef(true);
  useEffect(() => {
    const element = box.current;
    if (element && follow.current) element.scrollTop = element.scrollHeight;
  }, [lines]);
  return (
    <pre className="log" ref={box} data-testid="log"
      onScroll={(e) => {
        const el = e.currentTarget;
        follow.current = el.scrollHeight - el.scrollTop - el.clientHeight < 30;
      }}>
      {lines.length ? lines.join("\n") : "(no output yet)"}
    </pre>
  );
}
