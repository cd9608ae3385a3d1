"""The base of every job-file section: unknown keys kept for the loader's warnings, ai-toolkit's
forgiving input (case-insensitive choices, empty sections), and user-facing validation errors.

Validators raise ``user_error(...)`` (a PydanticCustomError whose message is already user-facing,
"500 is not valid; use a multiple of 8 ..."); the loader prefixes the key path.
"""

from __future__ import annotations

from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError


def user_error(message: str, key: str | None = None) -> PydanticCustomError:
    """An error whose text the loader shows as is (after the key path).

    `key` (for model-level validators) names the field the problem is about, so the path
    points at it rather than at the section.
    """
    ctx: dict[str, Any] = {"message": message}
    if key:
        ctx["aitk_key"] = key
    return PydanticCustomError("aitk", "{message}", ctx)


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _check_pixel_size(value: int, what: str = "a multiple of 8 that is at least 64") -> None:
    if value < 64 or value % 8:
        lower = max(64, value // 8 * 8)
        upper = max(64, lower + 8 if value % 8 else lower)
        example = f"{lower}" if lower == upper else f"{lower} or {upper}"
        raise user_error(f"{_fmt(value)} is not valid; use {what}, e.g. {example}")


def _non_none_args(annotation: Any) -> tuple[Any, ...] | None:
    """The members of a Union annotation without None; None when it is not a Union."""
    if get_origin(annotation) in (Union, UnionType):
        return tuple(a for a in get_args(annotation) if a is not type(None))
    return None


def _literal_choices(annotation: Any) -> tuple[Any, ...]:
    members = _non_none_args(annotation)
    if members is not None and len(members) == 1:
        annotation = members[0]
    return get_args(annotation) if get_origin(annotation) is Literal else ()


def _allows_none(annotation: Any) -> bool:
    return annotation is Any or (
        get_origin(annotation) in (Union, UnionType) and type(None) in get_args(annotation)
    )


class Section(BaseModel):
    model_config = ConfigDict(
        extra="allow",
        validate_assignment=True,
        protected_namespaces=(),
        # YAML turns `name: 2024` or `trigger_word: 123` into numbers; accept them as text.
        coerce_numbers_to_str=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _normalise_input(cls, data: Any) -> Any:
        """Forgive what ai-toolkit forgives.

        - Choices are case-insensitive (`optimizer: AdamW8bit`), as in ai-toolkit.
        - An empty section (`train:` with nothing under it, i.e. null) means its defaults.
        """
        if not isinstance(data, dict):
            return data
        out: dict[str, Any] | None = None
        for name, field in cls.model_fields.items():
            if name not in data:
                continue
            value = data[name]
            if value is None and not field.is_required() and not _allows_none(field.annotation):
                out = dict(data) if out is None else out
                del out[name]
            elif isinstance(value, str):
                choices = _literal_choices(field.annotation)
                if choices and value not in choices:
                    norm = value.strip().lower().replace("-", "_")
                    if norm in choices:
                        out = dict(data) if out is None else out
                        out[name] = norm
        return data if out is None else out
