"""Per-device rate limits in ThingsBoard's format ``"capacity:seconds[,capacity:seconds...]"`` (spec §6.4).

Sans-IO: time is a parameter (seconds, any monotonic origin); nothing here reads a clock or does I/O.

A limit is a set of token buckets enforced at once: ``"20:1,600:60"`` lets a burst of 20 through, then 20 per
second, but no more than 600 in any minute. A message passes only if *every* bucket has its tokens, and then
takes them from every bucket; a refused message takes nothing. Refill is greedy as in ThingsBoard's bucket4j
buckets: tokens come back continuously (``capacity / seconds`` per second), not in one lump per period.

Three limits per device, as ThingsBoard's tenant profile has them: every message, telemetry messages, and
telemetry data points (one per key/value, across every timestamp group of the message).

Memory stays bounded for millions of devices: one small array of floats per device that sent something
recently, kept in least-recently-used order. A device idle for the longest period of its limits has every
bucket full again, which is exactly the state of a device never seen, so it is forgotten without changing any
answer. ``max_devices`` is a hard cap beyond that (the least recently used device is forgotten early, which can
only make its next answer more lenient).
"""

from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tb_gateway.config import Settings


@dataclass(frozen=True, slots=True)
class Bandwidth:
    """One bucket: at most ``capacity`` tokens, refilled at ``capacity / period_s`` tokens per second."""

    capacity: int
    period_s: int

    @property
    def rate(self) -> float:
        return self.capacity / self.period_s

    def __str__(self) -> str:
        return f"{self.capacity}:{self.period_s}"


Limit = tuple[Bandwidth, ...]


def parse_limit(text: str) -> Limit:
    """``"200:1,6000:60"`` -> its buckets; raise ``ValueError`` naming the bad part. Blank -> no limit."""
    if not text.strip():
        return ()
    buckets: list[Bandwidth] = []
    for part in (p.strip() for p in text.split(",")):
        capacity, sep, seconds = part.partition(":")
        try:
            bandwidth = Bandwidth(int(capacity), int(seconds)) if sep else None
        except ValueError:
            bandwidth = None
        if bandwidth is None or bandwidth.capacity <= 0 or bandwidth.period_s <= 0:
            raise ValueError(f"expected capacity:seconds with positive integers, got {part!r} in {text!r}")
        buckets.append(bandwidth)
    return tuple(buckets)


def format_limit(limit: Limit) -> str | None:
    """The ThingsBoard string for a limit (what ``getSessionLimits`` reports), ``None`` for no limit."""
    return ",".join(str(b) for b in limit) or None


@dataclass(frozen=True, slots=True)
class LimitExceeded:
    """Why a message was refused, and how long until the device may send it again."""

    limit: str  # "messages", "telemetry_messages" or "telemetry_data_points"
    spec: str  # the limit as configured, e.g. "20:1,600:60"
    retry_after_s: float  # until this very message would pass; ``math.inf``: never (see ``passable``)

    @property
    def passable(self) -> bool:
        """False for a message that needs more tokens than a bucket holds: no wait lets it through."""
        return self.retry_after_s != math.inf


# the error of a 413 / 4.13 for a message no wait lets through (LimitExceeded.passable): the device must split it
NEVER_PASSES = "rate_limited: more data points than the rate limit allows in one message"
SWEEP_PER_CALL = 64  # idle devices forgotten per call at most: every one goes once, and no call pays for many
LIMIT_NAMES = ("messages", "telemetry_messages", "telemetry_data_points")  # in DeviceLimiter.limits order


