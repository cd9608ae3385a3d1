"""Interop test outcomes -> a JSON results file that scripts/interop_table.py renders.

The tests that load our files in another loader (diffusers' load_lora_weights, our own loader,
aitk merge) call `record(...)` next to their assertion, before it, so a failing comparison is
recorded as a failure too. The table in docs/lora-formats.md is generated from this file, never
typed by hand.

Results go to $AITK_INTEROP_RESULTS, default .cache/interop-results.json in the repository
(git-ignored). Each entry is keyed by (test id, arch, network type, loader, file layout, note): a
re-run replaces its own entries and keeps the others, so running one test file updates its rows
only; `note` tells apart several checks of one test (e.g. the two WAN 2.2 experts).
Several pytest processes may record at once: writes take a lock and replace the file atomically.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import warnings
from pathlib import Path

__all__ = ["LOADERS", "NETWORK_TYPES", "ARCHS", "results_path", "record", "read_results"]

ROOT = Path(__file__).resolve().parent.parent
LOADERS = ("diffusers load_lora_weights", "aitk loader (round trip)", "aitk merge")
NETWORK_TYPES = ("lora", "locon", "dora", "lokr", "loha")
#: the arch keys of aitk.models.archs that results are filed under (sd1 = SD 1.5)
ARCHS = ("sd1", "sdxl", "flux", "flux_kontext", "wan21", "wan21_i2v", "wan22_14b", "wan22_14b_i2v", "zimage", "chroma", "sd3", "qwen_image", "lumina2")
ARCHS += ("pixart", "pixart_sigma", "auraflow")
ARCHS += ("cogview4",)
ARCHS += ("ernie_image",)
ARCHS += ("flex2",)
ARCHS += ("hidream",)
ARCHS += ("wan22_5b",)
ARCHS += ("flux2", "flux2_klein_4b", "flux2_klein_9b")
ARCHS += ("qwen_image_edit", "qwen_image_edit_plus")
ARCHS += ("krea2",)
ARCHS += ("hunyuan_video_1_5", "hunyuan_video_1_5_i2v")
ARCHS += ("ltx2",)
#: file layouts (save_format): comfyui and kohya are the same file
LAYOUTS = ("comfyui", "diffusers")
KEY_FIELDS = ("test", "arch", "network_type", "loader", "layout", "note")


def results_path() -> Path:
    return Path(os.environ.get("AITK_INTEROP_RESULTS") or ROOT / ".cache" / "interop-results.json")


def read_results(path: Path | None = None) -> list[dict]:
    path = path or results_path()
    if not path.exists():
        return []
    return list(json.loads(path.read_text()).get("results", []))


def _test_id() -> str:
    # "tests/test_x.py::test_y[param] (call)" while a test runs
    return os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0] or "unknown"


def record(
    arch: str,
    network_type: str,
    loader: str,
    ok: bool,
    max_diff: float | None = None,
    *,
    layout: str = "comfyui",
    note: str = "",
) -> None:
    """File one outcome: `ok` = the loader reproduced the trainer's output (max abs diff
    `max_diff`, below the test's tolerance). `layout` = the file's key layout (save_format;
    LoKr / LoHa files are always "comfyui"). `note` is shown in the table next to the result.
    Never fails the test: an unwritable results file is a warning."""
    if arch not in ARCHS or network_type not in NETWORK_TYPES or loader not in LOADERS or layout not in LAYOUTS:
        raise ValueError(f"record({arch!r}, {network_type!r}, {loader!r}, layout={layout!r}): unknown name")
    entry = {
        "test": _test_id(),
        "arch": arch,
        "network_type": network_type,
        "loader": loader,
        "layout": layout,
        "ok": bool(ok),
        "max_diff": None if max_diff is None else float(max_diff),
        "note": note,
        "when": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    key = tuple(entry[k] for k in KEY_FIELDS)
    path = results_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # other pytest processes record too
            kept = [
                r for r in read_results(path)
                if tuple(r.get(k) for k in KEY_FIELDS) != key
            ]
            kept.append(entry)
            kept.sort(key=lambda r: (r["arch"], r["network_type"], r["loader"], r["layout"], r["test"]))
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"results": kept}, indent=1) + "\n")
            os.replace(tmp, path)
    except (OSError, ValueError) as exc:  # ValueError: a damaged results file
        warnings.warn(f"interop result not recorded in {path}: {exc}", stacklevel=2)
