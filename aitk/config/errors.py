"""What the user is told when a job file is wrong: JobFileError, and pydantic errors turned into
its problem lines (key path in ai-toolkit notation, the bad value, what would be valid, did-you-mean).

pydantic's own messages and tracebacks never reach the user.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from aitk.config.keys import suggest
from aitk.config.schema import JobFile
from aitk.config.support import render_path


class JobFileError(Exception):
    """A job file that cannot be used. str(e) is the full message; e.problems has one line each."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems: list[str] = list(problems)
        n = len(self.problems)
        head = f"{source}: {n} problem{'' if n == 1 else 's'}"
        super().__init__(head + "".join(f"\n  {p}" for p in self.problems))


# --------------------------------------------------------------------------------------------
# pydantic errors -> user messages

MISSING_HINTS: dict[str, str] = {
    "config": "add a `config:` section with `name:` and `process:` (see config/examples/sd15_lora.yaml)",
    "name": "add a run name, e.g. name: my_lora_v1",
    "process": "add `process:` with one entry, e.g. `- type: sd_trainer` with training_folder, model "
    "and datasets",
    "training_folder": "add `training_folder: output`",
    "datasets": "add at least one dataset, e.g. `datasets: [{folder_path: /data/my_images}]`",
    "folder_path": "add the folder of your images, e.g. folder_path: /data/my_images",
    "model": "add the base model, e.g. `model: {name_or_path: runwayml/stable-diffusion-v1-5}`",
    "name_or_path": "add the base model (a hub id, a diffusers folder or a .safetensors file), e.g. "
    "name_or_path: runwayml/stable-diffusion-v1-5",
    "prompt": "add the prompt text, e.g. prompt: a photo of [trigger]",
}

EMPTY_LIST_HINTS: dict[str, str] = {
    "datasets": "add at least one dataset, e.g. `- folder_path: /data/my_images`",
    "process": "add one process, e.g. `- type: sd_trainer` with training_folder, model and datasets",
}


def _members(ann: Any) -> tuple[Any, ...] | None:
    if get_origin(ann) in (Union, UnionType):
        return tuple(a for a in get_args(ann) if a is not type(None))
    return None


def _strip_optional(ann: Any) -> Any:
    members = _members(ann)
    if members is not None and len(members) == 1:
        return members[0]
    return ann


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _tag(member: Any) -> str:
    return member.__name__ if isinstance(member, type) else str(member).replace("typing.", "")


@dataclass
class _Resolved:
    parts: list[str | int]
    ann: Any = None  # annotation at the error's location (None when unknown)
    field: FieldInfo | None = None  # the field when the location is a field itself
    union_at: int | None = None  # len(parts) where a union tag was consumed
    union_ann: Any = None
    union_member: Any = None
    root: Any = JobFile  # the schema the location starts from (JobFile, or a caption job's)


def _resolve(loc: tuple[str | int, ...], root: type[BaseModel] = JobFile) -> _Resolved:
    r = _Resolved(parts=[], root=root)
    ann: Any = root
    for item in loc:
        r.field = None
        if ann is None:
            r.parts.append(item)
            continue
        ann = _strip_optional(ann)
        members = _members(ann)
        if members is not None and isinstance(item, str) and any(_tag(m) == item for m in members):
            if r.union_at is None:
                r.union_at, r.union_ann = len(r.parts), ann
                r.union_member = next(m for m in members if _tag(m) == item)
            ann = next(m for m in members if _tag(m) == item)
            continue
        if _is_model(ann):
            if isinstance(item, str) and item in ann.model_fields:
                r.field = ann.model_fields[item]
                ann = r.field.annotation
            else:
                ann = None
            r.parts.append(item)
        elif get_origin(ann) is list and isinstance(item, int):
            ann = get_args(ann)[0]
            r.parts.append(item)
        elif get_origin(ann) is dict:
            ann = get_args(ann)[1]
            r.parts.append(item)
        else:
            ann = None
            r.parts.append(item)
    r.ann = ann
    return r


