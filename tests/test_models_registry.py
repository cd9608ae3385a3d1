"""The arch table: every arch has an adapter, and the data facts `aitk dataset inspect` uses
without importing a model agree with the adapter classes."""

from __future__ import annotations

import pytest

from aitk.config.schema import ModelConfig
from aitk.models.archs import ADAPTERS, CONTROL_ARCHS, DATA_FACTS, data_facts
from aitk.models.registry import UnknownArchitectureError, adapter_class


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_data_facts_match_the_adapter(arch):
    cls = adapter_class(arch)
    assert arch in cls.arch_names
    assert DATA_FACTS[arch] == (cls.bucket_divisibility, cls.frame_rule)
    assert (arch in CONTROL_ARCHS) == cls.uses_controls


def test_every_arch_has_data_facts_and_legacy_flags_resolve():
    assert set(DATA_FACTS) == set(ADAPTERS)
    assert data_facts("nonsense") == DATA_FACTS["sd1"]
    assert ModelConfig(name_or_path="x", is_flux=True).resolved_arch == "flux"
    assert ModelConfig(name_or_path="x", is_xl=True).resolved_arch == "sdxl"
    with pytest.raises(UnknownArchitectureError, match="use one of"):
        adapter_class("not_an_arch")
