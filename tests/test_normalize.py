"""Payload normalization: ThingsBoard's value rules (spec §5), by example and by property."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

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
    expected = []
    for item in items:
        ts, values = (item["ts"], item["values"]) if "ts" in item and "values" in item else (NOW, item)
        if values:
            expected.append((ts, values))
    assert groups == expected


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