def _num(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _range_text(field: FieldInfo | None, ctx: Mapping[str, Any] | None = None) -> str:
    bounds: dict[str, Any] = {}
    if field is not None:
        for m in field.metadata:
            for attr in ("ge", "gt", "le", "lt"):
                if isinstance(m, getattr(annotated_types, attr.capitalize())):
                    bounds[attr] = getattr(m, attr)
    for attr in ("ge", "gt", "le", "lt"):
        if ctx and attr in ctx:
            bounds.setdefault(attr, ctx[attr])
    bounds = {k: _num(v) for k, v in bounds.items()}
    low = ("ge", bounds["ge"]) if "ge" in bounds else ("gt", bounds["gt"]) if "gt" in bounds else None
    high = ("le", bounds["le"]) if "le" in bounds else ("lt", bounds["lt"]) if "lt" in bounds else None
    if low and high:
        inclusive = low[0] == "ge" and high[0] == "le"
        text = f"from {low[1]} to {high[1]}" if inclusive else f"between {low[1]} and {high[1]}"
        if not inclusive:
            text += f" ({'including' if low[0] == 'ge' else 'above'} {low[1]}, "
            text += f"{'up to and including' if high[0] == 'le' else 'below'} {high[1]})"
        return text
    sym = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    if low:
        return f"{sym[low[0]]} {low[1]}"
    if high:
        return f"{sym[high[0]]} {high[1]}"
    return ""


def _plural(ann: Any) -> str:
    ann = _strip_optional(ann)
    if ann is int:
        return "whole numbers"
    if ann is float:
        return "numbers"
    if ann is str:
        return "strings"
    if ann is bool:
        return "true/false values"
    if _is_model(ann):
        return "entries (each a mapping of key: value, starting with `- `)"
    return "values"


def _describe(ann: Any, field: FieldInfo | None = None) -> str:
    """What a valid value looks like, in words."""
    ann = _strip_optional(ann)
    rng = _range_text(field) if field is not None and _strip_optional(field.annotation) is ann else ""
    if ann is None or ann is Any:
        return "a valid value"
    if get_origin(ann) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(ann))
    if ann is bool:
        return "true or false"
    if ann is int:
        return "a whole number" + (f" {rng}" if rng else "")
    if ann is float:
        return "a number" + (f" {rng}" if rng else "")
    if ann is str:
        return "text (a string)"
    if get_origin(ann) is list:
        return f"a list of {_plural(get_args(ann)[0])}"
    if get_origin(ann) is dict:
        return "a mapping of key: value pairs"
    if _is_model(ann):
        return "a section of key: value pairs (indented under the key)"
    members = _members(ann)
    if members:
        return " or ".join(_describe(m) for m in members)
    return "a valid value"


def fmt_value(value: Any) -> str:
    if value is None:
        return "null (empty)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, dict):
        text = "a mapping {" + ", ".join(str(k) for k in list(value)[:5]) + ("..." if len(value) > 5 else "") + "}"
    else:
        try:
            text = json.dumps(value, default=str)
        except (TypeError, ValueError):
            text = str(value)
    return text if len(text) <= 70 else text[:67] + "..."


def _get(data: Any, parts: list[str | int]) -> tuple[bool, Any]:
    for p in parts:
        if isinstance(data, dict) and p in data:
            data = data[p]
        elif isinstance(data, list) and isinstance(p, int) and 0 <= p < len(data):
            data = data[p]
        else:
            return False, None
    return True, data


def _kind_matches(member: Any, value: Any) -> bool:
    member = _strip_optional(member)
    if get_origin(member) is list:
        return isinstance(value, list)
    if get_origin(member) is dict or _is_model(member):
        return isinstance(value, dict)
    return not isinstance(value, (list, dict))


def _is_container(ann: Any) -> bool:
    ann = _strip_optional(ann)
    return get_origin(ann) in (list, dict) or _is_model(ann)


def _section_of(parts: list[str | int], root: type[BaseModel] = JobFile) -> type[BaseModel]:
    ann = _strip_optional(_resolve(tuple(parts), root).ann) if parts else root
    return ann if _is_model(ann) else BaseModel


