"""Every key of the job-file schema does something: some code in aitk/ reads it, or the support table
(aitk/config/support.py) has a row that warns about it (issue #12).

A field counts as read when, outside aitk/config/schema.py, an attribute of that name is read
(`train_cfg.lr`) or the name is used as a key (`cfg["lr"]`, `.get("lr")`, `getattr(x, "lr")`, or
listed in a tuple / list of names the code looks up, `("alpha_phases", ...)`), or when one of the
schema's own properties reads it (`linear_rank` reads `rank`). Validators do not count, since
checking a value is not using it. The walker works on names, not types, so a name
shared with an unrelated attribute counts as read; a field nobody reads by any spelling is found.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import BaseModel

import aitk
from aitk.config import schema
from aitk.config.support import UNSUPPORTED

PACKAGE = Path(aitk.__file__).resolve().parent
SCHEMA_FILE = Path(schema.__file__).resolve()
#: calls whose first string argument names a key or attribute
KEY_CALLS = frozenset({"get", "pop", "setdefault", "getattr", "hasattr", "setattr"})


def sections(module=schema) -> list[type[schema.Section]]:
    """The schema's section classes, in definition order."""
    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, schema.Section) and obj is not schema.Section]


def own_fields(section: type[BaseModel]) -> list[str]:
    """Fields a class declares itself (inherited ones belong to the parent section)."""
    inherited = set().union(*(getattr(b, "model_fields", {}) for b in section.__mro__[1:]))
    return [name for name in section.model_fields if name not in inherited]


def _names_read(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            yield node.attr
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            if isinstance(node.slice.value, str):
                yield node.slice.value
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in KEY_CALLS:
                for arg in node.args[:2]:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        yield arg.value
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            for item in node.elts:
                if isinstance(item, ast.Constant) and isinstance(item.value, str):
                    yield item.value


def _property_bodies(tree: ast.Module) -> Iterator[ast.FunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any(
            isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list
        ):
            yield node


def names_read_in(files: Iterable[Path], schema_file: Path = SCHEMA_FILE) -> set[str]:
    """Attribute / key names read in `files`; in the schema file, only inside @property bodies."""
    found: set[str] = set()
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        if path.resolve() == schema_file:
            for prop in _property_bodies(tree):
                found.update(_names_read(prop))
        else:
            found.update(_names_read(tree))
    return found


def _field_type(section: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The section class a field holds (through Optional / list / dict), else None."""
    import typing

    pending = [section.model_fields[name].annotation]
    while pending:
        annotation = pending.pop()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        pending.extend(typing.get_args(annotation))
    return None


def support_rows() -> set[tuple[type[BaseModel], str]]:
    """(section class, field) of every support-table row; a dotted key also names each step."""
    out: set[tuple[type[BaseModel], str]] = set()
    for row in UNSUPPORTED:
        section: type[BaseModel] | None = row.section
        for part in row.key.split("."):
            if section is None or part not in section.model_fields:
                break
            out.add((section, part))
            section = _field_type(section, part)
    return out


def unread_fields(section_classes: Iterable[type[BaseModel]], names_read: set[str],
                  rows: set[tuple[type[BaseModel], str]]) -> list[str]:
    """"Section.field" for each field that is neither read nor in the support table."""
    missing = []
    for section in section_classes:
        for name in own_fields(section):
            in_table = any(issubclass(section, cls) and key == name for cls, key in rows)
            if name not in names_read and not in_table:
                missing.append(f"{section.__name__}.{name}")
    return missing


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_schema_field_is_read_or_in_the_support_table():
    missing = unread_fields(sections(), names_read_in(package_files()), support_rows())
    assert not missing, "read nowhere in aitk/ and no row in aitk/config/support.py: " + ", ".join(missing)


# --- the walker itself ----------------------------------------------------------------------------


def test_the_walker_finds_a_field_nobody_reads(tmp_path: Path):
    from pydantic import Field

    class ProbeConfig(schema.Section):
        used_as_attribute: int = 1
        used_as_key: int = 2
        used_by_a_property: int = 3
        only_validated: int = 4
        never_read_anywhere: int = 5
        in_the_table: int = 6
        late: int = Field(7)

        @property
        def derived(self) -> int:
            return self.used_by_a_property * 2

    code = tmp_path / "reader.py"
    code.write_text("NAMES = ('late',)\n"
                    "def use(cfg, raw):\n    return cfg.used_as_attribute + raw.get('used_as_key') + cfg.derived\n"
                    "def message(cfg):\n    return f'never_read_anywhere is {cfg}'  # text is not a read\n")
    schema_like = tmp_path / "schema_like.py"
    schema_like.write_text(
        "class ProbeConfig:\n"
        "    def _check(self):\n        assert self.only_validated > 0\n"
        "    @property\n    def derived(self):\n        return self.used_by_a_property * 2\n"
    )
    names = names_read_in([code, schema_like], schema_file=schema_like)
    rows = {(ProbeConfig, "in_the_table")}
    assert unread_fields([ProbeConfig], names, rows) == [
        "ProbeConfig.only_validated", "ProbeConfig.never_read_anywhere"]


def test_support_rows_resolve_dotted_keys():
    rows = support_rows()
    # "model.layer_offloading" on ProcessConfig names ModelConfig.layer_offloading
    assert (schema.ModelConfig, "layer_offloading") in rows and (schema.ProcessConfig, "model") in rows


def test_inherited_fields_belong_to_the_parent():
    assert "alpha_phases" in own_fields(schema.ExpertAlphaSchedule)
    assert "alpha_phases" not in own_fields(schema.AlphaSchedule) and "enabled" in own_fields(schema.AlphaSchedule)
