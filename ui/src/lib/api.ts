// The JSON API client: same-origin requests (the session cookie rides along), errors as ApiError,
// and a signed-out answer (401) sends the browser to the server's sign-in page.
import type { FetchTask, ModelCacheAnswer, PlanAnswer, PublishAnswer, PublishState } from "./types";

export class ApiError extends Error {
  readonly status: number;
  readonly problems: string[];
  readonly warnings: string[];

  constructor(status: number, message: string, problems: string[] = [], warnings: string[] = []) {
    super(message);
    this.status = status;
    this.problems = problems;
    this.warnings = warnings;
  }
}

function toSignIn(): void {
  const next = window.location.pathname + window.location.search;
  window.location.assign(`/login?next=${encodeURIComponent(next)}`);
}

function asStrings(value: unknown): string[] {
  return Array.isArray(value) ? value.map((v) => String(v)) : [];
}

/** The server's error body: {"detail": "..."} or {"detail": {"message", "problems", "warnings"}}. */
export function errorFrom(status: number, body: unknown): ApiError {
  const detail = (body as { detail?: unknown } | null)?.detail;
  if (typeof detail === "string") {
    return new ApiError(status, detail, asStrings((body as { problems?: unknown }).problems));
  }
  if (detail && typeof detail === "object") {
    const d = detail as { message?: unknown; problems?: unknown; warnings?: unknown };
    return new ApiError(status, String(d.message ?? "request refused"), asStrings(d.problems), asStrings(d.warnings));
  }
  return new ApiError(status, `request failed (HTTP ${status})`);
}

async function request<T>(method: string, path: string, body?: unknown): Promise<T> {
  const headers: Record<string, string> = { Accept: "application/json" };
  let payload: BodyInit | undefined;
  if (body instanceof FormData) {
    payload = body;
  } else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let response: Response;
  try {
    response = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
  } catch {
    throw new ApiError(0, "the server does not answer; is `aitk ui` running?");
  }
  if (response.status === 401 && path !== "/api/auth/login") {
    toSignIn();
    throw new ApiError(401, "signed out");
  }
  const text = await response.text();
  let data: unknown = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = { detail: text.slice(0, 500) };
    }
  }
  if (!response.ok) throw errorFrom(response.status, data);
  return data as T;
}

export const api = {
  get: <T>(path: string) => request<T>("GET", path),
  post: <T>(path: string, body?: unknown) => request<T>("POST", path, body ?? {}),
  put: <T>(path: string, body?: unknown) => request<T>("PUT", path, body ?? {}),
  del: <T>(path: string) => request<T>("DELETE", path),
};

/** A multipart POST with upload progress (0..1), for large image and video uploads. */
export function upload<T>(path: string, form: FormData, onProgress?: (fraction: number) => void): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.withCredentials = true;
    xhr.upload.onprogress = (event) => {
      if (event.lengthComputable && onProgress) onProgress(event.loaded / event.total);
    };
    xhr.onerror = () => reject(new ApiError(0, "the upload did not reach the server"));
    xhr.onload = () => {
      let data: unknown = null;
      try {
        data = xhr.responseText ? JSON.parse(xhr.responseText) : null;
      } catch {
        data = { detail: xhr.responseText.slice(0, 500) };
      }
      if (xhr.status === 401) {
        toSignIn();
        reject(new ApiError(401, "signed out"));
      } else if (xhr.status >= 200 && xhr.status < 300) {
        resolve(data as T);
      } else {
        reject(errorFrom(xhr.status, data));
      }
    };
    xhr.send(form);
  });
}

/** URL of a file in a job's run folder (each part encoded on its own; '/' stays a separator). */
export function jobFileUrl(jobId: number, path: string, download = false): string {
  const encoded = path.split("/").map(encodeURIComponent).join("/");
  return `/api/jobs/${jobId}/files/${encoded}${download ? "?download=1" : ""}`;
}

export function datasetItemUrl(dataset: string, item: string, what: "file" | "thumbnail", size = 256): string {
  const base = `/api/datasets/${encodeURIComponent(dataset)}/items/${encodeURIComponent(item)}/${what}`;
  return what === "thumbnail" ? `${base}?size=${size}` : base;
}

export function messageOf(error: unknown): string {
  if (error instanceof ApiError) return error.message;
  if (error instanceof Error) return error.message;
  return String(error);
}

/** The memory plan (docs/ui.md, "Memory plan"): of a job being edited (validated YAML, its GPUs), or of a
 * stored job. `gpuMemory` ("24GB", "" = the job's GPU, else 24 GB) is the budget. */
