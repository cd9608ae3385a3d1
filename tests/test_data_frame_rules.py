"""The video families' frame-count rules ("Ak+B": WAN's 4k+1, LTX-2's 8k+1) and spatial multiples
come from the adapters' declared facts, and the data layer honours each: every clip is snapped
down to the largest frame count the rule accepts that the clip holds (never more frames than it
has), and frames are bucketed to multiples of the family's spatial multiple, never upscaled."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from aitk.config.schema import DatasetConfig
from aitk.data import TrainingData
from aitk.data.video import snap_frame_count
from aitk.models import archs
from aitk.models.registry import adapter_class

from test_data_video_training import write_clip  # noqa: E402

#: (clip name, frames, width, height, fps)
CLIPS = [("long_wide", 40, 96, 64, 30), ("tall", 20, 48, 96, 24), ("short", 12, 64, 64, 12), ("tiny", 3, 64, 40, 8)]
#: every distinct (spatial multiple, frame rule) a registered video family declares
RULES = sorted({facts for facts in archs.DATA_FACTS.values() if facts[1] is not None})


def test_video_families_declare_the_facts_the_data_layer_reads() -> None:
    """archs.DATA_FACTS (read without importing a model) equals each adapter class's own facts."""
    for arch, (multiple, rule) in archs.DATA_FACTS.items():
        if rule is None:
            continue
        cls = adapter_class(arch)
        assert (cls.bucket_divisibility, cls.frame_rule) == (multiple, rule), arch
    assert ("ltx2" in archs.DATA_FACTS) and archs.data_facts("ltx2") == (32, "8k+1")
    assert archs.data_facts("wan21") == (16, "4k+1")


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("rule_clips")
    for name, frames, w, h, fps in CLIPS:
        write_clip(folder / f"{name}.mp4", frames, w, h, fps=fps)
        (folder / f"{name}.txt").write_text(f"a clip called {name}")
    return folder


def _rule_steps(rule: str) -> tuple[int, int]:
    a, b = rule.split("k")
    return int(a), int(b.lstrip("+") or 0)


@pytest.mark.parametrize(("multiple", "rule"), RULES, ids=[f"{r}-{m}px" for m, r in RULES])
def test_clips_are_snapped_down_to_the_rule_and_bucketed_to_the_multiple(clips: Path, multiple: int, rule: str) -> None:
    step, offset = _rule_steps(rule)
    cfg = DatasetConfig(folder_path=str(clips), resolution=[96], num_frames=17, max_pixels_per_frame=96 * 64,
                        shrink_video_to_frames=True)
    data = TrainingData([cfg], trigger_word=None, divisibility=multiple, batch_size=1, seed=0, log=lambda _: None,
                        frame_rule=rule)
    counts = data.reports[0].frame_counts
    wanted = snap_frame_count(17, rule)
    expected = Counter(min(wanted, snap_frame_count(frames, rule)) for _, frames, *_ in CLIPS)
    assert counts == expected, (rule, counts)
    assert all((n - offset) % step == 0 for n in counts)
    sizes = {name: (w, h) for name, _, w, h, _ in CLIPS}
    seen = set()
    for _ in range(data.batches_per_epoch()):
        batch = data.next_batch()
        frames, height, width = batch.pixels.shape[2:]
        assert height % multiple == 0 and width % multiple == 0, (rule, batch.pixels.shape)
        name = next(clip for clip in sizes if clip in batch.keys[0])
        source = sizes[name]
        assert width <= source[0] and height <= source[1], (batch.keys[0], width, height)  # never upscaled
        assert (frames - offset) % step == 0
        seen.add(name)
    assert len(seen) == len(CLIPS)
