"""Python's cyclic garbage collector while `aitk run` starts a run.

Importing torch, transformers and diffusers and loading a model make about half a million Python
objects that live as long as the run. On the way, the collector's full passes walk all of them
again and again: 7 passes, 0.75 s of a 4.5 s start on the tiny model (measured), for next to
nothing freed. So while a run starts, `aitk run` holds back the full passes only (`pause`): the
young generations are still collected, so short-lived garbage of the model load is freed as
before. When the training loop begins, one full pass frees what start-up left in cycles,
everything still alive is moved to the permanent generation, which collections never walk
(`gc.freeze`), and full passes are allowed again (`resume`). When
the run ends, `restore` thaws those objects, so that whatever of them has become garbage is
collected if the process goes on (a second job of the same `aitk run`, a caption job).

Only `aitk run` pauses; a trainer used in-process (tests, notebooks) leaves the collector alone.
"""

from __future__ import annotations

import gc

_NO_FULL_PASS = 1 << 30  # gen2 threshold: full passes after this many gen1 collections, i.e. never

_saved_thresholds: tuple[int, ...] | None = None  # set while paused
_frozen = False


def pause() -> None:
    global _saved_thresholds
    if _saved_thresholds is None:
        _saved_thresholds = gc.get_threshold()
        gc.set_threshold(*_saved_thresholds[:2], _NO_FULL_PASS)


def resume() -> None:
    """The training loop starts: one full pass frees what start-up left in cycles (a big model's
    temporaries must not stay frozen for the whole run), the rest is frozen, and full passes are
    allowed again."""
    global _saved_thresholds, _frozen
    if _saved_thresholds is not None:
        gc.collect()
        gc.freeze()
        _frozen = True
        gc.set_threshold(*_saved_thresholds)
        _saved_thresholds = None


def restore() -> None:
    """The collector as it was before `pause`, with nothing frozen."""
    global _saved_thresholds, _frozen
    if _saved_thresholds is not None:
        gc.set_threshold(*_saved_thresholds)
        _saved_thresholds = None
    if _frozen:
        gc.unfreeze()
        _frozen = False
