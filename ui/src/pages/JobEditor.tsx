// New job (from a model preset) and edit job: the schema form and the YAML editor side by side
// as two modes of the same job, checked live by POST /api/validate.
import { useEffect, useMemo, useRef, useState } from "react";
import { api, ApiError, messageOf } from "../lib/api";
import { getAt, parseProblem, setAt, toYaml, type Path } from "../lib/jobconfig";
import { useDebounced } from "../lib/hooks";
import { navigate, useLocation } from "../lib/router";
import type { DatasetSummary, Job, JobConfig, JobDetail, JsonSchema, Preset, PresetInfo, ValidateAnswer } from "../lib/types";
import { ErrorBox, Loading, Tabs } from "../components/common";
import { MemoryPlanCard, type Suggested } from "../components/MemoryPlan";
import { PresetPicker } from "../components/PresetPicker";
import { SchemaForm } from "../components/SchemaForm";
import { YamlEditor } from "../components/YamlEditor";

type Mode = "form" | "yaml";
const PROCESS: Path = ["config", "process", 0];
const DATASET_PATH: Path = [...PROCESS, "datasets", 0, "folder_path"];
/** What a preset change keeps from the job being edited. */
const CARRIED: Path[] = [["config", "name"], [...PROCESS, "trigger_word"], DATASET_PATH];

