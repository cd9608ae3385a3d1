"""Property-based fuzzing of the job-file loader and `aitk validate` (issue #15).

Job files are built from the real schema (aitk/config/schema.py: every section's model_fields),
with right and wrong types, unknown keys, near-miss spellings, nulls, huge numbers, NaN, deep
nesting and ai-toolkit's extra keys; then written as YAML or JSON, cut short, re-encoded (UTF-16,
latin-1, stray bytes), or replaced by odd roots, aliases and bombs. Each file goes to
`load_job_file` and to `validate_command` (the `aitk validate` code path) in process.

Property: the file loads (and `dump_job` of it loads back to the same YAML), or the loader raises
JobFileError with a non-empty message and no traceback; any other exception fails the test.
`aitk validate` returns 0 or 1 and never prints a traceback or its catch-all "could not be
checked" line (which would hide an unexpected exception).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from aitk.config.errors import JobFileError
from aitk.config.loader import dump_job, load_job_file, parse_job_text
from aitk.config.schema import JobFile
from aitk.config.support import AI_TOOLKIT_KEYS
from aitk.config.validate import validate_command
from fuzz_common import TRACEBACK, Counter, budget, fuzz_settings

# `make test` budgets (x AITK_FUZZ_SCALE): 1200 + 500 + 300 = 2000 job files
TREE_EXAMPLES = 1200
TEXT_EXAMPLES = 500
ODD_EXAMPLES = 300
ROUND_TRIP_EXAMPLES = 100  # besides the 2000: dump_job's text loads back equal

BASE_JOB: dict[str, Any] = {
    "job": "extension",
    "config": {
        "name": "fuzz_job",
        "process": [{
            "type": "sd_trainer",
            "training_folder": "output",
            "model": {"name_or_path": "runwayml/stable-diffusion-v1-5"},
            "network": {"type": "lora", "linear": 4},
            "datasets": [{"folder_path": "/data/images"}],
            "train": {"steps": 10},
            "sample": {"prompts": ["a photo of [trigger]"], "sample_every": 5},
        }],
    },
}

# ------------------------------------------------------------------------------------ values

HUGE_INTS = st.sampled_from([0, -1, 1, 7, 63, 64, 65, 2**31, 2**63, -(2**63), 10**30, 10**400])
ODD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300, 1e308, 0.5, 1.0000001])
WORDS = st.sampled_from([
    "", " ", "yes", "no", "on", "off", "null", "~", "NaN", ".inf", "[name]", "${HOME}", "$${X}", "${AITK_FUZZ_UNSET}",
    "${AITK_FUZZ_UNSET:-d}", "~nosuchuser_aitk/x", "../../etc", "/", "a/b", "..", "\x00", "\ufeff", "é", "🙂",
    "--w 512 --h 512", "--seed x", "--w", "--ctrl_img", "--bogus 1", "a --cfg nan", "x\ny", "\t", "lora", "LoRA",
    "adamw8bit", "AdamW8Bit", "flux", "wan22_14b:t2v", "sdxl", "flex2", "qwen_image_edit_plus", "qfloat8|x.safetensors",
    "sage", "native", "flowmatch", "ddpm", "weighted", "cuda:0", "cpu",
])
SCALARS = st.one_of(
    st.none(), st.booleans(), HUGE_INTS, st.integers(), ODD_FLOATS, st.floats(), WORDS, st.text(max_size=20),
)


def json_like(depth: int = 2) -> st.SearchStrategy[Any]:
    if depth <= 0:
        return SCALARS
    inner = json_like(depth - 1)
    return st.one_of(
        SCALARS, st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8) | WORDS, inner, max_size=3)
    )


def deep_nesting(levels: int) -> Any:
    value: Any = "bottom"
    for i in range(levels):
        value = [value] if i % 2 else {"k": value}
    return value


def near_misses(key: str) -> list[str]:
    """Spellings a user might type for `key`: case, dashes, a dropped or doubled letter, a space."""
    out = {key.upper(), key.capitalize(), key.replace("_", "-"), key + " ", " " + key, key + "s", key[:-1]}
    if len(key) > 2:
        out |= {key[1:], key[0] + key[0] + key[1:], key[:1] + key[2:1:-1] + key[1:2] + key[3:]}
    out.discard(key)
    out.discard("")
    return sorted(out)


EXTRA_KEYS: dict[type[BaseModel], list[str]] = {}
for (section, key), _row in AI_TOOLKIT_KEYS.items():
    EXTRA_KEYS.setdefault(section, []).append(key)


def _members(ann: Any) -> tuple[Any, ...] | None:
    return get_args(ann) if get_origin(ann) in (Union, UnionType) else None


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def right_value(ann: Any, depth: int) -> st.SearchStrategy[Any]:
    """A value of the annotation's type (not necessarily in range)."""
    members = _members(ann)
    if members is not None:
        return st.one_of([right_value(m, depth) for m in members])
    if ann is type(None):
        return st.none()
    if ann is Any:
        return json_like(1)
    origin = get_origin(ann)
    if origin is Literal:
        choices = [str(c) for c in get_args(ann)]
        return st.sampled_from(choices) | st.sampled_from(choices).map(lambda c: c.upper().replace("_", "-"))
    if _is_model(ann):
        return model_tree(ann, depth + 1)
    if origin is list:
        return st.lists(right_value(get_args(ann)[0], depth + 1), max_size=3)
    if origin is dict:
        return st.dictionaries(st.text(max_size=8) | WORDS, right_value(get_args(ann)[1], depth + 1), max_size=3)
    if ann is bool:
        return st.booleans()
    if ann is int:
        return st.integers(-3, 2000) | HUGE_INTS
    if ann is float:
        return st.floats(-2, 2) | ODD_FLOATS | st.integers(-5, 5)
    if ann is str:
        return WORDS | st.text(max_size=16)
    return json_like(1)


