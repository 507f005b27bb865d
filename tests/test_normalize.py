"""Payload normalization: ThingsBoard's value rules (spec §5), by example and by property."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_gateway import normalize
from tb_gateway.errors import PayloadError
from tb_gateway.normalize import ValueRules, attributes, key_list, telemetry

NOW = 1_700_000_000_000
CAST = ValueRules()
NO_CAST = ValueRules(type_cast=False)


def tel(payload: Any, rules: ValueRules = CAST) -> list[tuple[int, dict[str, Any]]]:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return telemetry(raw, NOW, rules)


def test_plain_object_gets_server_time() -> None:
    assert tel({"temperature": 25.5, "humidity": 60}) == [(NOW, {"temperature": 25.5, "humidity": 60})]


def test_ts_values_object_and_arrays_of_either() -> None:
    payload = [{"ts": 1234567890000, "values": {"t": 25.5}}, {"t": 25.6}]
    assert tel(payload) == [(1234567890000, {"t": 25.5}), (NOW, {"t": 25.6})]


def test_one_group_per_distinct_ts_as_thingsboard() -> None:
    """Spec §1.4: each distinct ts is one rule-engine message; an array of plain objects shares the server
    time. The parsed document is never changed in place (orjson's dicts may be the values themselves)."""
    assert tel([{"a": 1}, {"b": 2}, {"a": 3}]) == [(NOW, {"a": 3, "b": 2})]
    payload = [{"ts": 5, "values": {"x": 1}}, {"ts": 6, "values": {"y": 1}}, {"ts": 5, "values": {"x": 2, "z": 0}}]
    assert tel(payload) == [(5, {"x": 2, "z": 0}), (6, {"y": 1})]
    assert tel([{"ts": 5, "values": {"x": 1}}, {"ts": 5, "values": {}}]) == [(5, {"x": 1})]


def test_object_needs_both_ts_and_values_to_be_timestamped() -> None:
    assert tel({"ts": 5, "t": 1}) == [(NOW, {"ts": 5, "t": 1})]
    assert tel({"values": {"a": 1}}) == [(NOW, {"values": {"a": 1}})]
    assert tel({"ts": 5, "values": {"a": 1}, "metadata": {"x": 1}}) == [(5, {"a": 1})]


def test_numeric_string_ts_accepted() -> None:
    assert tel({"ts": "1700000000123", "values": {"a": 1}}) == [(1700000000123, {"a": 1})]


@pytest.mark.parametrize("bad_ts", ["soon", True, 1.5, -1, None, {"a": 1}])
def test_bad_ts_refused_with_its_place(bad_ts: Any) -> None:
    with pytest.raises(PayloadError, match=r"telemetry\[1\]\.ts"):
        tel([{"a": 1}, {"ts": bad_ts, "values": {"a": 1}}])


def test_value_types() -> None:
    raw = (
        b'{"b":true,"i":42,"d":42.0,"f":1.5,"e":1e3,"ef":1.5e-3,"s":"text","ns":"42","nd":"4.5",'
        b'"big":123456789012345678901234,"j":{"x":[1,2]},"a":[1,"x"],"n":null,"long":0.12345678901234567891}'
    )
    [(_, values)] = tel(raw)
    assert values == {
        "b": True,
        "i": 42,
        "d": 42.0,
        "f": 1.5,
        "e": 1000,
        "ef": 0.0015,
        "s": "text",
        "ns": 42,
        "nd": 4.5,
        "big": "123456789012345678901234",
        "j": {"x": [1, 2]},
        "a": [1, "x"],
        "long": "0.12345678901234567891",
    }
    assert isinstance(values["d"], float) and isinstance(values["e"], int)


def test_type_cast_off_keeps_strings_and_refuses_big_integers() -> None:
    assert tel({"ns": "42"}, NO_CAST) == [(NOW, {"ns": "42"})]
    with pytest.raises(PayloadError, match="64-bit"):
        tel(b'{"big": 123456789012345678901234}', NO_CAST)


def test_null_values_skipped_and_empty_groups_dropped() -> None:
    assert tel({"a": None}) == []
    assert tel({}) == []
    assert tel([]) == []


def test_max_string_length() -> None:
    with pytest.raises(PayloadError, match=r"telemetry\.s: string longer than 3"):
        tel({"s": "abcd"}, ValueRules(max_string_length=3))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "empty payload"),
        (b"{bad", "invalid JSON"),
        (b"42", "expected a JSON object or array, got a number"),
        (b'"x"', "got a string"),
        (b"[1]", r"telemetry\[0\]: expected a JSON object, got a number"),
        (b'{"ts":1,"values":[1]}', r"telemetry\.values: expected a JSON object, got an array"),
        (b'{"a":NaN}', "invalid JSON"),
        (b'{"' + b"k" * 256 + b'":1}', "longer than 255"),
    ],
)
def test_bad_telemetry_says_what_and_where(payload: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        tel(payload)


def test_attributes_must_be_an_object() -> None:
    assert attributes(b'{"fw":"1.2.3","n":null,"c":"7"}', CAST) == {"fw": "1.2.3", "c": 7}
    for bad in (b"[]", b"1", b'[{"a":1}]'):
        with pytest.raises(PayloadError, match="attributes: expected a JSON object"):
            attributes(bad, CAST)


def test_key_list() -> None:
    assert key_list(None) is None
    assert key_list("a, b,,c") == ["a", "b", "c"]
    assert key_list("") == []


# --- properties -------------------------------------------------------------------------------------------

keys = st.text(min_size=1, max_size=20)
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    # ThingsBoard keeps more than 16 decimal places as a string; those are tested by example above
    st.floats(allow_nan=False, allow_infinity=False).filter(
        lambda f: not f.is_integer() and len(orjson.dumps(f).split(b"e")[0].partition(b".")[2]) <= 16
    ),
    st.text(alphabet="abcxyz -_", max_size=10),
)
flat = st.dictionaries(keys, scalars, max_size=8)
timestamped = st.fixed_dictionaries({"ts": st.integers(0, 2**53), "values": flat})


