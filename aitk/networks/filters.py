"""`network_kwargs.only_if_contains` / `ignore_if_contains` as users write them.

Upstream's job files name modules with their component prefix (`transformer.single_transformer_
blocks.7.proj_out`, `unet.down_blocks...`), others in kohya's form (`lora_unet_down_blocks_0_...`)
or ComfyUI's (`diffusion_model.blocks.0.self_attn.q` for WAN). An entry matches a module when it is
a substring of any of the module's names (`name_forms`: the module path, the path with the
component prefix, its LoRA key stem), so every form selects the same modules. An
`only_if_contains` entry that matches nothing is an error listing the closest names; an
`ignore_if_contains` entry that matches nothing is a warning.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence

NameForms = Callable[[str], Sequence[str]]


def _matches(entry: str, forms: Sequence[str]) -> bool:
    return any(entry in form for form in forms)


def _closest(entry: str, pool: list[str], name_forms: NameForms) -> list[str]:
    spellings = [form for name in pool for form in dict.fromkeys((name, *name_forms(name)))]
    close = difflib.get_close_matches(entry, spellings, n=5, cutoff=0.4)
    return close or spellings[:5]


def apply_module_filters(
    pool: list[str],
    only_if_contains: list[str] | None,
    ignore_if_contains: list[str] | None,
    name_forms: NameForms,
    warn: Callable[[str], None] = lambda _m: None,
) -> list[str]:
    """The names of `pool` (module paths, in model order) the filters keep. ValueError naming each
    `only_if_contains` entry that matches no module, with the closest module names."""
    forms = {name: (name, *name_forms(name)) for name in pool}
    kept = list(pool)
    if only_if_contains:
        unmatched = [e for e in only_if_contains if not any(_matches(e, f) for f in forms.values())]
        if unmatched:
            lines = [f"{e!r} (closest: {', '.join(_closest(e, pool, name_forms))})" for e in unmatched]
            raise ValueError(
                "network_kwargs.only_if_contains: no module matches " + "; ".join(lines)
                + ". Write module paths as in the model, with or without the component prefix, or kohya names"
            )
        kept = [n for n in kept if any(_matches(e, forms[n]) for e in only_if_contains)]
    if ignore_if_contains:
        for entry in ignore_if_contains:
            if not any(_matches(entry, f) for f in forms.values()):
                warn(
                    f"network_kwargs.ignore_if_contains: {entry!r} matches no module, so it ignores nothing "
                    f"(closest: {', '.join(_closest(entry, pool, name_forms))})"
                )
        kept = [n for n in kept if not any(_matches(e, forms[n]) for e in ignore_if_contains)]
    return kept
