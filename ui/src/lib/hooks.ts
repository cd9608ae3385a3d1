import { useCallback, useEffect, useRef, useState } from "react";
import { messageOf } from "./api";

export interface Polled<T> {
  data: T | undefined;
  error: string | null;
  loading: boolean;
  reload: () => void;
}

/**
 * Loads `load()` now and again every `intervalMs` after each answer (null: once), while the tab
 * is visible; a change in `deps` starts over. No overlapping requests.
 */
export function usePoll<T>(load: () => Promise<T>, intervalMs: number | null, deps: unknown[]): Polled<T> {
  const [data, setData] = useState<T | undefined>(undefined);
  const [error, setError] = useState<string | null>(null);
  const [loading, setLoading] = useState(true);
  const [tick, setTick] = useState(0);
  const loadRef = useRef(load);
  loadRef.current = load;

  useEffect(() => {
    let cancelled = false;
    let timer: number | undefined;
    const run = async () => {
      if (document.hidden && intervalMs !== null) {
        timer = window.setTimeout(run, intervalMs);
        return;
      }
      try {
        const value = await loadRef.current();
        if (cancelled) return;
        setData(value);
        setError(null);
      } catch (err) {
        if (cancelled) return;
        setError(messageOf(err));
      } finally {
        if (!cancelled) setLoading(false);
      }
      if (!cancelled && intervalMs !== null) timer = window.setTimeout(run, intervalMs);
    };
    run();
    return () => {
      cancelled = true;
      if (timer !== undefined) window.clearTimeout(timer);
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [intervalMs, tick, ...deps]);

  const reload = useCallback(() => setTick((t) => t + 1), []);
  return { data, error, loading, reload };
}

/**
 * A server task (captioning, a model fetch) polled every `intervalMs` until its state is one of
 * `finalStates` (2 s after a failed request); `onEnd` runs once when a task seen running ends.
 * `load` null: nothing to poll yet. A change of `load` or `restart` starts over.
 */
export function useTaskPoll<T extends { state: string }>(
  load: (() => Promise<T | null>) | null,
  finalStates: readonly string[],
  intervalMs: number,
  onEnd?: (task: T) => void,
  restart?: unknown,
) {
  const [task, setTask] = useState<T | null>(null);
  const [error, setError] = useState<string | null>(null);
  const endRef = useRef(onEnd);
  endRef.current = onEnd;
  useEffect(() => {
    if (!load) return;
    let cancelled = false;
    let timer: number | undefined;
    let wasRunning = false;
    const run = async () => {
      try {
        const t = await load();
        if (cancelled) return;
        setTask(t);
        setError(null);
        const final = !t || finalStates.includes(t.state);
        if (t && final && wasRunning) endRef.current?.(t);
        if (!final) {
          wasRunning = true;
          timer = window.setTimeout(run, intervalMs);
        }
      } catch (err) {
        if (cancelled) return;
        setError(messageOf(err));
        timer = window.setTimeout(run, 2000);
      }
    };
    void run();
    return () => {
      cancelled = true;
      if (timer !== undefined) window.clearTimeout(timer);
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [load, restart]);
  return { task, setTask, error, setError };
}

/** The width of an element, followed as it changes (charts draw to it). Use as `ref={ref}`. */
export function useWidth<E extends HTMLElement>(): [(element: E | null) => void, number] {
  const [width, setWidth] = useState(0);
  const observer = useRef<ResizeObserver | null>(null);
  const ref = useCallback((element: E | null) => {
    observer.current?.disconnect();
    observer.current = null;
    if (!element) return;
    setWidth(element.clientWidth);
    observer.current = new ResizeObserver((entries) => {
      for (const entry of entries) setWidth(Math.floor(entry.contentRect.width));
    });
    observer.current.observe(element);
  }, []);
  return [ref, width];
}

/** Runs an async action, keeping `busy` and the error message for the button that started it. */
export function useAction(): {
  busy: boolean;
  error: string | null;
  run: <T>(action: () => Promise<T>) => Promise<T | undefined>;
  clear: () => void;
} {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const run = useCallback(async <T,>(action: () => Promise<T>) => {
    setBusy(true);
    setError(null);
    try {
      return await action();
    } catch (err) {
      setError(messageOf(err));
      return undefined;
    } finally {
      setBusy(false);
    }
  }, []);
  const clear = useCallback(() => setError(null), []);
  return { busy, error, run, clear };
}

/** `value`, once it has stayed the same for `ms` milliseconds (typing settles before a request). */
export function useDebounced<T>(value: T, ms: number): T {
  const [out, setOut] = useState(value);
  useEffect(() => {
    const timer = window.setTimeout(() => setOut(value), ms);
    return () => window.clearTimeout(timer);
  }, [value, ms]);
  return out;
}
