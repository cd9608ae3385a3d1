// Shapes of the JSON the server answers (docs/ui.md, "API").

export type JobStatus = "idle" | "queued" | "running" | "stopping" | "completed" | "stopped" | "error";

export interface JobSummary {
  arch?: string;
  model?: string;
  steps?: number;
  trigger_word?: string | null;
  device?: string | null;
  datasets?: string[];
  sample_every?: number | null;
  save_every?: number | null;
}

export interface Job {
  id: number;
  name: string;
  status: JobStatus;
  run_state: string | null;
  gpu_ids: string;
  step: number | null;
  total_steps: number | null;
  progress: number | null;
  speed: number | null;
  eta_s: number | null;
  queue_position: number | null;
  error: string | null;
  reason: string | null; // oom | nan | io | config | data | model | killed | internal (when status is error)
  message: string | null;
  fix: string | null;
  info: string | null;
  exit_code: number | null;
  pid: number | null;
  created_at: number | null;
  updated_at: number | null;
  started_at: number | null;
  finished_at: number | null;
  summary: JobSummary;
}

export interface SampleFile {
  name: string;
  path: string;
  index: number;
  kind: "image" | "video" | "animation";
  size: number;
}

export interface SampleStep {
  step: number;
  files: SampleFile[];
}

export interface LoraFile {
  name: string;
  path: string;
  size: number;
  modified: number;
  step: number | null;
  final: boolean;
}

export interface CheckpointFolder {
  step: number;
  name: string;
  complete: boolean;
  files: { name: string; path: string }[];
}

export type JobConfig = Record<string, unknown>;

export interface JobDetail {
  job: Job;
  yaml: string;
  config: JobConfig | null;
  run_status: Record<string, unknown> | null;
  run_folder: string;
  log_tail: string[];
  lora_files: LoraFile[];
  checkpoints: CheckpointFolder[];
  samples: SampleStep[];
  files_url: string;
  metrics_url: string;
}

export interface MetricSeries {
  field: string;
  expert: string | null;
  count: number;
  step: number[];
  value: (number | null)[];
  trend: { step: number[]; value: (number | null)[] };
}

export interface Transition {
  step: number;
  expert: string | null;
  from_phase: string | null;
  to_phase: string | null;
}

export type MetricsLine = Record<string, unknown>;

export interface MetricsAnswer {
  complete: boolean;
  rows: number;
  first_step: number | null;
  last_step: number | null;
  experts: string[];
  fields: string[];
  series: MetricSeries[];
  transitions: Transition[];
  latest: Record<string, MetricsLine>;
}

export interface DatasetSummary {
  name: string;
  images: number;
  videos: number;
  captions: number;
  bytes: number;
}

export interface DatasetItem {
  name: string;
  kind: "image" | "video";
  size: number;
  modified: number;
  caption: string | null;
  has_caption: boolean;
}

export interface DatasetDetail extends DatasetSummary {
  path: string;
  items: DatasetItem[];
}

export interface InspectReport {
  ok: boolean;
  lines: string[];
}

export interface PresetInfo {
  id: string;
  label: string;
  description: string;
  arch: string;
}

export interface Preset extends PresetInfo {
  job: JobConfig;
}

export interface Settings {
  training_folder: string;
  datasets_folder: string;
  hf_token_set: boolean;
  hf_token_hint: string | null;
  auth_required: boolean;
  max_upload_bytes: number;
  database: string;
}

export interface Gpu {
  index: number;
  name: string;
  utilization: number;
  memory_used: number;
  memory_total: number;
  temperature: number | null;
}

export interface SystemAnswer {
  system: {
    cpu: { percent: number; count: number };
    memory: { used: number; total: number; percent: number };
    disks: { path: string; free: number; total: number }[];
    gpus: Gpu[] | null;
  };
  worker: { alive: boolean; pid: number | null; updated: number | null };
  running: Job[];
  queued: Job[];
  time: number;
}

export interface ValidateAnswer {
  ok: boolean;
  problems: string[];
  warnings: string[];
  yaml?: string;
  config?: JobConfig;
}

