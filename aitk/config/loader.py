"""Reading a job file: text -> substitution -> YAML/JSON(C) -> schema -> warnings.

Every failure becomes a JobFileError whose text is complete and user-facing: the file, the key
path in ai-toolkit notation (config.process[0].train.lr), the bad value and what would be valid.
pydantic's own messages and tracebacks never reach the user.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from aitk.config.schema import (
    DatasetConfig,
    JobFile,
    ModelConfig,
    NetworkConfig,
    ProcessConfig,
    SampleConfig,
    SaveConfig,
    TrainConfig,
)
from aitk.config.support import is_known_extra, render_path, unsupported_warnings, walk_sections

__all__ = ["JobFileError", "LoadedJob", "load_job_file", "parse_job_text", "dump_job"]


class JobFileError(Exception):
    """A job file that cannot be used. str(e) is the full message; e.problems has one line each."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems: list[str] = list(problems)
        n = len(self.problems)
        head = f"{source}: {n} problem{'' if n == 1 else 's'}"
        super().__init__(head + "".join(f"\n  {p}" for p in self.problems))


@dataclass
class LoadedJob:
    job: JobFile
    warnings: list[str] = field(default_factory=list)
    path: Path = Path("<text>")


# --------------------------------------------------------------------------------------------
# YAML with string keys, YAML 1.2 floats (1e-4) and duplicate-key detection


_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps keys as written, reads 1e-4 as a number and records duplicate keys."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(
                None, None, f"expected a mapping, found {node.id}", node.start_mark
            )
        own = {id(k) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"}
        self.flatten_mapping(node)
        mapping: dict[Any, Any] = {}
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key: Any = key_node.value  # `on:` / `1:` stay the strings the user wrote
            else:
                key = self.construct_object(key_node, deep=deep)
                try:
                    hash(key)
                except TypeError:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, "a key must be a plain value",
                        key_node.start_mark,
                    ) from None
            line = key_node.start_mark.line + 1
            if id(key_node) in own:
                if key in seen:
                    self.duplicates.append(
                        f"line {line}: key {key!r} appears twice in the same section (first on line "
                        f"{seen[key]}); the last value is used"
                    )
                seen[key] = line
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


class _Dumper(yaml.SafeDumper):
    pass


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789"))


def _yaml_syntax_problem(exc: yaml.YAMLError, text: str) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = ""
    snippet = ""
    if mark is not None:
        where = f"line {mark.line + 1}, column {mark.column + 1}: "
        lines = text.splitlines()
        if 0 <= mark.line < len(lines) and lines[mark.line].strip():
            snippet = f" (at `{lines[mark.line].strip()[:60]}`)"
    if "\\t" in problem or "\t" in problem:
        hint = "YAML does not allow tabs for indentation; use spaces"
    elif "mapping values are not allowed" in problem:
        hint = "check the indentation, put a space after each `:`, and quote values that contain ': '"
    elif "could not find expected ':'" in problem:
        hint = "a line is missing the `:` of `key: value`, or is indented wrongly"
    elif "found undefined alias" in problem:
        hint = "an `*alias` has no matching `&anchor`; quote the value if `*` is meant literally"
    elif "unhashable" in problem or "plain value" in problem:
        hint = "a key must be a plain word, not a list or mapping"
    elif "did not find expected" in problem or "while parsing" in str(exc):
        hint = "check the indentation and the quotes and brackets on this line and the one above"
    else:
        hint = "check the indentation and the quotes on this line and the one above"
    return f"{where}YAML syntax error: {problem}{snippet}; {hint}"


# --------------------------------------------------------------------------------------------
# JSON / JSONC


def _strip_jsonc(text: str) -> str:
    """Remove // and /* */ comments and trailing commas outside strings; keep line numbers."""
    out: list[str] = []
    i, n = 0, len(text)
    in_str = False
    while i < n:
        c = text[i]
        if in_str:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                in_str = False
            i += 1
            continue
        if c == '"':
            in_str = True
            out.append(c)
            i += 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("".join(ch if ch == "\n" else " " for ch in text[i:j]))
            i = j
        elif c == ",":
            j = i + 1
            # skip whitespace and comments to see whether a closing bracket follows
            k = j
            while k < n:
                if text[k].isspace():
                    k += 1
                elif text.startswith("//", k):
                    e = text.find("\n", k)
                    k = n if e < 0 else e
                elif text.startswith("/*", k):
                    e = text.find("*/", k + 2)
                    k = n if e < 0 else e + 2
                else:
                    break
            out.append(" " if k < n and text[k] in "}]" else ",")
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _looks_like_json(text: str) -> bool:
    stripped = _strip_jsonc(text).lstrip()
    return stripped.startswith("{")