def field_value(ann: Any, depth: int) -> st.SearchStrategy[Any]:
    """Mostly right values, sometimes a wrong type, a null or something deep."""
    if depth > 6:
        return SCALARS
    right = right_value(ann, depth)
    wrong = st.one_of(SCALARS, json_like(2), st.just(deep_nesting(40)))
    return st.one_of(right, right, right, right, wrong)


def model_tree(model: type[BaseModel], depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """A section as a dict: some of its keys (required ones usually), plus unknown, near-miss and
    ai-toolkit keys."""
    fields = model.model_fields
    values = {name: field_value(f.annotation, depth) for name, f in fields.items()}
    required = [name for name, f in fields.items() if f.is_required()]
    misses = sorted({m for name in fields for m in near_misses(name)})
    extra_names = st.sampled_from(misses) | st.text(min_size=1, max_size=10)
    known_extras = EXTRA_KEYS.get(model, [])
    if known_extras:
        extra_names = extra_names | st.sampled_from(known_extras)
    extras = st.dictionaries(extra_names, SCALARS | json_like(1), max_size=2)

    @st.composite
    def section(draw: st.DrawFn) -> dict[str, Any]:
        # a few of the section's keys (a job sets few of them), the required ones usually
        names = draw(st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True))
        names += [n for n in required if n not in names and draw(st.integers(0, 4))]
        return {**draw(extras), **{name: draw(values[name]) for name in names}}

    return section()


