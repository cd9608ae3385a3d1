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


def supported_archs() -> list[str]:
    return sorted(ADAPTERS)
