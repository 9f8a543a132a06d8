"""the one bounded YAML loader: hostile documents end in YamlError, never in a blow-up."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydstack.types import yamllimits
from pydstack.types.yamllimits import YamlError


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """nine levels of nine aliases each: 9**9 strings once expanded, a few hundred bytes."""
    lines = ["a: &a [" + ",".join(['"x"'] * width) + "]"]
    prev = "a"
    for name in "bcdefghijklmnop"[: levels - 1]:
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * width) + "]")
        prev = name
    return "\n".join(lines) + "\n"


def test_plain_documents_load():
    doc = yamllimits.load("a: 1\nb: [x, 'y', 2.5, true, null, ~, '']\nc: {d: e}\n")
    assert doc == {"a": 1, "b": ["x", "y", 2.5, True, None, None, ""], "c": {"d": "e"}}
    assert yamllimits.load(b"k: v\n") == {"k": "v"}
    assert yamllimits.load("") is None


def test_scalars_follow_the_yaml_1_2_core_schema():
    doc = yamllimits.load(
        "t: 2001-02-30\nsexagesimal: 22:22\nyes: yes\noff: off\noct: 0o17\nhex: 0x1f\n"
        "dec: 017\nf: 1e3\ninf: -.inf\nnan: .NaN\nbool: True\n"
    )
    assert doc == {
        "t": "2001-02-30",  # not a date, and an impossible one is no error
        "sexagesimal": "22:22",
        "yes": "yes",
        "off": "off",
        "oct": 15,
        "hex": 31,
        "dec": 17,
        "f": 1000.0,
        "inf": float("-inf"),
        "nan": doc["nan"],
        "bool": True,
    }
    assert doc["nan"] != doc["nan"]  # nan


def test_merge_keys_and_aliases():
    doc = yamllimits.load(
        "base: &base {image: x, restart: always}\n"
        "more: &more {user: u, restart: 'no'}\n"
        "svc:\n  <<: [*base, *more]\n  image: y\n"
        "list: &l [1, 2]\nagain: *l\n"
    )
    assert isinstance(doc, dict)
    # own keys win over merged ones, earlier merged mappings over later ones
    assert doc["svc"] == {"image": "y", "restart": "always", "user": "u"}
    assert doc["again"] == [1, 2]


def test_the_alias_bomb_is_refused_before_expansion():
    bomb = alias_bomb()
    assert len(bomb) < 500
    with pytest.raises(YamlError, match="more than 100000 nodes"):
        yamllimits.load(bomb)
    # the same shape, small enough, loads: the counting is by expansion, not by refusal
    assert isinstance(yamllimits.load(alias_bomb(levels=3)), dict)


def test_node_and_depth_limits_count_through_aliases():
    with pytest.raises(YamlError, match="more than 10 nodes"):
        yamllimits.load("a: &a [1, 2, 3]\nb: [*a, *a, *a]\n", max_nodes=10)
    deep = "a: &a " + "[" * 40 + "]" * 40 + "\nb: " + "[" * 30 + "*a" + "]" * 30 + "\n"
    with pytest.raises(YamlError, match="deeper than 64 levels"):
        yamllimits.load(deep)
    assert yamllimits.load("a: &a " + "[" * 40 + "]" * 40 + "\nb: [[*a]]\n") is not None


@pytest.mark.parametrize("depth", [65, 1_500, 500_000])
def test_deep_nesting_is_a_yaml_error_not_a_recursion_error(depth: int):
    # past 1000 levels libyaml's own guard answers first; either way a YamlError
    with pytest.raises(YamlError, match=r"deeper than 64|nesting depth"):
        yamllimits.load("[" * depth + "]" * depth)
    with pytest.raises(YamlError, match=r"deeper than 64|nesting depth"):
        yamllimits.load("{a: " * depth + "}" * depth)
    block = "".join(" " * i + "- \n" for i in range(0, 2 * min(depth, 1000), 2))
    with pytest.raises(YamlError, match=r"deeper than 64|nesting depth"):
        yamllimits.load(block)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: !!python/object/apply:os.system [id]\n", "not allowed"),
        ("a: !!python/name:os.system\n", "not allowed"),
        ("a: !!binary aGk=\n", "not allowed"),
        ("a: !!set {x}\n", "not allowed"),
        ("a: !!timestamp 2001-02-30\n", "not allowed"),
        ("a: !custom x\n", "not allowed"),
        ("a: !!int x\n", "not a valid int"),
        ("a: !!float y\n", "not a valid float"),
        ("a: !!bool maybe\n", "not a valid bool"),
        ("a: !!null x\n", "not a valid null"),
        ("a: !!seq x\n", "not a valid seq|not allowed"),
        ("a: !!map [x]\n", "not allowed here"),
        ("? [a, b]\n: x\n", "keys must be strings"),
        ("? {a: b}\n: x\n", "keys must be strings"),
        ("!!bool true: x\n", "must be a plain string"),
        ("!!int 1: x\n", "must be a plain string"),
        ("k: &k v\n*k : x\n", "cannot be a mapping key"),
        ("a: 1\na: 2\n", "key 'a' twice"),
        ("a: &a [*a]\n", "recursive"),
        ("a: *nowhere\n", "no anchor"),
        ("<<: 5\n", "merge key needs a mapping"),
        ("--- a\n--- b\n", "more than one document"),
        ("a: [\n", "not valid yaml"),
        ("a: \x01\n", "not valid yaml"),
        ('a: "\\udfff"\n', "not valid yaml"),
        ("a: " + "9" * 2000 + "\n", "too long"),
    ],
)
def test_refused_input_raises_only_yaml_error(text: str, message: str):
    with pytest.raises(YamlError, match=message):
        yamllimits.load(text)


def test_non_string_keys_become_their_text():
    assert yamllimits.load("1: a\ntrue: b\n~: c\n") == {"1": "a", "true": "b", "~": "c"}
    with pytest.raises(YamlError, match="twice"):
        yamllimits.load("1: a\n'1': b\n")


def test_encoding_is_utf8_only():
    with pytest.raises(YamlError, match="utf-8"):
        yamllimits.load("a: b\n".encode("utf-16"))
    with pytest.raises(YamlError, match="utf-8"):
        yamllimits.load(b"a: \xff\n")
    with pytest.raises(YamlError, match="lone surrogate"):
        yamllimits.load("a: \udfff\n")
    assert yamllimits.load("a: é\n".encode()) == {"a": "é"}


def test_size_is_checked_before_parsing():
    with pytest.raises(YamlError, match="exceeds 10 bytes"):
        yamllimits.load("a: [" + "1," * 10, max_bytes=10)
    with pytest.raises(YamlError, match="exceeds 10 bytes"):
        yamllimits.load("a: ééééé", max_bytes=10)  # 8 characters, 13 bytes
    with pytest.raises(YamlError, match="exceeds 10 bytes"):
        yamllimits.load(b"a: 12345678", max_bytes=10)


def test_error_messages_quote_little_of_the_input():
    with pytest.raises(YamlError) as e:
        yamllimits.load("a: !!int " + "x" * 100_000 + "\n")
    assert len(str(e.value)) < 200
    with pytest.raises(YamlError) as e:
        yamllimits.load(f"{'k' * 100_000}: 1\n{'k' * 100_000}: 2\n")
    assert len(str(e.value)) < 200


YAMLISH = st.text(alphabet="ab1 :-[]{},&*!|>'\"#%@?<\n\t\\.~$", max_size=80)


def loads_or_refuses(data: str | bytes, **limits: int) -> None:
    """the loader's whole contract on one input: a plain value back, or a short YamlError."""
    try:
        doc = yamllimits.load(data, **limits)
    except YamlError as e:
        assert len(str(e)) < 400
        return

    def plain(v: object) -> bool:
        if isinstance(v, list):
            return all(plain(x) for x in v)
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        return v is None or isinstance(v, (bool, int, float, str))

    assert plain(doc)


@settings(max_examples=1000, deadline=None)
@given(YAMLISH)
def test_any_input_loads_or_raises_yaml_error(text: str):
    loads_or_refuses(text, max_nodes=50, max_depth=5)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60))
def test_any_bytes_load_or_raise_yaml_error(data: bytes):
    loads_or_refuses(data)