def merge(base: Any, over: Any) -> Any:
    """`over` laid onto `base`: mappings merge key by key, lists merge item by item."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(over, list) and over:
        return [merge(b, o) for b, o in zip(base, over)] + over[len(base):]
    return over


# A job from the schema alone (mostly refused), or the base job with schema-drawn changes (many load).
JOB_TREES = st.one_of(
    model_tree(JobFile),
    model_tree(JobFile).map(lambda tree: merge(BASE_JOB, tree)),
    model_tree(JobFile).map(lambda tree: merge(BASE_JOB, tree)),
)

# ------------------------------------------------------------------------------------ text


def to_text(tree: Any, style: str) -> str:
    if style == "json":
        return json.dumps(tree, allow_nan=True, default=str)
    if style == "flow":
        return yaml.safe_dump(tree, default_flow_style=True, allow_unicode=True, width=10_000)
    return yaml.safe_dump(tree, allow_unicode=True, sort_keys=False)


def encode(text: str, how: str) -> bytes:
    if how == "utf-16":
        return text.encode("utf-16")  # with BOM
    if how == "utf-8-sig":
        return text.encode("utf-8-sig")
    if how == "latin-1":
        return text.encode("latin-1", errors="replace")
    if how == "stray":
        data = text.encode("utf-8")
        return data[: len(data) // 2] + b"\xff\xfe\x80" + data[len(data) // 2:]
    return text.encode("utf-8")


@st.composite
def job_texts(draw: st.DrawFn) -> bytes:
    """A schema-built job as YAML / JSON text, maybe cut short, changed and re-encoded."""
    tree = draw(JOB_TREES)
    text = to_text(tree, draw(st.sampled_from(["yaml", "yaml", "json", "flow"])))
    edit = draw(st.sampled_from(["none", "none", "cut", "tab", "insert", "dup", "env"]))
    at = draw(st.integers(0, max(0, len(text))))
    if edit == "cut":
        text = text[:at]
    elif edit == "tab":
        text = text[:at] + "\t" + text[at:]
    elif edit == "insert":
        text = text[:at] + draw(st.sampled_from([":", "- ", "{", "]", "&a ", "*a", "!!python/object:os.system ", "'",
                                                 '"', "#", "\x00", "\r", "%YAML 1.1\n---\n", "\n---\n"])) + text[at:]
    elif edit == "dup":
        text = text + "\n" + text
    elif edit == "env":
        text = text.replace("fuzz_job", draw(st.sampled_from(["${AITK_FUZZ_UNSET}", "${AITK_FUZZ_UNSET:-x}", "$${x}"])))
    return encode(text, draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-16", "utf-8-sig", "latin-1", "stray"])))


def alias_bomb(levels: int, width: int) -> str:
    """YAML whose aliases repeat inside each other: `width ** levels` values once expanded."""
    lines = ["a0: &a0 [x]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "job: extension\nmeta:\n" + "\n".join("  " + line for line in lines) + "\nconfig: {name: x}\n"


def deep_json(levels: int) -> bytes:
    return ('{"job": "extension", "meta": ' + '{"k": [' * levels + "1" + "]}" * levels + "}").encode()


ODD_LIST: list[bytes] = [
        b"", b"   \n", b"# only a comment\n", b"\xef\xbb\xbf", b"---\n...\n", b"- a\n- b\n", b"42\n", b"null\n",
        b"'text'\n", b"[]\n", b"{}\n", b"{\n", b"job: extension\nconfig: &c {name: x, process: *c}\n",
        b"a: &x [*x]\n", b"config: &x {name: *x}\n", b"config:\n  name: !!binary aGVsbG8=\n",
        b"config: !!python/object/apply:os.system [echo]\n", b"? [a, b]\n: c\n", b"? {a: 1}\n: c\n",
        b"config:\n  process:\n    - <<: *undefined\n", b"x: 1\nx: 2\n", b"\x00\x01\x02\x03",
        "config: {name: caf\u00e9}\n".encode("latin-1"), "job: extension\n".encode("utf-16-le"),
        ("[" * 5000 + "]" * 5000).encode(), ("{a: " * 3000 + "1" + "}" * 3000).encode(),
        ("- " * 2000 + "x\n").encode(), ('{"a": ' * 5000 + "1" + "}" * 5000).encode(),
        alias_bomb(4, 5).encode(), alias_bomb(9, 9).encode(), alias_bomb(30, 2).encode(),
]

ODD_DOCUMENTS = st.one_of(
    st.sampled_from(range(len(ODD_LIST))).map(ODD_LIST.__getitem__),
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", errors="surrogatepass")),
    json_like(3).map(lambda tree: to_text(tree, "yaml").encode()),
    st.integers(1, 3000).map(deep_json),
)

# ------------------------------------------------------------------------------------ the property


def check_job_file(path: Path, round_trip: bool = False) -> bool:
    """The property for one file: a loaded job or a user-facing JobFileError; `aitk validate`
    without a traceback. With `round_trip`, a loaded job's dump_job (config.yaml of a run) loads
    back to the same text. Returns whether the file loaded."""
    try:
        loaded = load_job_file(path)
    except JobFileError as exc:
        message = str(exc)
        assert exc.problems and all(p.strip() for p in exc.problems), message
        assert message.strip() and TRACEBACK not in message, message
        loaded = None
    if loaded is not None and round_trip:
        text = dump_job(loaded.job)
        again = parse_job_text(text, source="config.yaml", environ={})
        assert dump_job(again.job) == text, text
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = validate_command([str(path)])
    printed = out.getvalue() + err.getvalue()
    assert code in (0, 1), printed
    assert TRACEBACK not in printed and "could not be checked" not in printed, printed
    assert printed.strip(), "aitk validate printed nothing"
    return loaded is not None


def _write(data: bytes, folder: Path, suffix: str = ".yaml") -> Path:
    path = folder / f"job{suffix}"
    path.write_bytes(data)
    return path


def _run(strategy: st.SearchStrategy[bytes], base: int, suffix_from_data: bool = False,
         round_trip: bool = False) -> tuple[int, int]:
    """(examples run, files that loaded)."""
    count, loaded = Counter(), Counter()
    with tempfile.TemporaryDirectory(prefix="aitk-fuzz-jobs-") as tmp:
        folder = Path(tmp)

        @fuzz_settings(base)
        @given(data=strategy)
        def run(data: bytes) -> None:
            count.add()
            suffix = ".json" if suffix_from_data and data[:1] == b"{" else ".yaml"
            loaded.add(check_job_file(_write(data, folder, suffix), round_trip))

        run()
    return count.n, loaded.n


def test_schema_built_job_trees() -> None:
    """Trees from the schema (right and wrong types, unknown and near-miss keys), written as YAML."""
    ran, loaded = _run(JOB_TREES.map(lambda tree: to_text(tree, "yaml").encode("utf-8")), TREE_EXAMPLES)
    assert ran >= budget(TREE_EXAMPLES)
    assert ran // 10 < loaded < ran - ran // 10  # both sides of the property are exercised


def test_job_texts_cut_changed_and_reencoded() -> None:
    """The same trees as YAML, flow YAML or JSON text, cut, changed and in odd encodings."""
    ran, _ = _run(job_texts(), TEXT_EXAMPLES, suffix_from_data=True)
    assert ran >= budget(TEXT_EXAMPLES)


def test_odd_documents() -> None:
    """Odd roots, recursive aliases, alias bombs, deep nesting, binary data, other encodings."""
    ran, _ = _run(ODD_DOCUMENTS, ODD_EXAMPLES)
    assert ran >= budget(ODD_EXAMPLES)


def test_loaded_jobs_dump_and_load_back() -> None:
    """A job that loads is written as the run's config.yaml (dump_job) and reads back the same."""
    trees = model_tree(JobFile).map(lambda tree: to_text(merge(BASE_JOB, tree), "yaml").encode())
    ran, loaded = _run(trees, ROUND_TRIP_EXAMPLES, round_trip=True)
    assert ran >= budget(ROUND_TRIP_EXAMPLES) and loaded >= ran // 10


