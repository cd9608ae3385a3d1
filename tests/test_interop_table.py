"""docs/lora-formats.md's interop table states what the interop tests found (scripts/interop_table.py
--check), and the check itself compares claims, not run dates or difference values.

The results come from the interop tests of the same `make test` run: the Makefile records them
afresh and runs this file after the rest of the suite. Run alone, it reads the results of the last
run of those tests (.cache/interop-results.json, or $AITK_INTEROP_RESULTS).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import interop_results

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "interop_table.py"
sys.path.insert(0, str(SCRIPT.parent))
import interop_table  # noqa: E402


def test_the_docs_table_states_the_recorded_results():
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, (
        f"{done.stderr.strip()}\n(results: {interop_results.results_path()}; `make test` records them before "
        "this check; to rewrite the table run the commands in scripts/interop_table.py's docstring)")


# --- the script on made-up results -------------------------------------------------------------


def result(arch: str = "sd1", network_type: str = "lora", loader: str = "aitk merge", ok: bool = True,
           max_diff: float | None = 7.6e-07, when: str = "2026-11-26T10:00:00+00:00", test: str = "tests/test_x.py::t",
           layout: str = "comfyui", note: str = "") -> dict:
    entry = {"test": test, "arch": arch, "network_type": network_type, "loader": loader, "layout": layout,
             "ok": ok, "max_diff": max_diff, "note": note, "when": when}
    assert set(interop_results.KEY_FIELDS) <= set(entry)
    return entry


@pytest.fixture
def files(tmp_path: Path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Interop\n\nbefore\n{interop_table.START}\nold table\n{interop_table.END}\nafter\n")
    results = tmp_path / "results.json"

    def write(*entries: dict) -> list[str]:
        results.write_text(json.dumps({"results": list(entries)}))
        return ["--results", str(results), "--doc", str(doc)]

    return doc, write


def test_writing_then_checking_agrees_and_keeps_the_text_around(files):
    doc, write = files
    args = write(result(), result(loader="aitk loader (round trip)", max_diff=0.0))
    assert interop_table.main(args) == 0
    text = doc.read_text()
    assert text.startswith("# Interop\n\nbefore\n") and text.endswith(f"{interop_table.END}\nafter\n")
    assert "| SD 1.5 (`sd1`) | LoRA |" in text and "yes, exact (max diff 7.6e-07, 1 check)" in text
    assert "run 2026-11-26" in text
    assert interop_table.main(["--check", *args]) == 0


def test_a_new_run_with_other_dates_and_diffs_still_checks(files):
    doc, write = files
    assert interop_table.main(write(result())) == 0
    rerun = write(result(max_diff=8.3e-07, when="2027-01-05T09:00:00+00:00"))
    assert interop_table.main(["--check", *rerun]) == 0
    assert "7.6e-07" in doc.read_text()  # --check writes nothing


@pytest.mark.parametrize("change", [
    {"ok": False, "network_type": "dora", "loader": "diffusers load_lora_weights", "note": "drops dora_scale"},
    {"arch": "sdxl"},
    {"test": "tests/test_y.py::u"},
])
def test_a_changed_claim_is_out_of_date(files, change: dict, capsys: pytest.CaptureFixture[str]):
    _, write = files
    base = result(network_type="dora", loader="diffusers load_lora_weights", layout="comfyui")
    assert interop_table.main(write(base)) == 0
    # the expected "no" (diffusers drops DoRA's scale from comfyui files) is not an unexpected failure
    assert interop_table.main(["--check", *write(base, {**base, **change, "note": change.get("note", "x")})]) == 1
    assert "out of date" in capsys.readouterr().err


def test_an_unexpected_failure_blocks_writing(files, capsys: pytest.CaptureFixture[str]):
    doc, write = files
    before = doc.read_text()
    assert interop_table.main(write(result(ok=False, note="output differs"))) == 1
    assert doc.read_text() == before
    assert "some interop checks failed" in capsys.readouterr().err


def test_missing_results_and_markers_are_errors(files, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    doc, write = files
    assert interop_table.main(["--check", "--results", str(tmp_path / "none.json"), "--doc", str(doc)]) == 1
    assert "run the interop tests first" in capsys.readouterr().err
    doc.write_text("no markers here\n")
    assert interop_table.main(write(result())) == 1
    assert "marker comments are missing" in capsys.readouterr().err