def _json_load(text: str, warnings: list[str]) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                warnings.append(f"key {k!r} appears twice in the same object; the last value is used")
            out[k] = v
        return out

    return json.loads(text, object_pairs_hook=pairs)


# --------------------------------------------------------------------------------------------
# ${ENV} and [name] substitution

_ENV = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


_LINE_KEY = re.compile(r"""^\s*(?:-\s+)?["']?([A-Za-z_][\w.-]*)["']?\s*:""")


def _yaml_comment_start(line: str) -> int:
    """Index where a YAML comment starts on this line (len(line) when none); quote-aware."""
    quote = ""
    prev = " "
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = ""
        elif c in "'\"" and prev in " \t:[{,-":
            quote = c
        elif c == "#" and prev in " \t":
            return i
        prev = c
    return len(line)


def _substitute_env(text: str, environ: Mapping[str, str], *, yaml_comments: bool) -> tuple[str, list[str]]:
    """Replace ${VAR}, ${VAR:-default}, ${VAR-default}; `$${` is a literal `${`."""
    problems: list[str] = []

    def sub(segment: str, line_no: int) -> str:
        key = _LINE_KEY.match(segment)
        where = f"line {line_no} (key {key.group(1)})" if key else f"line {line_no}"

        def repl(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return "${"
            name, op, default = m.group(1), m.group(2), m.group(3)
            value = environ.get(name)
            if op == ":-" and not value:
                return default or ""
            if op == "-" and value is None:
                return default or ""
            if value is None:
                problems.append(
                    f"{where}: environment variable ${{{name}}} is not set; set it "
                    f"(export {name}=...) or give a default: ${{{name}:-value}}"
                )
                return m.group(0)
            return value

        return _ENV.sub(repl, segment)

    out_lines = []
    for no, line in enumerate(text.split("\n"), start=1):
        if "$" not in line:
            out_lines.append(line)
            continue
        cut = _yaml_comment_start(line) if yaml_comments else len(line)
        out_lines.append(sub(line[:cut], no) + line[cut:])
    return "\n".join(out_lines), problems


def _substitute_name(data: Any, name: str) -> Any:
    if isinstance(data, str):
        return data.replace("[name]", name)
    if isinstance(data, dict):
        return {k: _substitute_name(v, name) for k, v in data.items()}
    if isinstance(data, list):
        return [_substitute_name(v, name) for v in data]
    return data


def _apply_name(data: dict[str, Any]) -> dict[str, Any]:
    config = data.get("config")
    if not isinstance(config, dict):
        return data
    name = config.get("name")
    if not isinstance(name, (str, int)) or isinstance(name, bool) or "[name]" in str(name):
        return data
    out = _substitute_name(data, str(name))
    out["config"]["name"] = name
    return out


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


def _resolve(loc: tuple[str | int, ...]) -> _Resolved:
    r = _Resolved(parts=[])
    ann: Any = JobFile
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


def _fmt_value(value: Any) -> str:
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


def _section_of(parts: list[str | int]) -> type[BaseModel]:
    ann = _strip_optional(_resolve(tuple(parts)).ann) if parts else JobFile
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
                if str(other) != str(key) and _suggest(str(other), _section_of(parts[:-1])) == f"did you mean {key!r}?":
                    hint += f" (found {str(other)!r}: did you mean {key!r}?)"
                    break
        return f"{path}: required key missing; {hint}"
    if value is None and etype in ("model_type", "list_type", "dict_type", "string_type", "model_attributes_type"):
        if r.field is not None and r.field.is_required() and str(key) in MISSING_HINTS:
            return f"{path}: empty; {MISSING_HINTS[str(key)]}"
        return f"{path}: empty; use {_describe(r.ann, r.field)}"
    shown = _fmt_value(value)
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


def _validation_problems(exc: ValidationError, data: Any) -> list[str]:
    errors = exc.errors(include_url=False)
    resolved = [(err, _resolve(tuple(err["loc"]))) for err in errors]
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
                f"{render_path(list(base))}: {_fmt_value(value)} is not valid; use {_describe(r.union_ann)}"
            )
    return list(dict.fromkeys(problems))


# --------------------------------------------------------------------------------------------
# unknown keys