export function JobEditor({ jobId }: { jobId?: number }) {
  const { query } = useLocation();
  const editing = jobId !== undefined;
  const [schema, setSchema] = useState<JsonSchema | null>(null);
  const [presets, setPresets] = useState<PresetInfo[]>([]);
  const [datasets, setDatasets] = useState<{ folder: string; datasets: DatasetSummary[] } | null>(null);
  const [preset, setPreset] = useState<string | null>(null);
  const [job, setJob] = useState<JobConfig | null>(null);
  const [yaml, setYaml] = useState("");
  const [mode, setMode] = useState<Mode>("form");
  const [gpuIds, setGpuIds] = useState("");
  const [check, setCheck] = useState<ValidateAnswer | null>(null);
  const [loadError, setLoadError] = useState<string | null>(null);
  const [submitError, setSubmitError] = useState<ApiError | null>(null);
  const [busy, setBusy] = useState(false);
  const [original, setOriginal] = useState<Job | null>(null);
  const importer = useRef<HTMLInputElement>(null);

  useEffect(() => {
    Promise.all([
      api.get<JsonSchema>("/api/schema"),
      api.get<{ presets: PresetInfo[] }>("/api/presets"),
      api.get<{ folder: string; datasets: DatasetSummary[] }>("/api/datasets"),
    ]).then(([s, p, d]) => { setSchema(s); setPresets(p.presets); setDatasets(d); })
      .catch((err) => setLoadError(messageOf(err)));
  }, []);

  useEffect(() => {
    if (!editing) return;
    api.get<JobDetail>(`/api/jobs/${jobId}`).then((d) => {
      setOriginal(d.job);
      setGpuIds(d.job.gpu_ids);
      setYaml(d.yaml);
      if (d.config) setJob(d.config); else setMode("yaml");
    }).catch((err) => setLoadError(messageOf(err)));
  }, [editing, jobId]);

  const pickPreset = async (id: string) => {
    try {
      const p = await api.get<Preset>(`/api/presets/${id}`);
      let next = p.job;
      for (const path of CARRIED) {
        const kept = job ? getAt(job, path) : undefined;
        if (kept !== undefined && kept !== "" && kept !== null) next = setAt(next, path, kept);
      }
      setPreset(id);
      setJob(next);
      setYaml(toYaml(next));
      navigate(`/jobs/new?preset=${id}`, { replace: true });
    } catch (err) {
      setLoadError(messageOf(err));
    }
  };

  useEffect(() => {
    const wanted = query.get("preset");
    if (!editing && wanted && preset === null && presets.length) void pickPreset(wanted);
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [presets]);

  // live check of whichever side is being edited
  const source = useDebounced(mode === "form" ? job : yaml, 400);
  useEffect(() => {
    if (source === null || source === "") return;
    let stale = false;
    const body = typeof source === "string" ? { yaml: source } : { config: source };
    api.post<ValidateAnswer>("/api/validate", body).then((r) => { if (!stale) setCheck(r); }).catch(() => undefined);
    return () => { stale = true; };
  }, [source]);

  const problems = useMemo(() => (check?.problems ?? []).map(parseProblem), [check]);
  const warnings = useMemo(() => (check?.warnings ?? []).map(parseProblem), [check]);

  const switchTo = async (next: Mode) => {
    if (next === mode) return;
    if (next === "yaml") {
      if (job) setYaml(toYaml(job));
      setMode("yaml");
      return;
    }
    const r = await api.post<ValidateAnswer>("/api/validate", { yaml }).catch(() => null);
    if (r?.config) {
      setJob(r.config);
      setMode("form");
    } else if (r) {
      setCheck(r);
      setSubmitError(new ApiError(422, "Fix the problems in the YAML before going back to the form.", r.problems));
    }
  };

  const importFile = async (file: File) => {
    const text = await file.text();
    setYaml(text);
    setMode("yaml");
    setSubmitError(null);
  };

  const submit = async (start: boolean) => {
    setBusy(true);
    setSubmitError(null);
    const content = mode === "form" ? { config: job } : { yaml };
    try {
      if (editing) {
        await api.put(`/api/jobs/${jobId}`, { ...content, gpu_ids: gpuIds });
        if (start) await api.post(`/api/jobs/${jobId}/start`);
        navigate(`/jobs/${jobId}`);
      } else {
        const r = await api.post<{ job: Job }>("/api/jobs", { ...content, gpu_ids: gpuIds, start });
        navigate(`/jobs/${r.job.id}`);
      }
    } catch (err) {
      setSubmitError(err instanceof ApiError ? err : new ApiError(0, messageOf(err)));
    } finally {
      setBusy(false);
    }
  };

  if (loadError) return <div className="page"><h1>{editing ? "Edit job" : "New job"}</h1><ErrorBox message={loadError} /></div>;
  if (!schema || (editing && !original)) return <div className="page"><Loading /></div>;

  const set = (path: Path, value: unknown) => setJob((j) => (j ? setAt(j, path, value) : j));
  // the memory plan's fix goes into whichever side is being edited; the live check then re-plans
  const applySuggestion = (suggested: Suggested) => {
    if (mode === "form" && suggested.config) setJob(suggested.config);
    else setYaml(suggested.yaml);
  };
  const datasetFolder = job ? getAt(job, DATASET_PATH) : undefined;
  const hasJob = job !== null || (mode === "yaml" && yaml !== "");

  return (
    <div className="page job-editor">
      <div className="page-head">
        <h1>{editing ? `Edit ${original?.name}` : "New job"}</h1>
        <div className="actions">
          <input ref={importer} type="file" accept=".yaml,.yml,.json,text/yaml,application/json" hidden data-testid="yaml-import"
            onChange={(e) => { const f = e.target.files?.[0]; if (f) void importFile(f); e.target.value = ""; }} />
          <button type="button" className="btn" onClick={() => importer.current?.click()}>Import YAML…</button>
        </div>
      </div>

      {!editing ? (
        <>
          <h2>1. Model preset</h2>
          <PresetPicker presets={presets} selected={preset} onPick={(id) => void pickPreset(id)} />
        </>
      ) : null}

      {hasJob ? (
        <>
          {!editing ? <h2>2. Settings</h2> : null}
          {mode === "form" && job ? (
            <div className="quick-fields">
              <div className="field">
                <label htmlFor="q-name">Job name</label>
                <input id="q-name" data-testid="job-name" value={String(getAt(job, ["config", "name"]) ?? "")}
                  onChange={(e) => set(["config", "name"], e.target.value)} />
              </div>
              <div className="field">
                <label htmlFor="q-dataset">Dataset</label>
                <select id="q-dataset" data-testid="job-dataset" value={typeof datasetFolder === "string" ? datasetFolder : ""}
                  onChange={(e) => set(DATASET_PATH, e.target.value)}>
                  <option value="">choose a dataset…</option>
                  {datasets?.datasets.map((d) => {
                    const path = `${datasets.folder}/${d.name}`;
                    return <option key={d.name} value={path}>{d.name} ({d.images} images, {d.videos} videos)</option>;
                  })}
                  {typeof datasetFolder === "string" && datasetFolder && !datasets?.datasets.some((d) => `${datasets.folder}/${d.name}` === datasetFolder)
                    ? <option value={datasetFolder}>{datasetFolder}</option> : null}
                </select>
              </div>
              <div className="field">
                <label htmlFor="q-trigger">Trigger word</label>
                <input id="q-trigger" data-testid="job-trigger" value={String(getAt(job, [...PROCESS, "trigger_word"]) ?? "")}
                  onChange={(e) => set([...PROCESS, "trigger_word"], e.target.value)} />
              </div>
              <div className="field">
                <label htmlFor="q-gpus">GPUs</label>
                <input id="q-gpus" data-testid="job-gpus" value={gpuIds} placeholder="auto, 0, 0,1 or cpu" onChange={(e) => setGpuIds(e.target.value)} />
              </div>
            </div>
          ) : (
            <div className="quick-fields">
              <div className="field">
                <label htmlFor="q-gpus">GPUs</label>
                <input id="q-gpus" value={gpuIds} placeholder="auto, 0, 0,1 or cpu" onChange={(e) => setGpuIds(e.target.value)} />
              </div>
            </div>
          )}

          <Tabs tabs={[{ id: "form", label: "Form" }, { id: "yaml", label: "YAML (advanced)" }]} active={mode}
            onChange={(m) => void switchTo(m)} />

          {mode === "form" && job ? (
            <>
              {problems.length ? (
                <ErrorBox message="The job has problems (marked below):" problems={problems.map((p) => p.text)} />
              ) : null}
              <SchemaForm schema={schema} job={job} onChange={setJob} problems={problems} />
            </>
          ) : (
            <YamlEditor value={yaml} onChange={setYaml} problems={problems} warnings={warnings} />
          )}

          {mode === "form" && warnings.length ? <ErrorBox warnings={warnings.map((w) => w.text)} /> : null}
          <MemoryPlanCard source={{ kind: "draft", yaml: check?.ok ? check.yaml ?? null : null, gpuIds }} onApply={applySuggestion} />
          {submitError ? <ErrorBox message={submitError.message} problems={submitError.problems} /> : null}
          <div className="actions sticky-actions">
            <button type="button" className="btn" disabled={busy} data-testid="save-job" onClick={() => void submit(false)}>
              {editing ? "Save" : "Create"}
            </button>
            <button type="button" className="btn btn-primary" disabled={busy} data-testid="save-start-job" onClick={() => void submit(true)}>
              {editing ? "Save and start" : "Create and start"}
            </button>
            {check ? (check.ok ? <span className="ok-line">✓ valid</span> : <span className="inline-error">{check.problems.length} problem(s)</span>) : null}
          </div>
        </>
      ) : (
        <p className="muted">Pick a model preset to fill the form, or import a YAML job file.</p>
      )}
    </div>
  );
}
