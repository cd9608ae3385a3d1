"""Flex.2's training options (model.model_kwargs) as upstream's Flex2 trainer reads them.

Kept free of torch so that `aitk validate` checks them without loading anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


class Flex2InputError(ValueError):
    """A Flex.2 input or option that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class Flex2Options:
    """model.model_kwargs of a Flex.2 job, as upstream's Flex2 trainer reads them.

    Chances are per batch. Without inpaint images in the data (this version reads none), an
    inpaint area exists only when do_random_inpainting draws one.
    """

    #: chance that a drawn inpaint mask is inverted (learns outpainting too)
    invert_inpaint_mask_chance: float = 0.0
    #: chance of a step without inpainting (blank inpaint input)
    inpaint_dropout: float = 0.0
    #: chance of a step without the control image (zero control latents)
    control_dropout: float = 0.0
    #: chance that a step replaces a given inpaint image by a random mask (none are given here)
    inpaint_random_chance: float = 0.0
    #: draw random blob masks to inpaint when the data gives none
    do_random_inpainting: bool = False
    #: blur the inpaint mask half of the time (soft edges)
    random_blur_mask: bool = False
    #: grow or shrink the mask a little after it cut the latents (edges that do not match exactly)
    random_dialate_mask: bool = False

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> "Flex2Options":
        """The options in `kwargs` (other keys are other settings' business); raises Flex2InputError
        naming a value that is not a chance from 0 to 1 or not true / false."""
        values: dict[str, Any] = {}
        for spec in fields(cls):
            if spec.name not in kwargs:
                continue
            value = kwargs[spec.name]
            where = f"model.model_kwargs.{spec.name}"
            if isinstance(spec.default, bool):
                if not isinstance(value, bool):
                    raise Flex2InputError(f"{where}: {value!r} is not true or false")
            else:
                if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                    raise Flex2InputError(f"{where}: {value!r} is not a chance from 0 to 1 (e.g. 0.5)")
                value = float(value)
            values[spec.name] = value
        return cls(**values)


def option_problems(kwargs: Mapping[str, Any]) -> list[str]:
    """What is wrong with the Flex.2 options in `kwargs` (empty: nothing), one message each."""
    problems = []
    for spec in fields(Flex2Options):
        if spec.name in kwargs:
            try:
                Flex2Options.from_kwargs({spec.name: kwargs[spec.name]})
            except Flex2InputError as exc:
                problems.append(str(exc))
    return problems
