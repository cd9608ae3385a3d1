"""The package's layering, read from the source (AST) without importing it: no import cycles between
aitk's modules (imports inside functions count), adapters never import the trainer, and no
architecture name is spelled out in logic outside aitk/models/ (archs.py is the one table of names;
aitk/config/ checks job files against it)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "aitk"

#: files outside aitk/models/ and aitk/config/ that may name architectures, and why
ARCH_NAMES_ALLOWED: dict[str, str] = {
    "aitk/ui/presets.py": "the UI's preset job files: each writes a model.arch value, as a user's job file does",
    "aitk/ui/routes_datasets.py": "form defaults of the UI's dataset page (the SD 1.5 preset and arch)",
}
#: folders whose modules may name architectures in logic
ARCH_NAME_OWNERS = ("aitk/models/", "aitk/config/")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The aitk modules `path` imports anywhere in its body (module level, functions,
    TYPE_CHECKING blocks): `from a.b import c` is a.b.c when c is a module, else a.b."""

    def known(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(known(alias.name) for alias in node.names if alias.name.split(".")[0] == "aitk")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "aitk":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else known(base))
    found.discard(None)
    found.discard(name)
    return {m for m in found if m is not None}


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def arch_names() -> set[str]:
    from aitk.models.archs import ADAPTERS, UNSUPPORTED_ARCH_LABELS

    return set(ADAPTERS) | set(UNSUPPORTED_ARCH_LABELS)


def arch_name_uses(path: Path, names: set[str]) -> list[tuple[int, str]]:
    """(line, text), in line order, of each string literal in `path` that is an architecture name, or a prefix of
    one tested with startswith / endswith (e.g. arch.startswith("wan")). Docstrings are prose and
    never equal a name, so they pass."""
    return sorted(_arch_name_uses(ast.parse(path.read_text(), str(path)), names))


def _arch_name_uses(tree: ast.AST, names: set[str]) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            yield node.lineno, node.value
        if (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("startswith", "endswith") and node.args
        ):
            arg = node.args[0]
            values = arg.elts if isinstance(arg, ast.Tuple) else [arg]
            for value in values:
                if (
                    isinstance(value, ast.Constant) and isinstance(value.value, str) and value.value not in names
                    and any(name.startswith(value.value) for name in names)
                ):
                    yield value.lineno, f"{node.func.attr}({value.value!r})"


def test_graph_reader_sees_imports_inside_functions_and_cycles() -> None:
    """The checks below are only as good as the graph: a lazy import and a two-module circle."""
    modules = source_modules()
    assert "aitk.models.noise" in imported_modules("aitk.models.sd.adapter", modules["aitk.models.sd.adapter"], modules)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "modules of aitk/ import each other in a circle (imports must point down): " + "; ".join(
        " <-> ".join(component) for component in found
    )


def test_adapters_never_import_the_trainer() -> None:
    graph = import_graph()
    upward = sorted(
        f"{name} imports {target}"
        for name, targets in graph.items() if name.startswith("aitk.models.")
        for target in targets if target == "aitk.trainer" or target.startswith("aitk.trainer.")
    )
    assert not upward, "aitk/models/ must not import aitk.trainer (move what both use below both): " + "; ".join(upward)


def test_no_arch_names_outside_the_adapters() -> None:
    names = arch_names()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(ARCH_NAME_OWNERS) or rel in ARCH_NAMES_ALLOWED:
            continue
        found += [f"{rel}:{line}: {text}" for line, text in arch_name_uses(path, names)]
    assert not found, (
        "architecture names in logic outside aitk/models/ (use an adapter attribute or an archs.py fact, "
        "or list the file in ARCH_NAMES_ALLOWED with the reason): " + "; ".join(found)
    )


@pytest.mark.parametrize("path", sorted(ARCH_NAMES_ALLOWED))
def test_allowed_arch_name_files_still_need_it(path: str) -> None:
    """An allowance whose file no longer names an architecture is stale: remove it."""
    assert (arch_name_uses(ROOT / path, arch_names())), f"{path} names no architecture; drop its allowance"


def test_arch_name_scan_catches_names_and_prefixes(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""A docstring about flux."""\n'
        'def tag(arch):\n'
        '    if arch == "flux_kontext":\n'
        '        return 1\n'
        '    return arch.startswith(("wan", "other"))\n'
    )
    assert (arch_name_uses(sample, arch_names())) == [(3, "flux_kontext"), (5, "startswith('wan')")]