export const plans = {
  draft: (yaml: string, gpuIds: string, gpuMemory: string) =>
    api.post<PlanAnswer>("/api/plan", { yaml, gpu_ids: gpuIds, gpu_memory: gpuMemory || null }),
  job: (jobId: number, gpuMemory: string) =>
    api.get<PlanAnswer>(`/api/jobs/${jobId}/plan${gpuMemory ? `?gpu_memory=${encodeURIComponent(gpuMemory)}` : ""}`),
};

/** A caption task of the server (docs/captions.md): `aitk caption` in the background on a dataset or on
 * Quick train's files, with its done / total. `captions` (files tasks): each file's caption in upload order. */
export interface CaptionTask {
  id: string;
  kind: "dataset" | "files";
  dataset: string | null;
  state: "starting" | "loading" | "running" | "completed" | "failed" | "stopped";
  message: string;
  model: string | null;
  done: number;
  total: number;
  written: number;
  failed: number;
  done_before: number;
  files: number;
  failures: { file: string; reason: string }[];
  log?: string[];
  captions?: (string | null)[];
}

/** What a Caption action sends: the model (empty: the default of `detailed`) and the caption's edges. */
export interface CaptionSettings {
  model: string;
  detailed: boolean;
  prompt: string;
  overwrite: boolean;
  prefix: string;
  suffix: string;
  max_length: string;
}

export interface CaptionModel {
  id: string;
  label: string;
  detailed: boolean;
}

export const CAPTION_FINAL = ["completed", "failed", "stopped"];

export const captions = {
  models: () => api.get<{ models: CaptionModel[] }>("/api/caption"),
  task: (id: string) => api.get<{ task: CaptionTask }>(`/api/caption?task=${encodeURIComponent(id)}`),
  remove: (id: string) => api.del<{ removed: string }>(`/api/caption?task=${encodeURIComponent(id)}`),
  ofDataset: (name: string) => api.get<{ task: CaptionTask | null }>(`/api/datasets/${encodeURIComponent(name)}/caption`),
  startDataset: (name: string, s: CaptionSettings) => api.post<{ task: CaptionTask }>(
    `/api/datasets/${encodeURIComponent(name)}/caption`, captionBody(s)),
  stopDataset: (name: string) => api.del<{ task: CaptionTask }>(`/api/datasets/${encodeURIComponent(name)}/caption`),
  startFiles: (files: File[], s: CaptionSettings) => {
    const form = new FormData();
    for (const [key, value] of Object.entries(captionBody(s))) {
      if (value !== null && value !== undefined && key !== "overwrite") form.append(key, String(value));
    }
    for (const f of files) form.append("files", f, f.name);
    return upload<{ task: CaptionTask }>("/api/caption/files", form);
  },
};

function captionBody(s: CaptionSettings): Record<string, string | number | boolean | null> {
  const max = Number(s.max_length);
  return {
    model: s.model.trim() || null,
    detailed: s.detailed,
    prompt: s.prompt.trim() || null,
    overwrite: s.overwrite,
    prefix: s.prefix,
    suffix: s.suffix,
    max_length: s.max_length.trim() && Number.isFinite(max) && max > 0 ? Math.round(max) : null,
  };
}

/** The Hugging Face cache (settings page) and model fetches ahead of a run (docs/hub.md). */
export const models = {
  cache: () => api.get<ModelCacheAnswer>("/api/models/cache"),
  fetchState: () => api.get<{ task: FetchTask | null }>("/api/models/fetch"),
  fetchRepo: (repoId: string, revision: string) =>
    api.post<{ task: FetchTask }>("/api/models/fetch", { repo_id: repoId, revision: revision.trim() || null }),
  fetchJob: (jobId: number) => api.post<{ task: FetchTask }>("/api/models/fetch", { job_id: jobId }),
  remove: (repoId: string) => api.del<{ freed: number; cache: ModelCacheAnswer }>(
    `/api/models/cache?repo_id=${encodeURIComponent(repoId)}`),
};

export const FETCH_FINAL = ["completed", "failed"];

/** "Publish to the Hub" of a completed job (the upload `aitk push` does). */
export const publishing = {
  state: (jobId: number) => api.get<PublishAnswer>(`/api/jobs/${jobId}/publish`),
  start: (jobId: number, repoId: string, isPrivate: boolean) =>
    api.post<{ publish: PublishState }>(`/api/jobs/${jobId}/publish`, { repo_id: repoId.trim() || null, private: isPrivate }),
};
