"""The model cache: hub models fetched ahead of a run (`aitk fetch-model`, the web UI's Fetch), and
what the cache holds.

Everything goes into huggingface_hub's own cache (HF_HOME / HF_HUB_CACHE) through its own calls
(`snapshot_download`, `hf_hub_download`, `scan_cache_dir`), so a run that later loads the model
with `from_pretrained` finds it there, also with HF_HUB_OFFLINE=1.

What is fetched (docs/hub.md, "Fetching models ahead of a run"):
- a model repo (`owner/name`): for a diffusers repo (model_index.json), model_index.json and the
  folders of its parts (but `safety_checker`, which no adapter loads); in each folder the
  .safetensors weights only when there are some (else .bin), and no `<name>.<variant>.safetensors`
  copies (fp16, ...) next to the plain file. A repo without model_index.json: all its files but
  docs and pictures, with the same weight rules;
- from a job file: `model.name_or_path`, `model.extras_name_or_path` (its parts but the denoiser),
  `model.vae_path` (its vae/), and the LoRA files `model.assistant_lora_path`,
  `network.pretrained_lora_path` and the accuracy-recovery adapter in `model.qtype` (one file
  each, picked as aitk.hub_files picks it). References that are local paths are skipped.

The token is the job's (aitk.hub_files.use_job_token) or the one given; errors are one line
(aitk.hub_files.access_message, plus "could not reach" for a network that is down).

Nothing heavy is imported at module level: `aitk --help` does not pay for this module.
"""

from __future__ import annotations

import posixpath
import re
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aitk.config.schema import JobFile

__all__ = [
    "FetchError",
    "FetchTarget",
    "FetchPlan",
    "target_from_id",
    "job_targets",
    "select_files",
    "plan_target",
    "download",
    "fetch",
    "cache_report",
    "delete_cached",
    "run_fetch_command",
]

#: pipeline parts no adapter loads (SD 1.x's safety checker is 1.2 GB)
UNUSED_PARTS = ("safety_checker",)
#: the denoiser folders: `extras_name_or_path` gives every part but these
DENOISER_PARTS = ("unet", "transformer", "transformer_2")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".onnx_data",
                   ".gguf", ".ot", ".pb", ".tflite")
#: files of a repo without model_index.json that nothing loads
NOT_LOADED_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".webp", ".gif", ".mp4", ".pdf")
_VARIANT = re.compile(r"^(?P<base>[^.]+)\.(?P<variant>[A-Za-z0-9_]+)(?:-\d{5}-of-\d{5})?\.safetensors$")
JOB_SUFFIXES = (".yaml", ".yml", ".json", ".jsonc")
ID_KEY = "fetch-model"

ByteSink = Callable[[int], None]


class FetchError(RuntimeError):
    """A model that could not be fetched; str() is the reason in one line."""


@dataclass(frozen=True)
class FetchTarget:
    """One thing to fetch: a repo's files (`filename` None) or one file of a repo (a LoRA).

    `key`: where it was named (the job setting, or "fetch-model"); `reference`: as written."""

    key: str
    reference: str
    repo_id: str
    filename: str | None = None
    revision: str | None = None
    lora: bool = False  # a repo named as a LoRA reference: its one LoRA file (hub_files.pick_lora_file)
    only_parts: tuple[str, ...] | None = None  # of a diffusers repo, only these folders
    skip_parts: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.repo_id}/{self.filename}" if self.filename else self.repo_id


@dataclass
class FetchPlan:
    """What fetching `target` means now: the files (path -> bytes) at `commit`, those in the cache."""

    target: FetchTarget
    commit: str
    files: dict[str, int]
    cached: set[str] = field(default_factory=set)  # in the cache before this fetch
    prefetched: set[str] = field(default_factory=set)  # downloaded while planning (model_index.json)

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def cached_bytes(self) -> int:
        return sum(size for path, size in self.files.items() if path in self.cached)

    @property
    def missing_bytes(self) -> int:
        """To download, counting what planning downloaded."""
        return self.total_bytes - self.cached_bytes

    @property
    def prefetched_bytes(self) -> int:
        return sum(self.files[p] for p in self.prefetched if p in self.files)


# ------------------------------------------------------------------------------------ targets
def is_job_argument(text: str) -> bool:
    """`aitk fetch-model X`: a job file (an existing file, or a name ending in .yaml / .json) or a hub id."""
    path = Path(text).expanduser()
    return path.is_file() or text.lower().endswith(JOB_SUFFIXES)