def _error_message(err: Mapping[str, Any], r: _Resolved, data: Any) -> str:
    etype = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    parts = list(r.parts)
    if etype == "aitk" and ctx.get("aitk_key"):
        parts.append(ctx["aitk_key"])
    path = render_path(parts)
    key = parts[-1] if parts else ""
    if etype == "aitk":
        return f"{path}: {ctx.get('message', err.get('msg', ''))}"
    if etype == "missing":
        hint = MISSING_HINTS.get(str(key)) or f"add `{key}:` ({_describe(r.ann, r.field)})"
        found, parent = _get(data, parts[:-1])
        if found and isinstance(parent, dict):
            for other in parent:
                if str(other) != str(key) and suggest(str(other), _section_of(parts[:-1], r.root)) == f"did you mean {key!r}?":
                    hint += f" (found {str(other)!r}: did you mean {key!r}?)"
                    break
        return f"{path}: required key missing; {hint}"
    if value is None and etype in ("model_type", "list_type", "dict_type", "string_type", "model_attributes_type"):
        if r.field is not None and r.field.is_required() and str(key) in MISSING_HINTS:
            return f"{path}: empty; {MISSING_HINTS[str(key)]}"
        return f"{path}: empty; use {_describe(r.ann, r.field)}"
    shown = fmt_value(value)
    if etype == "literal_error":
        choices = get_args(_strip_optional(r.ann)) if get_origin(_strip_optional(r.ann)) is Literal else ()
        if choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
            extra = f" (did you mean {close[0]!r}?)" if close else ""
            return f"{path}: {shown} is not valid; use one of {', '.join(str(c) for c in choices)}{extra}"
        return f"{path}: {shown} is not valid; use one of {ctx.get('expected', '')}"
    if etype in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        base = "a whole number" if _strip_optional(r.ann) is int else "a number"
        return f"{path}: {shown} is out of range; use {base} {_range_text(r.field, ctx)}"
    if etype in ("too_short", "too_long"):
        if isinstance(value, list):
            if not value and str(key) in EMPTY_LIST_HINTS:
                return f"{path}: the list is empty; {EMPTY_LIST_HINTS[str(key)]}"
            limit = ctx.get("min_length") if etype == "too_short" else ctx.get("max_length")
            word = "at least" if etype == "too_short" else "at most"
            return f"{path}: {shown} has {len(value)} entries; use {word} {limit}"
        return f"{path}: {shown} is not valid; use a non-empty value"
    if etype == "int_from_float":
        return f"{path}: {shown} is not valid; use {_describe(r.ann, r.field)} (no decimals)"
    if etype == "string_type" and isinstance(value, bool):
        return (f"{path}: {shown} is not valid; use text (a string): YAML reads yes/no/on/off as true/false, "
                f"so quote the word, e.g. {r.parts[-1]}: \"{'yes' if value else 'no'}\"")
    if etype == "finite_number":
        return f"{path}: {shown} is not valid; use a finite number"
    if etype == "value_error":
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        return f"{path}: {shown} is not valid; {msg}"
    return f"{path}: {shown} is not valid; use {_describe(r.ann, r.field)}"


def validation_problems(exc: ValidationError, data: Any, root: type[BaseModel] = JobFile) -> list[str]:
    errors = exc.errors(include_url=False)
    resolved = [(err, _resolve(tuple(err["loc"]), root)) for err in errors]
    problems: list[str] = []
    handled_unions: set[tuple[str | int, ...]] = set()
    for err, r in resolved:
        if r.union_at is None:
            problems.append(_error_message(err, r, data))
            continue
        base = tuple(r.parts[: r.union_at])
        if base in handled_unions:
            continue
        handled_unions.add(base)
        group = [(e, rr) for e, rr in resolved if rr.union_at is not None and tuple(rr.parts[: rr.union_at]) == base]
        found, value = _get(data, list(base))
        chosen = [(e, rr) for e, rr in group if found and _kind_matches(rr.union_member, value)]
        if chosen and _is_container(chosen[0][1].union_member) and any(
            len(rr.parts) > rr.union_at for _, rr in chosen
        ):
            problems.extend(_error_message(e, rr, data) for e, rr in chosen)
        else:
            problems.append(
                f"{render_path(list(base))}: {fmt_value(value)} is not valid; use {_describe(r.union_ann)}"
            )
    return list(dict.fromkeys(problems))