@given(st.lists(st.one_of(flat, timestamped), max_size=6))
def test_every_non_null_value_lands_once_in_order(items: list[dict[str, Any]]) -> None:
    groups = telemetry(orjson.dumps(items), NOW, NO_CAST)
    expected: dict[int, dict[str, Any]] = {}  # one group per distinct ts, first appearance first, later keys win
    for item in items:
        ts, values = (item["ts"], item["values"]) if "ts" in item and "values" in item else (NOW, item)
        if values:
            expected[ts] = {**expected.get(ts, {}), **values}
    assert groups == list(expected.items())


@given(st.recursive(scalars | st.none(), lambda c: st.lists(c, max_size=3) | st.dictionaries(keys, c, max_size=3)))
def test_any_json_document_is_normalized_or_refused_with_payload_error(document: Any) -> None:
    try:
        telemetry(orjson.dumps(document), NOW, CAST)
    except PayloadError as exc:
        assert str(exc)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_escape_as_other_errors(data: bytes) -> None:
    try:
        telemetry(data, NOW, CAST)
        attributes(data, CAST)
    except PayloadError:
        pass


# --- the C fast path (_speedups.c) against the Python reference --------------------------------------------

numeric_looking = st.sampled_from(["12", "-3.5", ".5", "5.", "-", "1.2.3", "٣", "0x1", "1e3", "", " 7", "-0"])
tricky_values = st.one_of(
    scalars,
    numeric_looking,
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),  # integral doubles too: the fast path must step aside
    st.integers(),  # beyond 64 bits too
    st.text(max_size=12),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
tricky_keys = st.one_of(keys, st.text(min_size=250, max_size=260))
tricky_flat = st.dictionaries(tricky_keys, tricky_values, max_size=6)
tricky_ts = st.one_of(
    st.sampled_from([-1, 0, 7, 2**63 - 1, 2**63, 1.0, 1.5, -2.0, "7", " 8", "x", True, False, None]),
    st.integers(0, 2**53),
)
tricky_item = st.one_of(
    tricky_flat,
    st.fixed_dictionaries({"ts": tricky_ts, "values": st.one_of(tricky_flat, st.integers())}),
    st.fixed_dictionaries({"ts": tricky_ts}),
    st.integers(),
)
tricky_document = st.one_of(tricky_item, st.lists(tricky_item, max_size=4), st.text(max_size=3))
all_rules = st.builds(ValueRules, st.booleans(), st.sampled_from([0, 3, 10]))


