"""`aitk dataset inspect`: the report, the exit code, and that no model library is imported."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from aitk.data.inspect import inspect_command

ROOT = Path(__file__).resolve().parents[1]


def save_image(path: Path, w: int, h: int, seed: int = 0) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)


def job(tmp_path: Path, datasets: list[dict], trigger: str | None = "sks") -> Path:
    process = {"type": "sd_trainer", "training_folder": str(tmp_path / "out"), "trigger_word": trigger,
               "datasets": datasets, "model": {"name_or_path": "not/loaded"}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"job": "extension", "config": {"name": "insp", "process": [process]}}))
    return path


def dataset(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    for i, (w, h) in enumerate([(128, 128), (128, 128), (192, 128), (100, 100), (128, 256)]):
        save_image(d / f"i{i}.png", w, h, seed=i)
    (d / "i0.txt").write_text("red car, street, night")
    (d / "i1.txt").write_text("blue car, street")
    (d / "metadata.jsonl").write_text('{"file_name": "i2.png", "text": "green car, field"}\n')
    (d / "empty.jpg").write_bytes(b"")
    (d / "junk.png").write_bytes(b"not an image")
    (d / "junk2.png").write_bytes(b"also not an image")
    save_image(d / "small.png", 20, 20)
    return d


def test_report(tmp_path, capsys):
    d = dataset(tmp_path)
    path = job(tmp_path, [{"folder_path": str(d), "resolution": [128], "default_caption": "a car",
                           "num_repeats": 2}])
    assert inspect_command([str(path)]) == 0
    out = capsys.readouterr().out
    assert "datasets[0]" in out and str(d) in out
    assert "items: 5 images used of 9 named like images, 4 skipped; 10 samples per epoch" in out
    assert "empty file (1): empty.jpg" in out
    assert "not a readable image (2): junk.png, junk2.png" in out
    assert "too small (1): small.png" in out
    # 100x100 is below every 128 bucket (own 64x64 bucket); 192x128 fits only 128x128
    assert "@128: 64x64: 1, 64x256: 1, 128x128: 3" in out
    assert "captions: 2 from .txt files, 1 from metadata.jsonl, 2 default" in out
    assert "caption length (words, trigger included): mean" in out and "max 5" in out
    assert "'street' (2)" in out and "top tags" in out


def test_bucket_histogram_lists_sizes_and_counts(tmp_path, capsys):
    d = dataset(tmp_path)
    path = job(tmp_path, [{"folder_path": str(d), "resolution": [64, 128]}])
    assert inspect_command([str(path)]) == 0
    out = capsys.readouterr().out
    assert "@64: 64x64: 5" in out  # every image fits a 64x64 bucket at resolution 64 (64 px steps)
    line = next(line for line in out.splitlines() if "@128:" in line)
    counts = [int(part.rsplit(":", 1)[1]) for part in line.split("@128:")[1].split(",")]
    assert sum(counts) == 5


def test_unusable_dataset_returns_1_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    good = dataset(tmp_path)
    path = job(tmp_path, [{"folder_path": str(good)}, {"folder_path": str(bad)},
                          {"folder_path": str(tmp_path / "missing")}])
    assert inspect_command([str(path)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert "none of the 1 image files" in captured.out and "does not exist" in captured.out
    assert "datasets[0]" in captured.out  # the good one is still reported


def test_invalid_job_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("config: {name: x, process: [{datasets: []}]}")
    assert inspect_command([str(path)]) == 1
    assert inspect_command([str(tmp_path / "nope.yaml")]) == 1
    assert inspect_command([]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_no_model_libraries_imported(tmp_path):
    d = dataset(tmp_path)
    path = job(tmp_path, [{"folder_path": str(d)}])
    code = (
        "import sys\n"
        "from aitk.data.inspect import inspect_command\n"
        f"rc = inspect_command([{str(path)!r}])\n"
        "heavy = [m for m in ('diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "sys.exit(rc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "items: 5 images used" in result.stdout
