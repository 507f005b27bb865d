"""Device payload -> key/value groups, following ThingsBoard's value rules (spec §5, docs/device-api.md).

- Telemetry: an object, a ``{"ts": ms, "values": {...}}`` object (timestamped only when it has *both* keys;
  its other keys are ignored), or an array of either. Missing ``ts`` -> server time.
- Attributes: an object only.
- Values: booleans; integers (within int64, else a string); numbers with a ``.`` are doubles, except that
  more than 16 decimal places keep the literal as a string; exponent forms without ``.`` are integers when
  integral; with type cast on (ThingsBoard's default) numeric-looking strings become numbers; objects and
  arrays are kept as JSON; ``null`` is skipped.

orjson parses every payload, and ``_speedups.c`` types the values of the common payload; it answers None
for anything it is not sure of, and the Python code below (the reference) takes over. Only when a payload
holds a number whose type depends on how it was written (an integral double such as ``1e3`` or ``42.0``, more
than 16 decimal places, beyond 64 bits) is it parsed again with the stdlib, keeping the literals: regexes
over every payload cost more than orjson itself.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

from tb_gateway.errors import PayloadError

try:  # the C fast path for the common payload (setup.py builds it when a compiler is present)
    from tb_gateway import _speedups
except ImportError:  # pragma: no cover - a build without a C compiler runs the same rules in Python
    _speedups = None  # type: ignore[assignment]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_DOUBLE_LIMIT = 2**1024  # integers from here on have no double
MAX_DECIMALS = 16
MAX_KEY_LENGTH = 255  # ThingsBoard's key dictionary column; longer keys would fail later, so refuse now
# Objects and arrays kept as values may nest this deep: every record must encode as JSON again (the store, the
# Kafka records), and orjson writes at most 255 levels; no device needs more than a handful.
MAX_NESTING = 128

_NUMERIC_STRING = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")
_INTEGER_STRING = re.compile(r"-?\d+")  # decimal digits, as int() reads them; str.isdigit() also takes "²"


@dataclass(frozen=True, slots=True)
class ValueRules:
    type_cast: bool = True  # JSON_TYPE_CAST_ENABLED
    max_string_length: int = 0  # JSON_MAX_STRING_VALUE_LENGTH; 0 = unlimited


class _Literal(str):
    """A number literal kept verbatim by the slow-path parser."""

    __slots__ = ()


class _NeedLiterals(Exception):
    """A value's type depends on its literal: parse the payload again keeping the literals."""


# More than 16 digits after a '.': ThingsBoard keeps such a number as a string. A pattern that starts with a
# literal is searched with a fast scan (0.2 µs on a 60-byte payload), unlike one that starts with a class.
_LONG_FRACTION = re.compile(rb"\.[0-9]{17}")


def _has_long_fraction(payload: bytes) -> bool:
    return _LONG_FRACTION.search(payload) is not None


# the same search in C for bytes (most payloads), a seventh of the cost
_long_fraction = _speedups.long_fraction if _speedups is not None else _has_long_fraction


def parse_json(payload: bytes, *, literals: bool = False) -> Any:
    if not payload or payload.isspace():
        raise PayloadError("empty payload: expected JSON")
    try:
        long_fraction = _long_fraction if type(payload) is bytes else _has_long_fraction
        if not literals and not long_fraction(payload):
            try:
                return orjson.loads(payload)
            except orjson.JSONDecodeError as exc:
                if "infinity" not in str(exc):
                    raise
                # 1e400: beyond a double, but a number all the same; its literal decides (_number)
        document = json.loads(payload, parse_float=_Literal, parse_int=_Literal, parse_constant=_reject_constant)
        # the stdlib accepts what orjson would refuse (a lone surrogate) and what no record could hold
        orjson.dumps(document)
        return document
    except (orjson.JSONDecodeError, json.JSONDecodeError, UnicodeDecodeError, orjson.JSONEncodeError) as exc:
        raise PayloadError(f"invalid JSON: {exc}") from None
    except RecursionError:  # the stdlib parser nests a Python call per level
        raise PayloadError(f"invalid JSON: nested deeper than {MAX_NESTING} levels") from None


def _reject_constant(name: str) -> Any:
    raise PayloadError(f"invalid JSON: {name} is not a JSON value")