def target_from_id(text: str, revision: str | None = None, *, key: str = ID_KEY) -> FetchTarget:
    """`owner/name` (a model repo) or `owner/name/path/in/repo` (one file of it)."""
    from aitk.hub_files import HubFile, HubRepo, parse_file_reference

    text = (text or "").strip()
    found = parse_file_reference(text) if text else None
    if isinstance(found, HubRepo):
        return FetchTarget(key, text, found.repo_id, revision=revision)
    if isinstance(found, HubFile):
        return FetchTarget(key, text, found.repo_id, filename=found.filename, revision=revision)
    raise FetchError(
        f"{key}: {text!r} is not a Hugging Face model id; give owner/name (a model repo), owner/name/file "
        "(one file of it) or a job file (.yaml)"
    )


def job_targets(job: JobFile) -> tuple[list[FetchTarget], list[str]]:
    """Every hub model and LoRA file the job's processes name, once each, and notes on the
    references that are not fetched (local paths are not mentioned)."""
    from aitk.hub_files import HubFile, HubRepo, parse_file_reference

    targets: list[FetchTarget] = []
    notes: list[str] = []

    def add(target: FetchTarget) -> None:
        if not any(t.label == target.label and t.only_parts == target.only_parts
                   and t.skip_parts == target.skip_parts for t in targets):
            targets.append(target)

    for process in job.config.process:
        model = process.model
        name = (model.name_or_path or "").strip()
        found = parse_file_reference(name) if name else None
        if isinstance(found, HubRepo):
            add(FetchTarget("model.name_or_path", name, found.repo_id))
        elif isinstance(found, HubFile):
            notes.append(f"model.name_or_path: {name!r} is not a repo id (owner/name); the run resolves it when it "
                         "starts")
        extras = model.extras_name_or_path or model.model_kwargs.get("extras_name_or_path")
        for key, value, only, skip in (
            ("model.extras_name_or_path", extras, None, DENOISER_PARTS),
            ("model.vae_path", model.vae_path, ("vae",), ()),
        ):
            if not isinstance(value, str) or not value.strip():
                continue
            found = parse_file_reference(value)
            if isinstance(found, HubRepo):
                add(FetchTarget(key, value.strip(), found.repo_id, only_parts=only, skip_parts=skip))
            elif isinstance(found, HubFile):
                add(FetchTarget(key, value.strip(), found.repo_id, filename=found.filename))
        loras = [("model.assistant_lora_path", model.assistant_lora_path)]
        if process.network is not None:
            loras.append(("network.pretrained_lora_path", process.network.pretrained_lora_path))
        if model.qtype and "|" in model.qtype:
            loras.append(("model.qtype", model.qtype.split("|", 1)[1]))
        for key, value in loras:
            if not value or not value.strip():
                continue
            found = parse_file_reference(value)
            if isinstance(found, HubFile):
                add(FetchTarget(key, value.strip(), found.repo_id, filename=found.filename))
            elif isinstance(found, HubRepo):
                add(FetchTarget(key, value.strip(), found.repo_id, lora=True))
    return targets, notes


# -------------------------------------------------------------------------------- file choice
def _parts(model_index: Mapping[str, Any]) -> list[str]:
    """The part folders model_index.json names (`"vae": ["diffusers", "AutoencoderKL"]`)."""
    return [k for k, v in model_index.items() if not k.startswith("_") and isinstance(v, (list, tuple))
            and len(v) == 2 and v[0] and v[1]]


def _has_plain(base: str, names: set[str]) -> bool:
    if f"{base}.safetensors" in names or f"{base}.safetensors.index.json" in names:
        return True
    return any(n.startswith(f"{base}-") and n.endswith(".safetensors") and not _VARIANT.match(n) for n in names)


def select_files(
    files: Iterable[str],
    model_index: Mapping[str, Any] | None,
    *,
    only_parts: tuple[str, ...] | None = None,
    skip_parts: tuple[str, ...] = (),
) -> list[str]:
    """The files of a repo a run loads (see the module docstring), sorted."""
    files = list(files)
    if model_index is not None:
        parts = {p for p in _parts(model_index) if p not in UNUSED_PARTS and p not in skip_parts
                 and (only_parts is None or p in only_parts)}
        scope = [p for p in files if p == "model_index.json" or ("/" in p and p.split("/", 1)[0] in parts)]
    else:
        scope = [p for p in files if not posixpath.basename(p).startswith(".")
                 and not p.lower().endswith(NOT_LOADED_SUFFIXES)]
    by_folder: dict[str, list[str]] = {}
    for path in scope:
        by_folder.setdefault(posixpath.dirname(path), []).append(path)
    keep: list[str] = []
    for paths in by_folder.values():
        names = {posixpath.basename(p) for p in paths}
        weights = [n.lower() for n in names if n.lower().endswith(WEIGHT_SUFFIXES)]
        prefer = next((s for s in (".safetensors", ".bin") if any(w.endswith(s) for w in weights)), None)
        for path in paths:
            name = posixpath.basename(path)
            low = name.lower()
            if prefer and low.endswith(WEIGHT_SUFFIXES) and not low.endswith(prefer):
                continue  # the other formats of the same weights
            variant = _VARIANT.match(name)
            if variant and _has_plain(variant.group("base"), names):
                continue  # diffusion_pytorch_model.fp16.safetensors next to the plain file
            keep.append(path)
    return sorted(keep)