# Common spellings from other trainers and typos: alias -> the field it means (when the section has it).
ALIASES: dict[str, tuple[str, ...]] = {
    "learning_rate": ("lr",), "learningrate": ("lr",), "lr_rate": ("lr",), "base_lr": ("lr",),
    "max_steps": ("steps",), "num_steps": ("steps",), "max_train_steps": ("steps",),
    "train_steps": ("steps",), "total_steps": ("steps",), "step": ("steps",), "iterations": ("steps",),
    "train_batch_size": ("batch_size",), "batchsize": ("batch_size",), "bs": ("batch_size",),
    "network_dim": ("linear",), "dim": ("linear",), "lora_rank": ("linear",), "lora_dim": ("linear",),
    "network_alpha": ("linear_alpha",), "lora_alpha": ("linear_alpha",),
    "conv_dim": ("conv",), "conv_rank": ("conv",), "network_type": ("type",),
    "caption_extension": ("caption_ext",), "caption_ext_name": ("caption_ext",),
    "image_dir": ("folder_path",), "images": ("folder_path",), "folder": ("folder_path",),
    "data_dir": ("folder_path",), "train_data_dir": ("folder_path",), "dataset_path": ("folder_path",),
    "path": ("folder_path", "name_or_path"), "dir": ("folder_path",),
    "pretrained_model_name_or_path": ("name_or_path",), "model_path": ("name_or_path",),
    "model_name": ("name_or_path",), "model_id": ("name_or_path",), "base_model": ("name_or_path",),
    "resolutions": ("resolution",), "res": ("resolution",), "size": ("resolution",),
    "sample_prompts": ("prompts",), "prompt": ("prompts",), "negative_prompt": ("neg",),
    "negative": ("neg",), "cfg": ("guidance_scale",), "cfg_scale": ("guidance_scale",),
    "guidance": ("guidance_scale",), "num_inference_steps": ("sample_steps",), "steps_sample": ("sample_steps",),
    "save_steps": ("save_every",), "save_every_n_steps": ("save_every",), "checkpointing_steps": ("save_every",),
    "sample_every_n_steps": ("sample_every",), "sample_steps_every": ("sample_every",),
    "mixed_precision": ("dtype",), "precision": ("dtype",), "save_precision": ("dtype",),
    "optimizer_type": ("optimizer",), "optim": ("optimizer",), "optimizer_args": ("optimizer_params",),
    "optimizer_kwargs": ("optimizer_params",), "scheduler": ("lr_scheduler",),
    "lr_scheduler_type": ("lr_scheduler",), "scheduler_params": ("lr_scheduler_params",),
    "warmup_steps": ("lr_warmup_steps",), "lr_warmup": ("lr_warmup_steps",),
    "grad_accum": ("gradient_accumulation",), "gradient_accumulate": ("gradient_accumulation",),
    "clip_grad_norm": ("max_grad_norm",), "max_norm": ("max_grad_norm",), "grad_clip": ("max_grad_norm",),
    "output_dir": ("training_folder",), "output_folder": ("training_folder",),
    "output_path": ("training_folder",), "dataset": ("datasets",), "data": ("datasets",),
    "seed": ("training_seed",), "trigger": ("trigger_word",), "instance_prompt": ("trigger_word",),
    "repeats": ("num_repeats",), "num_repeat": ("num_repeats",), "caption_dropout": ("caption_dropout_rate",),
    "flip": ("flip_x",), "random_flip": ("flip_x",), "hflip": ("flip_x",), "ema": ("ema_config",),
    "use_ema": ("ema_config",), "samples_every": ("sample_every",), "every": ("save_every", "sample_every"),
    "keep": ("max_step_saves_to_keep",), "max_saves": ("max_step_saves_to_keep",),
    "type_": ("type",), "network_args": ("network_kwargs",), "networks": ("network",),
}

# Sections whose keys a misplaced key may belong to.
_SECTIONS: dict[str, type[BaseModel]] = {
    "network": NetworkConfig,
    "save": SaveConfig,
    "datasets[i]": DatasetConfig,
    "train": TrainConfig,
    "model": ModelConfig,
    "sample": SampleConfig,
    "process[i]": ProcessConfig,
}


