"""Job file text <-> plain data: reading the file, `${ENV}` substitution, YAML/JSON(C) parsing,
`[name]` substitution, and writing YAML back.

Every failure raises a JobFileError with a user-facing line (file, line and column, a hint).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from aitk.config.errors import JobFileError

# --------------------------------------------------------------------------------------------
# reading the file


def read_text(path: str | Path) -> str:
    """The file's text (UTF-8, BOM dropped). Raises JobFileError when it cannot be read."""
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
    return text


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
    if isinstance(exc, yaml.reader.ReaderError) and isinstance(exc.character, int):
        before = text[: max(0, exc.position)]
        line, column = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
        code = exc.character
        escape = f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
        return (f"line {line}, column {column}: the character #x{code:04x} (a control character or non-character) is "
                f"not allowed in YAML; remove it, or write it as \"{escape}\" inside double quotes")
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


def apply_name(data: dict[str, Any]) -> dict[str, Any]:
    """Replace `[name]` in every string value with config.name (config.name itself kept)."""
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
# text -> data

MAX_DEPTH = 64  # a job file is about 6 levels deep; deeper data is refused before anything walks it
MAX_VALUES = 100_000  # values once aliases are expanded (an alias bomb is refused, not expanded)


class _ShapeError(Exception):
    pass


def _check_shape(data: Any) -> None:
    """Refuse data that contains itself (`&a [*a]`), nests deeper than MAX_DEPTH, or expands
    to more than MAX_VALUES values (aliases inside aliases): every later step walks it recursively."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def walk(node: Any, depth: int) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise _ShapeError(
                "an alias (*name) is used inside its own anchor (&name), so the value contains itself; "
                "write the value out instead"
            )
        if depth > MAX_DEPTH:
            raise _ShapeError(
                f"values are nested more than {MAX_DEPTH} levels deep; a job file needs a few levels "
                "(see config/examples/sd15_lora.yaml)"
            )
        open_.add(key)
        total = 1
        for child in node.values() if isinstance(node, dict) else node:
            total += walk(child, depth + 1)
            if total > MAX_VALUES:
                raise _ShapeError(
                    f"the file expands to more than {MAX_VALUES} values (anchors and aliases repeated inside "
                    "each other); a job file needs far fewer - write the values out"
                )
        open_.discard(key)
        sizes[key] = total
        return total

    walk(data, 0)


def _checked(data: Any, source: str) -> Any:
    try:
        _check_shape(data)
    except _ShapeError as exc:
        raise JobFileError(source, [str(exc)]) from None
    return data


def _too_deep(source: str) -> JobFileError:
    return JobFileError(source, [f"brackets or indentation are nested too deeply to read (more than {MAX_DEPTH} "
                                 "levels is refused); a job file needs a few levels (see "
                                 "config/examples/sd15_lora.yaml)"])


def parse_text(text: str, source: str, environ: Mapping[str, str] | None, warnings: list[str]) -> Any:
    """Substitute `${ENV}` and parse YAML, JSON or JSONC (sniffed); parse warnings go to `warnings`."""
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
            return _checked(return_value, source)
        except RecursionError:
            raise _too_deep(source) from None
        except json.JSONDecodeError as exc:
            try:  # a YAML flow mapping ({job: extension, ...}) is not JSON but is fine
                loader = _Loader(stripped)
                try:
                    data = loader.get_single_data()
                finally:
                    loader.dispose()
                warnings.extend(loader.duplicates)
                return _checked(data, source)
            except yaml.YAMLError:
                pass
            except RecursionError:
                raise _too_deep(source) from None
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
    try:
        loader = _Loader(subst)  # refuses control characters (a NUL byte) already
    except yaml.YAMLError as exc:
        raise JobFileError(source, [_yaml_syntax_problem(exc, subst)]) from None
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise JobFileError(source, [_yaml_syntax_problem(exc, subst)]) from None
    except RecursionError:
        raise _too_deep(source) from None
    finally:
        loader.dispose()
    warnings.extend(loader.duplicates)
    return _checked(data, source)


# --------------------------------------------------------------------------------------------
# data -> text


def _escape_dollars(data: Any) -> Any:
    if isinstance(data, str):
        return data.replace("${", "$${")
    if isinstance(data, dict):
        return {k: _escape_dollars(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_escape_dollars(v) for v in data]
    return data


def to_yaml(data: Any) -> str:
    """Plain data as YAML that parse_text reads back equal (`${` escaped, 1e-4 stays a float)."""
    data = _escape_dollars(data)
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)