# ---------------------------------------------------------------------------------- progress
def _byte_bar(sink: ByteSink | None) -> type:
    """A silent tqdm class for huggingface_hub whose byte bars report each chunk to `sink`.

    snapshot_download sums its files into one "bytes written" bar and one "transfer" bar (the
    same bytes, for Xet); only the first is counted. hf_hub_download's own bar is a byte bar too."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    lock = threading.Lock()

    class _Bytes(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            name = str(kwargs.get("name") or "")
            self._counted = sink is not None and kwargs.get("unit") == "B" and not name.endswith("transfer")
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self._counted and n:
                with lock:
                    sink(int(n))  # type: ignore[misc]
            return super().update(n)

    return _Bytes


# ------------------------------------------------------------------------------------ errors
def _unreachable(exc: BaseException) -> bool:
    from aitk.hub_files import _chain

    for error in _chain(exc):
        if isinstance(error, (ConnectionError, TimeoutError)):
            return True
        if any(k.__name__ in ("TransportError", "NetworkError", "TimeoutException") for k in type(error).__mro__):
            return True
    return False


def _endpoint() -> str:
    from aitk.hub_files import _endpoint as hub_endpoint

    return hub_endpoint()


def one_line(exc: BaseException, target: FetchTarget) -> str:
    """The reason `target` could not be fetched, in one line naming it and what to do."""
    from aitk.hub_files import HubFileError, access_message, is_offline

    if isinstance(exc, (FetchError, HubFileError)):
        return str(exc)
    if not is_offline() and _unreachable(exc):
        first = " ".join(str(exc).split())[:200] or type(exc).__name__
        return (f"{target.key}: could not reach {_endpoint()} to fetch {target.label} ({type(exc).__name__}: {first}); "
                "check the network connection (and HF_ENDPOINT or the proxy settings), then run it again")
    return access_message(exc, key=target.key, reference=target.reference, repo_id=target.repo_id)


def _check_online(target: FetchTarget) -> None:
    from aitk.hub_files import is_offline

    if is_offline():
        raise FetchError(f"{target.key}: HF_HUB_OFFLINE is set, so {target.label} cannot be downloaded; unset "
                         "HF_HUB_OFFLINE (or set it to 0) to fetch models")


# ---------------------------------------------------------------------------------- fetching
def plan_target(target: FetchTarget, *, token: str | None = None, on_bytes: ByteSink | None = None) -> FetchPlan:
    """Ask the Hub what fetching `target` takes: the commit, the files and their sizes, which are
    cached. A diffusers repo's model_index.json is downloaded here (its parts say what to fetch).
    Raises FetchError (one line)."""
    _check_online(target)
    try:
        return _plan(target, token, on_bytes)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line a user can act on
        raise FetchError(one_line(exc, target)) from exc


def _plan(target: FetchTarget, token: str | None, on_bytes: ByteSink | None) -> FetchPlan:
    import json

    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.hf_api import RepoFile

    from aitk.hub_files import pick_lora_file

    api = HfApi(endpoint=_endpoint(), token=token, library_name="aitk")
    commit = api.model_info(target.repo_id, revision=target.revision or "main").sha or target.revision or "main"
    sizes = {e.path: int(e.size or 0) for e in api.list_repo_tree(target.repo_id, recursive=True, revision=commit)
             if isinstance(e, RepoFile)}
    prefetched: set[str] = set()
    if target.filename is not None:
        if target.filename not in sizes:
            raise FetchError(f"{target.key}: {target.reference!r}: repo {target.repo_id} has no file "
                             f"{target.filename}; check the path inside the repo")
        chosen = [target.filename]
    elif target.lora:
        chosen = [pick_lora_file(target.repo_id, sorted(sizes), key=target.key)]
    else:
        model_index = None
        if "model_index.json" in sizes:
            found = try_to_load_from_cache(target.repo_id, "model_index.json", revision=commit)
            if not isinstance(found, str):
                found = hf_hub_download(target.repo_id, "model_index.json", revision=commit, endpoint=_endpoint(),
                                        token=token, tqdm_class=_byte_bar(on_bytes))
                prefetched.add("model_index.json")
            model_index = json.loads(Path(found).read_text(encoding="utf-8"))
        chosen = select_files(sizes, model_index, only_parts=target.only_parts, skip_parts=target.skip_parts)
        if not chosen:
            raise FetchError(f"{target.key}: repo {target.repo_id} holds no files a run loads")
    files = {p: sizes[p] for p in chosen}
    cached = {p for p in files if p not in prefetched
              and isinstance(try_to_load_from_cache(target.repo_id, p, revision=commit), str)}
    return FetchPlan(target, commit, files, cached, prefetched)


def _pattern(path: str) -> str:
    """`path` as an fnmatch pattern matching only itself."""
    return re.sub(r"([\[\]*?])", r"[\1]", path)


def download(plan: FetchPlan, *, token: str | None = None, on_bytes: ByteSink | None = None) -> Path:
    """Download the plan's files into the cache (nothing for those already there); the local
    folder (a repo's snapshot) or file. Raises FetchError (one line)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    target = plan.target
    _check_online(target)
    bar = _byte_bar(on_bytes)
    try:
        if target.filename is not None or target.lora:
            (filename,) = plan.files
            return Path(hf_hub_download(target.repo_id, filename, revision=target.revision, endpoint=_endpoint(),
                                        token=token, tqdm_class=bar))
        # the branch (not the commit) so that refs/<branch> is written: offline runs find the snapshot
        return Path(snapshot_download(target.repo_id, revision=target.revision, endpoint=_endpoint(), token=token,
                                      allow_patterns=[_pattern(p) for p in plan.files], tqdm_class=bar))
    except Exception as exc:  # noqa: BLE001
        raise FetchError(one_line(exc, target)) from exc


@dataclass
class FetchProgress:
    """What a fetch reports while it runs (the CLI draws it, the web UI polls it)."""

    state: str = "planning"  # planning | downloading | completed | failed
    total_bytes: int = 0  # still to download when planned
    done_bytes: int = 0
    cached_bytes: int = 0
    files: int = 0
    current: str | None = None
    items: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def fetch(
    targets: list[FetchTarget],
    *,
    token: str | None = None,
    progress: FetchProgress | None = None,
    on_change: Callable[[FetchProgress], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> FetchProgress:
    """Plan every target, then download what is missing. Never raises: the progress says how it
    ended (`state` completed or failed, `error` the one line)."""
    progress = progress or FetchProgress()
    lock = threading.Lock()
    changed = on_change or (lambda _p: None)
    say = log or (lambda _m: None)

    def on_bytes(n: int) -> None:
        with lock:
            progress.done_bytes += n
        changed(progress)

    plans: list[FetchPlan] = []
    try:
        progress.state = "planning"
        changed(progress)
        for target in targets:
            progress.current = target.label
            changed(progress)
            plan = plan_target(target, token=token, on_bytes=None)
            plans.append(plan)
            progress.total_bytes += plan.missing_bytes
            progress.done_bytes += plan.prefetched_bytes
            progress.cached_bytes += plan.cached_bytes
            progress.files += len(plan.files)
            progress.items.append({"key": target.key, "reference": target.reference, "repo_id": target.repo_id,
                                   "label": target.label, "files": len(plan.files), "bytes": plan.total_bytes,
                                   "cached_bytes": plan.cached_bytes, "path": None, "done": False})
            say(f"{target.key}: {target.label}: {len(plan.files)} file(s), {_size(plan.total_bytes)}"
                + (f", {_size(plan.cached_bytes)} already in the cache" if plan.cached_bytes else ""))
            changed(progress)
        progress.state = "downloading"
        changed(progress)
        for plan, item in zip(plans, progress.items):
            progress.current = plan.target.label
            changed(progress)
            path = download(plan, token=token, on_bytes=on_bytes)
            item["path"], item["done"] = str(path), True
            changed(progress)
    except FetchError as exc:
        progress.state, progress.error = "failed", str(exc)
    except Exception as exc:  # noqa: BLE001 - a fetch reports, it does not crash the server or the command
        progress.state, progress.error = "failed", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    else:
        progress.state = "completed"
        progress.done_bytes = max(progress.done_bytes, progress.total_bytes)  # resumed files count from their start
        progress.current = None
    changed(progress)
    return progress


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# ------------------------------------------------------------------------------------ the cache
def cache_paths() -> dict[str, str]:
    """HF_HOME and the hub cache folder, as huggingface_hub resolves them now."""
    from huggingface_hub import constants

    return {"hf_home": str(constants.HF_HOME), "hub_cache": str(constants.HF_HUB_CACHE)}


def cache_report(limit_warnings: int = 20) -> dict[str, Any]:
    """The hub cache: where it is, its size, and its repos (newest used first) through
    huggingface_hub's scan_cache_dir."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    out: dict[str, Any] = {**cache_paths(), "exists": False, "size_on_disk": 0, "repos": [], "warnings": []}
    try:
        info = scan_cache_dir(out["hub_cache"])
    except CacheNotFound:
        return out
    except OSError as exc:
        out["warnings"] = [f"the cache cannot be read: {exc.strerror or exc}"]
        return out
    repos = sorted(info.repos, key=lambda r: (-(r.last_accessed or 0), r.repo_id))
    out.update(exists=True, size_on_disk=int(info.size_on_disk),
               warnings=[str(w) for w in info.warnings][:limit_warnings])
    out["repos"] = [{
        "repo_id": r.repo_id, "repo_type": r.repo_type, "size_on_disk": int(r.size_on_disk), "nb_files": r.nb_files,
        "last_accessed": r.last_accessed, "last_modified": r.last_modified, "revisions": len(r.revisions),
        "refs": sorted({ref for rev in r.revisions for ref in rev.refs}),
    } for r in repos]
    return out


def delete_cached(repo_id: str, repo_type: str = "model") -> int | None:
    """Delete every cached revision of a repo through huggingface_hub's delete strategy; the bytes
    freed, or None when the cache does not hold it."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_paths()["hub_cache"])
    except CacheNotFound:
        return None
    repo = next((r for r in info.repos if r.repo_id == repo_id and r.repo_type == repo_type), None)
    if repo is None:
        return None
    strategy = info.delete_revisions(*(rev.commit_hash for rev in repo.revisions))
    freed = int(strategy.expected_freed_size)
    strategy.execute()
    return freed


# ------------------------------------------------------------------------------------ command
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_fetch_command(target: str, *, revision: str | None = None, token_from_job: str | None = None) -> int:
    """`aitk fetch-model ID|JOB.yaml`: the exit code (0 fetched, 1 failed, 2 bad input)."""
    from aitk.hub_files import use_job_token

    if is_job_argument(target):
        from aitk.config.loader import JobFileError, load_job_file

        if revision:
            _stderr("error: fetch-model: --revision goes with a model id, not a job file")
            return EXIT_BAD_INPUT
        try:
            loaded = load_job_file(target)
        except JobFileError as exc:
            _stderr(str(exc))
            return EXIT_BAD_INPUT
        use_job_token(token_from_job or target)
        targets, notes = job_targets(loaded.job)  # type: ignore[arg-type]
        for note in notes:
            _stderr(f"note: {note}")
        if not targets:
            _stderr(f"{target}: the job names no model on the Hugging Face Hub (its models are local paths); "
                    "nothing to fetch")
            return EXIT_OK
    else:
        try:
            targets = [target_from_id(target, revision)]
        except FetchError as exc:
            _stderr(f"error: {exc}")
            return EXIT_BAD_INPUT
        if token_from_job:
            use_job_token(token_from_job)
    return _fetch_with_bar(targets)


def _fetch_with_bar(targets: list[FetchTarget]) -> int:
    from tqdm.auto import tqdm

    bar: Any = None
    shown = 0

    def on_change(p: FetchProgress) -> None:
        nonlocal bar, shown
        if p.state not in ("downloading", "completed") or p.total_bytes == 0:
            return
        if bar is None:
            bar = tqdm(total=p.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="downloading",
                       file=sys.stderr, mininterval=0.3, dynamic_ncols=True)
        done = min(p.done_bytes, p.total_bytes)
        if done > shown:
            bar.update(done - shown)
            shown = done

    result = fetch(targets, on_change=on_change, log=_stderr)
    if bar is not None:
        bar.close()
    if result.state != "completed":
        _stderr(f"error: {result.error}")
        return EXIT_FAILED
    for item in result.items:
        _stderr(f"{item['label']} -> {item['path']}")
    fetched = _size(result.total_bytes)
    cached = f" ({_size(result.cached_bytes)} were in the cache already)" if result.cached_bytes else ""
    _stderr(f"fetched {len(result.items)} model(s), {result.files} file(s): {fetched} downloaded{cached} into "
            f"{cache_paths()['hub_cache']}")
    return EXIT_OK