# ------------------------------------------------------------------------------------ regressions


def _problems(text: str) -> list[str]:
    try:
        parse_job_text(text, source="job.yaml", environ={})
    except JobFileError as exc:
        return exc.problems
    raise AssertionError("the job loaded")


def test_recursive_alias_is_refused_not_a_recursion_error() -> None:
    problems = _problems("job: extension\nconfig: &c {name: x, process: *c}\n")
    assert problems == ["an alias (*name) is used inside its own anchor (&name), so the value contains itself; "
                        "write the value out instead"]


def test_alias_bomb_is_refused_before_it_is_expanded() -> None:
    (problem,) = _problems(alias_bomb(30, 2))  # 2**30 values once expanded
    assert problem.startswith("the file expands to more than 100000 values")


def test_deep_nesting_is_refused_not_a_recursion_error() -> None:
    for text in ("[" * 5000 + "]" * 5000, "- " * 2000 + "x\n", deep_json(3000).decode(), deep_json(80).decode()):
        (problem,) = _problems(text)
        assert "nested" in problem and "levels" in problem, problem


def test_control_character_is_a_yaml_problem_with_its_line() -> None:
    assert _problems("job: extension\nconfig:\n  name: a\x00b\n") == [
        'line 3, column 10: the character #x0000 (a control character or non-character) is not allowed in YAML; '
        'remove it, or write it as "\\x00" inside double quotes'
    ]


def test_home_of_an_unknown_user_is_not_an_exception() -> None:
    """`~name/...` of a user this machine does not have: Path.expanduser raises RuntimeError."""
    text = yaml.safe_dump(merge(BASE_JOB, {"config": {"process": [{
        "training_folder": "~no_such_user_aitk/out", "sample": {"ctrl_img": "~no_such_user_aitk/c.png"},
        "model": {"arch": "flux_kontext"}}]}}))
    loaded = parse_job_text(text, environ={})
    assert loaded.job.config.process[0].training_folder == "~no_such_user_aitk/out"
    from aitk.config.prompts import build_preview_requests, missing_ctrl_images

    process = loaded.job.config.process[0]
    requests = build_preview_requests(process.sample, process.trigger_word)
    assert missing_ctrl_images(requests, "flux_kontext") == {0: "~no_such_user_aitk/c.png"}
