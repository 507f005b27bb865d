"""construct.constructor: the C maker builds the same objects as the dataclass's own __init__."""

from __future__ import annotations

import dataclasses
import gc
import sys
from typing import Any

import pytest

from tb_gateway import construct
from tb_gateway.mqtt.packets import Publish
from tb_gateway.records import DeviceIdentity, Record, RecordKind, Transport

DEVICE = DeviceIdentity("id-1", "dev-1", "sensor", "tok")


def test_record_and_publish_get_the_c_maker() -> None:
    assert construct._maker is not None, "the C extension is built in this environment"
    for cls in (Record, Publish):
        assert construct.constructor(cls) is not cls


@pytest.mark.parametrize(
    ("cls", "args"),
    [
        (Record, (DEVICE, RecordKind.TELEMETRY, 1, {"a": 1}, Transport.MQTT, 2)),
        (Record, (DEVICE, RecordKind.ATTRIBUTES, -(2**70), {}, Transport.HTTP, 0)),
        (Publish, ("v1/devices/me/telemetry", b"{}", 1, 7)),
        (Publish, ("t", b"")),
        (Publish, ("t", b"x", 0, 0, True, True)),
    ],
)
def test_same_object_as_the_dataclass(cls: type[Any], args: tuple[Any, ...]) -> None:
    made = construct.constructor(cls)(*args)
    reference = cls(*args)
    assert type(made) is cls
    assert made == reference
    assert repr(made) == repr(reference)
    for field in dataclasses.fields(cls):
        assert getattr(made, field.name) is getattr(reference, field.name)


def test_wrong_arguments_are_refused_like_a_call() -> None:
    make = construct.constructor(Record)
    with pytest.raises(TypeError, match="6 to 6 arguments"):
        make(DEVICE, RecordKind.TELEMETRY)
    with pytest.raises(TypeError, match="positional"):
        make(DEVICE, RecordKind.TELEMETRY, 1, {}, Transport.MQTT, received_at=2)
    with pytest.raises(TypeError):
        construct.constructor(Publish)()


def test_references_are_counted() -> None:
    make = construct.constructor(Record)
    values: dict[str, Any] = {"k": 1}
    before = sys.getrefcount(values)
    made = [make(DEVICE, RecordKind.TELEMETRY, 1, values, Transport.MQTT, 2) for _ in range(1000)]
    assert sys.getrefcount(values) == before + 1000
    del made
    gc.collect()
    assert sys.getrefcount(values) == before
    cycle: dict[str, Any] = {}
    record = make(DEVICE, RecordKind.TELEMETRY, 1, cycle, Transport.MQTT, 2)
    cycle["self"] = record  # a cycle through a made object: the collector must see its slots
    del record, cycle
    assert gc.collect() >= 2


@dataclasses.dataclass(slots=True)
class _Checked:
    value: int

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ValueError("negative")


@dataclasses.dataclass(slots=True)
class _Factory:
    items: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _NoSlots:
    value: int


@dataclasses.dataclass(slots=True)
class _KwOnly:
    value: int = dataclasses.field(kw_only=True)


@dataclasses.dataclass(slots=True)
class _Base:
    a: int


@dataclasses.dataclass(slots=True)
class _Derived(_Base):
    b: int


@pytest.mark.parametrize("cls", [_Checked, _Factory, _NoSlots, _KwOnly, _Derived, int, dict])
def test_classes_whose_init_does_more_keep_it(cls: type[Any]) -> None:
    assert construct.constructor(cls) is cls


def test_the_c_maker_refuses_what_it_cannot_fill() -> None:
    assert construct._maker is not None
    with pytest.raises(TypeError, match="plain slots"):
        construct._maker(_NoSlots, ("value",), ())
    with pytest.raises(TypeError, match="slot"):
        construct._maker(Record, ("device", "nonsense"), ())
    with pytest.raises(TypeError, match="slot"):
        construct._maker(_Derived, ("a", "b"), ())  # 'a' is the base's slot
