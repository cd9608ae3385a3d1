"""The architectures this version trains: `model.arch` key -> adapter class (imported lazily).

Kept free of torch imports so that validating a job file stays fast.
"""

from __future__ import annotations

# arch key -> "module:Class"; modules are imported lazily so a job loads only its own family.
ADAPTERS: dict[str, str] = {
    "sd1": "aitk.models.sd15:SD15Adapter",
    "sd15": "aitk.models.sd15:SD15Adapter",
    "sd2": "aitk.models.sd15:SD15Adapter",
    "sdxl": "aitk.models.sdxl:SDXLAdapter",
    "flux": "aitk.models.flux:FluxAdapter",
    "flux_kontext": "aitk.models.flux:FluxKontextAdapter",
    "wan21": "aitk.models.wan:Wan21Adapter",
    "wan21_i2v": "aitk.models.wan:Wan21I2VAdapter",
    "wan22_14b": "aitk.models.wan:Wan22Adapter",
    "wan22_14b_i2v": "aitk.models.wan:Wan22I2VAdapter",
}


# What the data pipeline must know of each architecture without importing it (aitk dataset
# inspect loads no model): (bucket size multiple in pixels, accepted frame counts or None for
# image models). Each adapter class states the same values; a test keeps them in step.
DATA_FACTS: dict[str, tuple[int, str | None]] = {
    "sd1": (64, None),
    "sd15": (64, None),
    "sd2": (64, None),
    "sdxl": (64, None),
    "flux": (16, None),
    "flux_kontext": (16, None),
    "wan21": (16, "4k+1"),
    "wan21_i2v": (16, "4k+1"),
    "wan22_14b": (16, "4k+1"),
    "wan22_14b_i2v": (16, "4k+1"),
}


# Architectures whose adapter takes the dataset's control images (ModelAdapter.uses_controls), so
# `aitk validate` can say that control_path is unused elsewhere without importing a model.
CONTROL_ARCHS: frozenset[str] = frozenset({"flux_kontext"})


def supported_archs() -> list[str]:
    return sorted(ADAPTERS)


def data_facts(arch: str) -> tuple[int, str | None]:
    """(bucket divisibility, frame rule) of `arch`; SD 1.5's for an unknown name."""
    return DATA_FACTS.get(arch, DATA_FACTS["sd1"])