def _outcome(parse: Any, payload: bytes, *args: Any) -> Any:
    try:
        return parse(payload, *args)
    except PayloadError as exc:
        return ("refused", str(exc))


def test_the_c_fast_path_is_built() -> None:
    """`make test` builds it (setup.py); without it the properties below would compare Python with itself."""
    assert normalize._speedups is not None


# mostly what the fast path answers itself (one odd value sends a whole item to Python)
plain_item = st.dictionaries(keys, st.one_of(scalars, st.none(), numeric_looking), max_size=4)
plain_timestamped = st.fixed_dictionaries({"ts": tricky_ts, "values": plain_item})
plain_document = st.one_of(plain_item, st.lists(st.one_of(plain_item, plain_timestamped), max_size=3))


@settings(max_examples=1500)
@given(st.one_of(plain_document, tricky_document), all_rules)
def test_the_c_fast_path_reads_every_payload_as_the_python_rules_do(document: Any, rules: ValueRules) -> None:
    payload = json.dumps(document).encode()  # the stdlib: integers beyond 64 bits too
    fast = (_outcome(telemetry, payload, NOW, rules), _outcome(attributes, payload, rules))
    speedups, normalize._speedups = normalize._speedups, None
    try:
        reference = (_outcome(telemetry, payload, NOW, rules), _outcome(attributes, payload, rules))
    finally:
        normalize._speedups = speedups
    assert repr(fast) == repr(reference)  # repr: True, 1 and 1.0 are equal but must not be confused


@pytest.mark.parametrize(
    "payload",
    [
        b'{"t":25.5,"h":60,"ok":true,"s":"up","n":null}',
        b'[{"ts":1600000000000,"values":{"a":1.5}},{"b":"x"},{"ts":5,"values":{}}]',
        b'{"ts":1,"other":2}',
    ],
)
def test_the_c_fast_path_answers_the_common_payloads_itself(payload: bytes) -> None:
    assert normalize._speedups is not None
    document = orjson.loads(payload)
    assert normalize._speedups.telemetry(document, NOW, True, 0) == telemetry(payload, NOW, CAST)


@settings(max_examples=2000)
@given(st.lists(st.sampled_from([b".", b"0", b"9", b"5" * 8, b"1" * 17, b"x", b'"', b"-", b"e"]), max_size=40))
def test_the_c_long_fraction_search_finds_what_the_pattern_finds(parts: list[bytes]) -> None:
    payload = b"".join(parts)
    assert normalize._speedups is not None
    assert normalize._speedups.long_fraction(payload) is (normalize._LONG_FRACTION.search(payload) is not None)


def test_values_are_reused_only_when_nothing_is_dropped() -> None:
    """The fast path answers with the parsed dict itself when every value passes as it is (no copy)."""
    assert normalize._speedups is not None
    document = orjson.loads(b'{"a":1,"b":"x","c":2.5}')
    [(_, values)] = normalize._speedups.telemetry(document, NOW, True, 0)
    assert values is document
    with_null = orjson.loads(b'{"a":1,"b":null,"c":2.5,"d":null,"e":true}')
    [(_, values)] = normalize._speedups.telemetry(with_null, NOW, True, 0)
    assert values == {"a": 1, "c": 2.5, "e": True} and values is not with_null
    assert with_null == {"a": 1, "b": None, "c": 2.5, "d": None, "e": True}  # the document is left alone
    assert normalize._speedups.telemetry(orjson.loads(b'{"a":null}'), NOW, True, 0) == []


# --- what no record could hold is refused here, never left for the sink to fail on ----------------------------

_odd_numbers = st.sampled_from(
    ["1e400", "-1E400", "1.5e400", "12345678901234567890123", "1" + "0" * 5000, "0.12345678901234567", "42.0", "1e3"]
)
_odd_strings = st.sampled_from(
    ['"\\ud800"', '"\\udfff x"', '"\\ud83d\\ude00"', '"²"', '"1²"', '"①"', '"1' + "0" * 5000 + '"']
)