def telemetry(payload: bytes, now_ms: int, rules: ValueRules) -> list[tuple[int, dict[str, Any]]]:
    """Telemetry payload -> ``[(ts, values), ...]`` in payload order; empty groups are dropped."""
    document = parse_json(payload)
    groups = None
    if _speedups is not None:
        groups = _speedups.telemetry(document, now_ms, rules.type_cast, rules.max_string_length)
    if groups is None:
        try:
            groups = _telemetry(document, now_ms, rules)
        except _NeedLiterals:
            groups = _telemetry(parse_json(payload, literals=True), now_ms, rules)
    return groups if len(groups) < 2 else _one_per_ts(groups)


def _one_per_ts(groups: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
    """One group per distinct ``ts``, in order of first appearance, a later value of a key winning (ThingsBoard
    collects a message's values per ts: one rule-engine message each, spec §1.4). An array of plain objects
    shares the server time, so it is one group too."""
    merged: dict[int, dict[str, Any]] = {}
    for ts, values in groups:
        earlier = merged.get(ts)
        merged[ts] = values if earlier is None else {**earlier, **values}  # never changes a parsed dict in place
    return groups if len(merged) == len(groups) else list(merged.items())


def _telemetry(document: Any, now_ms: int, rules: ValueRules) -> list[tuple[int, dict[str, Any]]]:
    if type(document) is dict:
        items, where = [document], "telemetry"
    elif type(document) is list:
        items, where = document, "telemetry[{}]"
    else:
        raise PayloadError(f"telemetry: expected a JSON object or array, got {_kind(document)}")
    groups: list[tuple[int, dict[str, Any]]] = []
    for index, item in enumerate(items):
        place = where.format(index) if items is document else where
        if type(item) is not dict:
            raise PayloadError(f"{place}: expected a JSON object, got {_kind(item)}")
        if "ts" in item and "values" in item:
            ts = _timestamp(item["ts"], f"{place}.ts")
            raw = item["values"]
            if not isinstance(raw, dict):
                raise PayloadError(f"{place}.values: expected a JSON object, got {_kind(raw)}")
            values = typed_values(raw, f"{place}.values", rules)
        else:
            ts, values = now_ms, typed_values(item, place, rules)
        if values:
            groups.append((ts, values))
    return groups


def attributes(payload: bytes, rules: ValueRules) -> dict[str, Any]:
    try:
        return _attributes(parse_json(payload), rules)
    except _NeedLiterals:
        return _attributes(parse_json(payload, literals=True), rules)


def _attributes(document: Any, rules: ValueRules) -> dict[str, Any]:
    if not isinstance(document, dict):
        raise PayloadError(f"attributes: expected a JSON object, got {_kind(document)}")
    if _speedups is not None:
        values = _speedups.values(document, rules.type_cast, rules.max_string_length)
        if values is not None:
            return values
    return typed_values(document, "attributes", rules)


def typed_values(raw: dict[str, Any], where: str, rules: ValueRules) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in raw.items():
        kind = type(value)
        if kind is float:
            if value.is_integer():  # 42.0 is a double, 1e3 a long: only the literal tells
                raise _NeedLiterals
            values[key] = value
        elif (kind is int and INT64_MIN <= value <= INT64_MAX) or kind is bool:
            values[key] = value
        elif value is not None:
            values[key] = _typed(value, where, key, rules)
        if len(key) > MAX_KEY_LENGTH:
            raise PayloadError(f"{where}: key {key[:32]!r}... is longer than {MAX_KEY_LENGTH} characters")
    return values


def _typed(value: Any, parent: str, key: str, rules: ValueRules) -> Any:
    """Type one value; the place for an error message (``parent.key``) is only built on error."""
    if type(value) is int and INT64_MIN <= value <= INT64_MAX:
        return value
    where = f"{parent}.{key}"
    if isinstance(value, _Literal):
        return _number(str(value), where, rules, literal=True)
    if value is True or value is False:
        return value
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            return value
        return _out_of_range(str(value), where, rules)
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        if rules.max_string_length and len(value) > rules.max_string_length:
            raise PayloadError(f"{where}: string longer than {rules.max_string_length} characters")
        if rules.type_cast and _NUMERIC_STRING.fullmatch(value):
            return _number(value, where, rules, literal=False)
        return value
    if isinstance(value, dict | list):
        try:
            return _plain(value, MAX_NESTING)
        except _Unstorable as exc:
            raise PayloadError(f"{where}: {exc}") from None
    raise PayloadError(f"{where}: unsupported value {value!r}")  # pragma: no cover - JSON has no other types


def _number(text: str, where: str, rules: ValueRules, *, literal: bool) -> Any:
    """Type a number given as text, exactly as ThingsBoard does (a '.' decides between double and long)."""
    if "." in text:
        mantissa = text.lower().split("e", 1)[0]
        decimals = len(mantissa.split(".", 1)[1].rstrip("0"))
        if decimals > MAX_DECIMALS:
            if rules.type_cast or not literal:
                return text
            raise PayloadError(f"{where}: more than {MAX_DECIMALS} decimal places")
        double = float(text)
        if math.isinf(double):
            raise PayloadError(f"{where}: {text} is beyond the range of a double")
        return double
    if "e" not in text and "E" not in text and _beyond_int64_digits(text):
        return _out_of_range(text, where, rules)  # no int() of it: Python refuses over 4300 digits
    number = float(text) if ("e" in text or "E" in text) else int(text)
    if isinstance(number, float):
        if math.isinf(number):  # 1e400: integral, far outside the 64-bit range
            return _out_of_range(text, where, rules)
        if not number.is_integer():
            return number
        number = int(number)
    if INT64_MIN <= number <= INT64_MAX:
        return number
    return _out_of_range(text, where, rules)


def _out_of_range(text: str, where: str, rules: ValueRules) -> str:
    if rules.type_cast:
        return text
    raise PayloadError(f"{where}: integer outside the 64-bit range")


class _Unstorable(Exception):
    """Nested JSON that no record could hold; the message says why."""


def _plain(value: Any, room: int) -> Any:
    """Nested JSON kept as JSON, at most ``room`` levels of objects and arrays: literals kept by the slow path
    become ordinary numbers again, as orjson reads them on the fast path (beyond 64 bits, a double)."""
    if isinstance(value, _Literal):
        text = str(value)
        number = float(text) if _beyond_int64_digits(text) else json.loads(text)
        if type(number) is int and not INT64_MIN <= number <= INT64_MAX:
            number = float(number) if abs(number) < _DOUBLE_LIMIT else math.inf
        if type(number) is float and math.isinf(number):
            raise _Unstorable(f"the number {text[:32]} is beyond the range of a double")
        return number
    if isinstance(value, dict | list):
        if room <= 0:
            raise _Unstorable(f"nested deeper than {MAX_NESTING} levels")
        if isinstance(value, dict):
            return {k: _plain(v, room - 1) for k, v in value.items()}
        return [_plain(v, room - 1) for v in value]
    return value


def _timestamp(value: Any, where: str) -> int:
    """Epoch milliseconds: an integer, an integral number or a numeric string (read as a long)."""
    if isinstance(value, _Literal) or (isinstance(value, str) and _INTEGER_STRING.fullmatch(value.strip())):
        text = value.strip()
        if _beyond_int64_digits(text):
            raise PayloadError(f"{where}: timestamp {text[:32]} is out of range")
        value = json.loads(text) if isinstance(value, _Literal) else int(text)
    if isinstance(value, bool):
        raise PayloadError(f"{where}: expected epoch milliseconds, got a boolean")
    if isinstance(value, int):
        ts = value
    elif isinstance(value, float) and value.is_integer():
        ts = int(value)
    else:
        raise PayloadError(f"{where}: expected epoch milliseconds, got {value!r}")
    if not 0 <= ts <= INT64_MAX:
        raise PayloadError(f"{where}: timestamp {ts} is out of range")
    return ts


def _beyond_int64_digits(text: str) -> bool:
    """An integer literal with more digits than any int64 has (leading zeros aside): out of range, whatever
    its value, and too long for ``int()`` past 4300 digits."""
    digits = text.lstrip("-").lstrip("0")
    return len(digits) > 19 and digits.isdigit()


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def key_list(text: str | None) -> list[str] | None:
    """``"a,b"`` -> ``["a", "b"]``; absent -> None (meaning all keys)."""
    if text is None:
        return None
    return [key.strip() for key in text.split(",") if key.strip()]