class DeviceLimiter:
    """Every device's buckets for the three limits; ``try_acquire`` once per device message."""

    def __init__(
        self,
        messages: Limit = (),
        telemetry_messages: Limit = (),
        telemetry_data_points: Limit = (),
        *,
        max_devices: int = 1_000_000,
    ) -> None:
        self.limits: tuple[Limit, Limit, Limit] = (messages, telemetry_messages, telemetry_data_points)
        self._buckets: list[Bandwidth] = [b for limit in self.limits for b in limit]
        self._kind: list[int] = [kind for kind, limit in enumerate(self.limits) for _ in limit]
        self._refill = [(float(b.capacity), b.rate) for b in self._buckets]
        self._full = array("d", [0.0, *(float(b.capacity) for b in self._buckets)])
        self._idle_s = max((b.period_s for b in self._buckets), default=0)
        self._max_devices = max_devices
        self._states: OrderedDict[str, array[float]] = OrderedDict()

    def __len__(self) -> int:
        """Devices whose buckets are remembered (the rest are all full)."""
        return len(self._states)

    def try_acquire(self, key: str, now: float, data_points: int | None = None) -> LimitExceeded | None:
        """Take the tokens for one message (``data_points`` is given for telemetry only); ``None`` = allowed."""
        state = self._refilled(key, now)
        needs = (1, 1 if data_points is not None else 0, data_points or 0)
        allowed = True
        for i, kind in enumerate(self._kind, 1):
            if state[i] < needs[kind]:
                allowed = False
                break
        if allowed:
            for i, kind in enumerate(self._kind, 1):
                state[i] -= needs[kind]
        self._sweep(now)
        return None if allowed else self._refusal(state, needs)

    def wait_s(self, key: str, now: float) -> float:
        """Seconds until one more message of one data point would pass; 0 when it would pass now. The wait
        for a message that was refused is its ``LimitExceeded.retry_after_s``, which counts its data points."""
        state = self._states.get(key)
        if state is None:
            return 0.0
        elapsed = max(0.0, now - state[0])
        waits = ((1 - min(b.capacity, state[i + 1] + elapsed * b.rate)) / b.rate for i, b in enumerate(self._buckets))
        return max(0.0, max(waits, default=0.0))

    def _refilled(self, key: str, now: float) -> array[float]:
        states = self._states
        state = states.get(key)
        if state is None:
            state = states[key] = array("d", self._full)
            state[0] = now
            return state
        states.move_to_end(key)
        elapsed = now - state[0]
        if elapsed > 0:
            state[0] = now
            for i, (capacity, rate) in enumerate(self._refill, 1):
                state[i] = min(capacity, state[i] + elapsed * rate)
        return state

    def _refusal(self, state: array[float], needs: Sequence[int]) -> LimitExceeded:
        """Name the first limit that is short; wait for the slowest short bucket, so the refused message
        itself passes after the wait (a need above a bucket's capacity can never pass: ``math.inf``)."""
        first: int | None = None
        wait = 0.0
        for i, bucket in enumerate(self._buckets):
            need = needs[self._kind[i]]
            if not need or state[i + 1] >= need:
                continue
            first = self._kind[i] if first is None else first
            short = need - state[i + 1]
            wait = max(wait, math.inf if need > bucket.capacity else short / bucket.rate)
        assert first is not None
        return LimitExceeded(LIMIT_NAMES[first], format_limit(self.limits[first]) or "", wait)

    def _sweep(self, now: float) -> None:
        """Forget devices whose buckets are all full again (oldest first), and any beyond the hard cap."""
        states = self._states
        while len(states) > self._max_devices:
            states.popitem(last=False)
        for _ in range(SWEEP_PER_CALL):
            if not states:
                return
            key, oldest = next(iter(states.items()))
            if now - oldest[0] < self._idle_s:
                return
            del states[key]


def ceil_seconds(wait_s: float) -> int:
    """A wait as whole seconds for Retry-After / Max-Age: at least 1, never rounding down to a premature retry.
    Finite waits only: a message that can never pass (``LimitExceeded.passable``) gets no Retry-After."""
    return max(1, math.ceil(wait_s))


def configured(settings: Settings) -> DeviceLimiter | None:
    """The limiter the settings ask for, or ``None`` (RATE_LIMIT_ENABLED=false, the seed's default).

    When enabled, the messages limit is RATE_LIMIT_DEVICE_MESSAGES, else the seed's
    RATE_LIMIT_REQUESTS_PER_SECOND as ``"N:1"``.
    """
    if not settings.rate_limit_enabled:
        return None
    messages = settings.rate_limit_device_messages or f"{settings.rate_limit_requests_per_second}:1"
    return DeviceLimiter(
        parse_limit(messages),
        parse_limit(settings.rate_limit_device_telemetry_messages or ""),
        parse_limit(settings.rate_limit_device_telemetry_data_points or ""),
        max_devices=settings.rate_limit_max_devices,
    )