@st.composite
def _odd_json(draw: st.DrawFn, depth: int = 0) -> str:
    """JSON text with the values that tripped the gateway: numbers beyond a double or int64 (and their
    literal forms), lone surrogates, Unicode digits, nesting near MAX_NESTING."""
    choice = draw(st.integers(0, 5 if depth < 3 else 1))
    if choice == 0:
        return draw(_odd_numbers)
    if choice == 1:
        return draw(_odd_strings)
    if choice == 2:
        levels = draw(st.sampled_from([normalize.MAX_NESTING - 1, normalize.MAX_NESTING, 300, 600]))
        return "[" * levels + draw(_odd_numbers) + "]" * levels
    if choice == 3:
        return "[" + ",".join(draw(st.lists(_odd_json(depth + 1), max_size=3))) + "]"
    items = draw(st.lists(st.tuples(st.sampled_from(["a", "ts", "values", "b"]), _odd_json(depth + 1)), max_size=3))
    return "{" + ",".join(f'"{k}":{v}' for k, v in items) + "}"


@given(_odd_json(), st.sampled_from([CAST, NO_CAST]))
@settings(max_examples=400, deadline=None)
def test_whatever_is_accepted_encodes_again_as_a_record_would(text: str, rules: ValueRules) -> None:
    """A value that orjson cannot write failed the whole batch in the store (other devices' messages too)."""
    payload = text.encode()
    for parse in (lambda: telemetry(payload, NOW, rules), lambda: [(NOW, attributes(payload, rules))]):
        try:
            groups = parse()
        except PayloadError as exc:
            assert str(exc)
            continue
        for ts, values in groups:
            orjson.dumps({"device": "d", "ts": ts, "values": values})  # the record's shape, nested in one more level


def test_deep_nesting_is_refused_with_its_place() -> None:
    deep = normalize.MAX_NESTING
    assert tel(b'{"a":' + b"[" * deep + b"1" + b"]" * deep + b"}") == [
        (NOW, {"a": json.loads("[" * deep + "1" + "]" * deep)})
    ]
    for levels in (deep + 1, 600, 1000):
        with pytest.raises(PayloadError, match=rf"telemetry\.a: nested deeper than {deep} levels"):
            tel(b'{"a":' + b'{"b":' * levels + b"1" + b"}" * levels + b"}")
    with pytest.raises(PayloadError, match="nested deeper"):  # the stdlib parser (a long fraction) recurses
        tel(b'{"x":0.12345678901234567,"a":' + b"[" * 5000 + b"]" * 5000 + b"}")


@pytest.mark.parametrize("ts", ['"²"', '"1²"', '"①"', '"1' + "0" * 5000 + '"', "1" + "0" * 5000])
def test_a_ts_int_cannot_read_is_refused_not_an_error(ts: str) -> None:
    with pytest.raises(PayloadError, match=r"telemetry\.ts: "):
        tel(f'{{"ts":{ts},"values":{{"a":1}}}}'.encode())


def test_numbers_beyond_a_double_follow_the_long_and_double_rules() -> None:
    assert tel(b'{"a":1e400}') == [(NOW, {"a": "1e400"})]  # integral, beyond int64: a string (cast on)
    assert tel(b'{"a":1' + b"0" * 5000 + b"}") == [(NOW, {"a": "1" + "0" * 5000})]
    with pytest.raises(PayloadError, match="outside the 64-bit range"):
        tel(b'{"a":1e400}', NO_CAST)
    with pytest.raises(PayloadError, match=r"telemetry\.a: 1\.5e400 is beyond the range of a double"):
        tel(b'{"a":1.5e400}')
    for payload in (b'{"o":[1e400]}', b'{"o":{"x":1e400},"f":0.12345678901234567}'):
        with pytest.raises(PayloadError, match=r"telemetry\.o: the number 1e400 is beyond the range of a double"):
            tel(payload)


def test_nested_integers_beyond_64_bits_read_the_same_on_both_parsers() -> None:
    """orjson reads them as doubles; the literal-keeping parser (taken for a long fraction) now does too."""
    fast = tel(b'{"o":{"x":12345678901234567890123}}')
    slow = tel(b'{"o":{"x":12345678901234567890123},"f":0.12345678901234567}')
    assert fast[0][1]["o"] == slow[0][1]["o"] == {"x": 1.2345678901234568e22}


def test_a_lone_surrogate_is_invalid_json_on_either_parser() -> None:
    for payload in (b'{"a":"\\ud800"}', b'{"a":"\\ud800","f":0.12345678901234567}', b'{"a":{"b":"\\udfff"},"c":1.0}'):
        with pytest.raises(PayloadError, match="invalid JSON"):
            tel(payload)