// JSON schema (pydantic's model_json_schema), the parts the form reads.
export interface JsonSchema {
  $ref?: string;
  $defs?: Record<string, JsonSchema>;
  type?: string | string[];
  title?: string;
  description?: string;
  default?: unknown;
  enum?: unknown[];
  properties?: Record<string, JsonSchema>;
  required?: string[];
  items?: JsonSchema;
  anyOf?: JsonSchema[];
  additionalProperties?: boolean | JsonSchema;
  minimum?: number;
  maximum?: number;
  exclusiveMinimum?: number;
  exclusiveMaximum?: number;
  minItems?: number;
  minLength?: number;
}

// The memory plan (POST /api/plan, GET /api/jobs/{id}/plan; aitk/plan's MemoryPlan.to_dict()).
export interface DeviceSplit {
  weights: number;
  trainable: number;
  optimizer: number;
  gradients: number;
  activations: number;
  workspace: number;
  total: number;
}

export interface MemoryPlan {
  job: string;
  model: string;
  arch: string;
  origin: string;
  setup: Record<string, string | number>;
  step: DeviceSplit;
  phases: Record<string, number>;
  weights_by_part: Record<string, number>;
  host: Record<string, number>;
  flops_per_step: number;
  trainable_parameters: number;
  gpu_memory: number | null;
  suggestion: Record<string, unknown> | null; // dotted job keys (model.qtype) -> values
  suggestion_peak: number | null;
  suggestion_note: string | null;
  suggestion_yaml: string | null;
  notes: string[];
  not_counted: string[];
  peak_device: number;
  peak_phase: string;
  peak_host: number;
  fits: boolean | null;
  one_line: string;
}

export interface PlanBudget {
  bytes: number;
  source: "set" | "gpu" | "default";
  gpu: { index: number; name: string; memory_total: number } | null;
  note: string | null;
}

export type PlanAnswer =
  | {
      ok: true;
      plan: MemoryPlan;
      budget: PlanBudget;
      /** The job with the suggestion merged (what "Apply" puts in place); null without a suggestion. */
      suggested: { yaml: string | null; config: JobConfig | null; problems: string[] } | null;
      cached: boolean;
      seconds: number;
    }
  | { ok: false; error: string; problems: string[]; budget: PlanBudget | null };

/** GET /api/models/cache: the Hugging Face hub cache as huggingface_hub's scan_cache_dir sees it. */
export interface CachedModel {
  repo_id: string;
  repo_type: string;
  size_on_disk: number;
  nb_files: number;
  last_accessed: number | null;
  last_modified: number | null;
  revisions: number;
  refs: string[];
}

export interface ModelCacheAnswer {
  hf_home: string;
  hub_cache: string;
  exists: boolean;
  size_on_disk: number;
  repos: CachedModel[];
  warnings: string[];
  fetch?: FetchTask | null;
}

/** A model fetch of the server (`aitk fetch-model` in the background): bytes done / still to download. */
export interface FetchTask {
  id: string;
  label: string;
  job_id: number | null;
  targets: string[];
  notes: string[];
  state: "planning" | "downloading" | "completed" | "failed";
  total_bytes: number;
  done_bytes: number;
  cached_bytes: number;
  files: number;
  current: string | null;
  items: { key: string; reference: string; repo_id: string; label: string; files: number; bytes: number;
    cached_bytes: number; path: string | null; done: boolean }[];
  error: string | null;
  started_at: number;
  finished_at: number | null;
}

/** A job's upload to the Hub ("Publish to the Hub"): running, uploaded (url) or failed (message). */
export interface PublishState {
  state: "running" | "uploaded" | "failed" | "skipped";
  message: string;
  repo_id: string | null;
  url: string | null;
  private: boolean | null;
  log: string[];
  started_at: number;
  finished_at: number | null;
}

export interface PublishAnswer {
  publish: PublishState | null;
  defaults: { repo_id: string | null; private: boolean; push_to_hub: boolean };
  publishable: boolean;
}
