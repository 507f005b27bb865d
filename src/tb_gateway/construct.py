"""Cheap construction of the hot path's slots dataclasses (a Record per message, a Publish per packet).

A dataclass's generated ``__init__`` is a Python frame plus an attribute store per field: 650 ns for a
``Record`` on this machine, a visible share of a message that costs a few microseconds in all.
``constructor(cls)`` answers a C callable (``_speedups.maker``) that fills the slots directly from positional
arguments, with the dataclass's defaults for the trailing fields left out, or ``cls`` itself when the class
is not a plain one (a ``__post_init__``, a default factory, keyword-only or non-init fields, no slots) or
the C extension is missing. tests/test_construct.py checks that both build equal objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

try:
    from tb_gateway._speedups import maker as _maker
except ImportError:  # pragma: no cover - a build without a C compiler calls the class
    _maker = None  # type: ignore[assignment]

T = TypeVar("T")


def constructor(cls: type[T]) -> Callable[..., T]:
    """A callable equivalent to ``cls(*args)`` for positional arguments; ``cls`` itself when it must be."""
    if _maker is None or not plain(cls):
        return cls
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    defaults = tuple(f.default for f in fields if f.default is not dataclasses.MISSING)
    try:
        return _maker(cls, tuple(f.name for f in fields), defaults)  # type: ignore[no-any-return]
    except TypeError:  # a field the C side cannot fill (inherited, read-only): the class's own __init__
        return cls


def plain(cls: type[Any]) -> bool:
    """A slots dataclass whose ``__init__`` only stores its arguments, so filling the slots is the same."""
    if not dataclasses.is_dataclass(cls) or "__slots__" not in cls.__dict__ or hasattr(cls, "__post_init__"):
        return False
    fields = dataclasses.fields(cls)
    if any(not f.init or f.kw_only or f.default_factory is not dataclasses.MISSING for f in fields):
        return False
    with_default = [f.default is not dataclasses.MISSING for f in fields]
    return with_default == sorted(with_default)  # defaults trail, as the C side fills them
