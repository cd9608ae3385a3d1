"""What the property-based fuzz tests (tests/test_fuzz_*.py) share: the example budget and the
Hypothesis settings.

`make test` runs each fuzz test with its base budget, derandomized (the same examples on every
run, so CI is repeatable); `make fuzz` sets AITK_FUZZ_SCALE=10 for ten times as many, drawn at
random (a failure prints the blob that reproduces it). Hypothesis keeps no example database and
writes nothing into the checkout (its home is a folder under the system's temp folder).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis.configuration import set_hypothesis_home_dir

set_hypothesis_home_dir(str(Path(tempfile.gettempdir()) / "aitk-hypothesis"))

SCALE = max(1, int(os.environ.get("AITK_FUZZ_SCALE", "1") or "1"))
TRACEBACK = "Traceback (most recent call last)"


def budget(base: int) -> int:
    """Examples for a test whose `make test` budget is `base`."""
    return base * SCALE


def fuzz_settings(base: int) -> settings:
    """Settings of one fuzz test: `budget(base)` examples, no deadline (no timed asserts), no
    example database, derandomized under `make test`."""
    return settings(
        max_examples=budget(base),
        deadline=None,
        database=None,
        derandomize=SCALE == 1,
        print_blob=True,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )


class Counter:
    """Counts the examples a test really ran (its budget is asserted, not assumed)."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, k: int = 1) -> None:
        self.n += k
