"""Flex.2 (ostris/Flex.2-preview): a FLUX.1-shaped model whose transformer also reads inpaint and
control inputs.

adapter.py (the `flex2` arch: FluxAdapter with the extra input channels and their previews),
inputs.py (the conditioning channels and upstream's model_kwargs options), tiny.py (a random-init
tiny model).
"""

from aitk.models.flex2.adapter import FLEX2_INPUTS, INPAINT_MARK, Flex2Adapter
from aitk.models.flex2.inputs import Flex2InputError, Flex2Options, expected_in_channels, training_inputs
from aitk.models.flex2.tiny import build_tiny_flex2

__all__ = [
    "FLEX2_INPUTS", "INPAINT_MARK", "Flex2Adapter", "Flex2InputError", "Flex2Options", "build_tiny_flex2",
    "expected_in_channels", "training_inputs",
]