def _suggest(key: str, section: type[BaseModel]) -> str:
    fields = list(section.model_fields)
    lowered = key.strip().lower().replace("-", "_").replace(" ", "_")
    if lowered in fields and lowered != key:
        return f"did you mean {lowered!r}?"
    for target in ALIASES.get(lowered, ()):
        if target in fields:
            return f"did you mean {target!r}?"
    close = difflib.get_close_matches(lowered, fields, n=1, cutoff=0.75)
    if close:
        return f"did you mean {close[0]!r}?"
    homes = [name for name, cls in _SECTIONS.items() if cls is not section and lowered in cls.model_fields]
    if homes:
        return f"it belongs under `{homes[0].removesuffix('[i]')}:`, not here"
    close = difflib.get_close_matches(lowered, fields, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return ""


def unknown_keys(job: JobFile, *, strict: bool = False) -> list[str]:
    """One line per key the schema does not know (free-form dicts excluded), with a did-you-mean."""
    out: list[str] = []
    for path, section in walk_sections(job):
        for key in section.model_extra or {}:
            if is_known_extra(type(section), str(key)):
                continue
            hint = _suggest(str(key), type(section))
            where = render_path(path + (str(key),))
            if strict:
                out.append(f"{where}: unknown key; " + (f"{hint} " if hint else "") + "(remove it or fix the spelling)")
            else:
                out.append(f"{where}: unknown key; " + (hint if hint else "it is ignored"))
    return out


# --------------------------------------------------------------------------------------------
# public API


def _parse(text: str, source: str, environ: Mapping[str, str] | None, warnings: list[str]) -> Any:
    env = os.environ if environ is None else environ
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise JobFileError(
            source, ["the file is empty; a job file needs `job: extension` and `config:` with name and process "
                     "(see config/examples/sd15_lora.yaml)"]
        )
    if _looks_like_json(text):
        stripped = _strip_jsonc(text)
        stripped, problems = _substitute_env(stripped, env, yaml_comments=False)
        if problems:
            raise JobFileError(source, problems)
        json_warnings: list[str] = []
        try:
            return_value = _json_load(stripped, json_warnings)
            warnings.extend(json_warnings)
            return return_value
        except json.JSONDecodeError as exc:
            try:  # a YAML flow mapping ({job: extension, ...}) is not JSON but is fine
                loader = _Loader(stripped)
                try:
                    data = loader.get_single_data()
                finally:
                    loader.dispose()
                warnings.extend(loader.duplicates)
                return data
            except yaml.YAMLError:
                pass
            line = stripped.splitlines()[exc.lineno - 1].strip() if exc.lineno <= len(stripped.splitlines()) else ""
            at = f" (at `{line[:60]}`)" if line else ""
            raise JobFileError(
                source,
                [f"line {exc.lineno}, column {exc.colno}: JSON syntax error: {exc.msg}{at}; check for a "
                 "missing comma, quote or bracket here or just before"],
            ) from None
    subst, problems = _substitute_env(text, env, yaml_comments=True)
    if problems:
        raise JobFileError(source, problems)
    loader = _Loader(subst)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise JobFileError(source, [_yaml_syntax_problem(exc, subst)]) from None
    finally:
        loader.dispose()
    warnings.extend(loader.duplicates)
    return data


def parse_job_text(
    text: str,
    *,
    source: str = "<text>",
    strict: bool = False,
    environ: Mapping[str, str] | None = None,
) -> LoadedJob:
    """Parse and validate a job given as text (YAML, JSON or JSONC, sniffed)."""
    warnings: list[str] = []
    data = _parse(text, source, environ, warnings)
    if data is None:
        raise JobFileError(source, ["the file has only comments; a job file needs `job: extension` and `config:` "
                                    "with name and process (see config/examples/sd15_lora.yaml)"])
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"the value {_fmt_value(data)}"
        raise JobFileError(
            source, [f"(top level): found {kind}; a job file is a mapping with `job:`, `config:` and optional `meta:`"]
        )
    data = _apply_name(data)
    try:
        job = JobFile.model_validate(data)
    except ValidationError as exc:
        raise JobFileError(source, _validation_problems(exc, data)) from None
    unknown = unknown_keys(job, strict=strict)
    if strict and unknown:
        raise JobFileError(source, unknown)
    warnings.extend(unknown)
    warnings.extend(unsupported_warnings(job))
    return LoadedJob(job=job, warnings=warnings, path=Path(source))


def load_job_file(
    path: str | Path,
    *,
    strict: bool = False,
    environ: Mapping[str, str] | None = None,
) -> LoadedJob:
    """Read, substitute, parse and validate a job file. Raises JobFileError with a complete message."""
    source = str(path)
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise JobFileError(source, [f"file not found (looked for {p.absolute()}); check the path"]) from None
    except IsADirectoryError:
        raise JobFileError(source, ["is a folder, not a job file; give the path of a .yaml/.json file"]) from None
    except PermissionError:
        raise JobFileError(source, ["cannot be read: permission denied"]) from None
    except OSError as exc:
        raise JobFileError(source, [f"cannot be read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise JobFileError(
            source, [f"is not a UTF-8 text file (undecodable byte at offset {exc.start}); save it as UTF-8"]
        ) from None
    loaded = parse_job_text(text, source=source, strict=strict, environ=environ)
    loaded.path = p
    return loaded


def _escape_dollars(data: Any) -> Any:
    if isinstance(data, str):
        return data.replace("${", "$${")
    if isinstance(data, dict):
        return {k: _escape_dollars(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_escape_dollars(v) for v in data]
    return data


def dump_job(job: JobFile) -> str:
    """The job after defaults as YAML (for <output>/config.yaml); load_job_file reads it back equal."""
    data = _escape_dollars(job.model_dump(mode="python"))
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)
    return "# The job as run, with every default filled in (written by aitk).\n" + body
