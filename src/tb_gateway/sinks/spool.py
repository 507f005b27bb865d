"""An append-only, fsynced, size-capped log of records that a backend could not take yet.

Why a segment log and not SQLite: both are bounded by one fsync per appended batch, but the log appended
100-record batches in 0.27 ms against 0.43 ms for SQLite in WAL mode with ``synchronous=FULL`` on this
machine, removing replayed records is unlinking whole files (SQLite needs a DELETE, another fsync and a
file that never shrinks), and the size cap is exact bytes on disk.

Layout of the spool directory (docs/kafka-records.md, "Spool"):

- ``<20-digit number>.seg`` segments, each a run of entries ``[u32 length][u32 crc32][payload]``
  (little-endian); the payload is the record as a JSON array (``encode_record``). A new segment starts when
  the current one passes ``segment_bytes``.
- ``head``: where replay resumes, ``[u64 segment][u64 offset][u32 crc32]``, replaced atomically (write,
  fsync, rename) after every replayed chunk.

Crash safety: ``append`` returns only after ``fsync``, so an acknowledged record survives ``kill -9`` and
power loss. A crash in the middle of an append leaves a torn last entry; ``open`` finds it by length and CRC
and cuts the segment there (those records were never acknowledged). A crash between sending a chunk and
moving ``head`` re-sends that chunk after restart: a duplicate, never a loss.

This module does blocking file I/O; the asyncio wrapper (``reliable.SpoolingSink``) calls it from a thread.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from tb_gateway.records import DeviceIdentity, Record, RecordKind, Transport

log = logging.getLogger(__name__)

ENTRY_HEADER = struct.Struct("<II")  # payload length, crc32 of the payload
HEAD = struct.Struct("<QQI")  # segment number, offset, crc32 of the first 16 bytes
SEGMENT_BYTES = 16 * 1024 * 1024  # small enough that a replayed segment is freed soon, big enough for few files
MAX_ENTRY_BYTES = 64 * 1024 * 1024  # a length above this is corruption, not a record
FORMAT_VERSION = 1


def encode_record(record: Record) -> bytes:
    """The spool's own compact form; keeps the token, which the ThingsBoard HTTP backend needs on replay."""
    d = record.device
    return orjson.dumps(
        [
            FORMAT_VERSION,
            d.id,
            d.name,
            d.type,
            d.token,
            record.kind.value,
            record.ts,
            record.values,
            record.transport.value,
            record.received_at,
        ]
    )


def decode_record(payload: bytes) -> Record:
    version, dev_id, name, dev_type, token, kind, ts, values, transport, received_at = orjson.loads(payload)
    if version != FORMAT_VERSION:
        raise ValueError(f"spool entry format {version} is not {FORMAT_VERSION}")
    return Record(
        device=DeviceIdentity(id=dev_id, name=name, type=dev_type, token=token),
        kind=RecordKind(kind),
        ts=ts,
        values=values,
        transport=Transport(transport),
        received_at=received_at,
    )


@dataclass(frozen=True, slots=True)
class Position:
    segment: int
    offset: int


@dataclass(frozen=True, slots=True)
class Spooled:
    """A record read back from the spool and the position just after it (what ``commit`` takes)."""

    record: Record
    end: Position


class Spool:
    """The log itself. Not thread-safe: the caller serializes every call."""

    def __init__(self, directory: Path, max_bytes: int, *, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.records = 0
        self.bytes = 0  # entry bytes between head and tail: what the cap counts
        self.devices: Counter[str] = Counter()  # device id -> records of it waiting in the spool
        self.oldest_received_at: int | None = None
        self._segments: list[int] = []
        self._head = Position(1, 0)
        self._read = Position(1, 0)  # where the next read starts (>= head: read but not yet committed)
        self._tail_fd = -1
        self._tail_size = 0

    # --- opening and recovery ---

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._segments = sorted(int(p.stem) for p in self.directory.glob("*.seg") if p.stem.isdigit())
        self._head = self._load_head()
        for number in [n for n in self._segments if n < self._head.segment]:
            self._path(number).unlink(missing_ok=True)  # fully replayed before a crash
        self._segments = [n for n in self._segments if n >= self._head.segment]
        if not self._segments:
            self._segments = [max(self._head.segment, 1)]
            self._head = Position(self._segments[0], 0)
        for number in self._segments:
            start = self._head.offset if number == self._head.segment else 0
            self._scan(number, start, is_last=number == self._segments[-1])
        self._read = self._head
        tail = self._segments[-1]
        self._tail_fd = os.open(self._path(tail), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._tail_size = os.fstat(self._tail_fd).st_size
        self._fsync_dir()
        self._refresh_oldest()
        if self.records:
            log.info("spool %s holds %d records (%d bytes) to replay", self.directory, self.records, self.bytes)

    def _scan(self, number: int, start: int, *, is_last: bool) -> None:
        """Count the valid entries of a segment; cut it at the first torn or corrupt entry."""
        path = self._path(number)
        data = path.read_bytes() if path.exists() else b""
        offset = start
        if start > len(data):
            log.error("spool %s: head is past the end of the segment; replaying it whole", path)
            self._head = Position(number, 0)
            start = 0
        for entry_end, payload in _entries(data, start):
            try:
                record = _peek(payload)
            except ValueError:
                break
            self.records += 1
            self.bytes += entry_end - offset
            self.devices[record[0]] += 1
            offset = entry_end
        if offset < len(data):
            what = "torn last entry" if is_last else "corrupt entry"
            log.warning("spool %s: %s at byte %d; cutting %d bytes", path, what, offset, len(data) - offset)
            with open(path, "r+b") as f:
                f.truncate(offset)
                os.fsync(f.fileno())

    def _load_head(self) -> Position:
        try:
            raw = (self.directory / "head").read_bytes()
        except FileNotFoundError:
            return Position(self._segments[0] if self._segments else 1, 0)
        if len(raw) != HEAD.size or zlib.crc32(raw[:16]) != HEAD.unpack(raw)[2]:
            # The head file is written atomically, so this is disk corruption: replaying from the start
            # of the oldest segment duplicates records but loses none.
            log.error("spool %s: head file is damaged; replaying from the oldest segment", self.directory)
            return Position(self._segments[0] if self._segments else 1, 0)
        segment, offset, _ = HEAD.unpack(raw)
        return Position(segment, offset)

    # --- appending ---

    def append(self, records: Sequence[Record]) -> bool:
        """Write and fsync all of ``records``, or none of them when they would pass the cap (False)."""
        if not records:
            return True
        payloads = [encode_record(r) for r in records]
        blob = b"".join(ENTRY_HEADER.pack(len(p), zlib.crc32(p)) + p for p in payloads)
        if self.bytes + len(blob) > self.max_bytes:
            return False
        if self._tail_size >= self.segment_bytes:
            self._roll()
        os.write(self._tail_fd, blob)
        os.fsync(self._tail_fd)
        self._tail_size += len(blob)
        was_empty = self.records == 0
        self.records += len(records)
        self.bytes += len(blob)
        for record in records:
            self.devices[record.device.id] += 1
        if was_empty:
            self.oldest_received_at = records[0].received_at
        return True

    def _roll(self) -> None:
        os.close(self._tail_fd)
        number = self._segments[-1] + 1
        self._segments.append(number)
        self._tail_fd = os.open(self._path(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._tail_size = 0
        self._fsync_dir()

    # --- reading back and committing ---

    def read(self, max_records: int) -> list[Spooled]:
        """The next records after the last read (not yet committed), oldest first."""
        out: list[Spooled] = []
        position = self._read
        while len(out) < max_records:
            position = self._read_segment(position, max_records - len(out), out)
            later = [n for n in self._segments if n > position.segment]
            if len(out) >= max_records or not later or position.offset < self._size(position.segment):
                break
            position = Position(later[0], 0)
        self._read = position
        return out

    def _read_segment(self, position: Position, limit: int, out: list[Spooled]) -> Position:
        path = self._path(position.segment)
        if not path.exists():
            return position
        offset = position.offset
        with open(path, "rb") as f:
            f.seek(offset)
            for _ in range(limit):
                header = f.read(ENTRY_HEADER.size)
                if len(header) < ENTRY_HEADER.size:
                    break
                length, crc = ENTRY_HEADER.unpack(header)
                payload = f.read(length)
                if len(payload) < length or zlib.crc32(payload) != crc:
                    break  # cannot happen after open() cut the segment; stop rather than guess
                offset += ENTRY_HEADER.size + length
                out.append(Spooled(decode_record(payload), Position(position.segment, offset)))
        return Position(position.segment, offset)

    def _size(self, number: int) -> int:
        path = self._path(number)
        return path.stat().st_size if path.exists() else 0

    def rewind(self) -> None:
        """Read again from the committed head (after a failed send)."""
        self._read = self._head

    def commit(self, done: Sequence[Spooled]) -> None:
        """Forget ``done`` (a prefix of what was read): they reached the backend or it refused them for good."""
        if not done:
            return
        end = done[-1].end
        removed = 0
        head = self._head
        for item in done:
            if item.end.segment != head.segment:
                head = Position(item.end.segment, 0)
            removed += item.end.offset - head.offset
            head = item.end
            device = item.record.device.id
            self.devices[device] -= 1
            if self.devices[device] <= 0:
                del self.devices[device]
        self.records -= len(done)
        self.bytes -= removed
        self._head = end
        self._write_head(end)
        for number in [n for n in self._segments if n < end.segment]:
            self._path(number).unlink(missing_ok=True)
        self._segments = [n for n in self._segments if n >= end.segment]
        if self.records == 0:
            self._reset_when_empty()
        self._refresh_oldest()

    def _reset_when_empty(self) -> None:
        """Empty spool: start the tail segment over, so an idle spool takes no disk."""
        if self._head.segment == self._segments[-1] and self._head.offset == self._tail_size:
            # Head first: a crash between the two steps replays old entries again (duplicates), whereas
            # the other order could leave head beyond the end of a segment that then grows again.
            self._head = self._read = Position(self._segments[-1], 0)
            self._write_head(self._head)
            os.ftruncate(self._tail_fd, 0)
            os.fsync(self._tail_fd)
            self._tail_size = 0

    def _write_head(self, position: Position) -> None:
        first = struct.pack("<QQ", position.segment, position.offset)
        tmp = self.directory / "head.tmp"
        with open(tmp, "wb") as f:
            f.write(first + struct.pack("<I", zlib.crc32(first)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / "head")
        self._fsync_dir()

    def _refresh_oldest(self) -> None:
        if self.records == 0:
            self.oldest_received_at = None
            return
        saved = self._read
        self._read = self._head
        first = self.read(1)
        self._read = saved
        self.oldest_received_at = first[0].record.received_at if first else None

    # --- status and closing ---

    def stats(self, now_ms: int) -> dict[str, Any]:
        age = (now_ms - self.oldest_received_at) / 1000 if self.oldest_received_at is not None else 0.0
        return {
            "records": self.records,
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "oldest_age_seconds": max(age, 0.0),
            "devices": len(self.devices),
        }

    def close(self) -> None:
        if self._tail_fd >= 0:
            os.close(self._tail_fd)
            self._tail_fd = -1

    def _path(self, number: int) -> Path:
        return self.directory / f"{number:020d}.seg"

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _entries(data: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    """Yield ``(end offset, payload)`` for each whole, intact entry from ``offset``; stop at the first bad one."""
    size = len(data)
    while offset + ENTRY_HEADER.size <= size:
        length, crc = ENTRY_HEADER.unpack_from(data, offset)
        start = offset + ENTRY_HEADER.size
        end = start + length
        if length > MAX_ENTRY_BYTES or end > size:
            return
        payload = data[start:end]
        if zlib.crc32(payload) != crc:
            return
        yield end, payload
        offset = end


def _peek(payload: bytes) -> tuple[str, int]:
    """Device id and received_at of an entry, checking its shape."""
    fields = orjson.loads(payload)
    if not isinstance(fields, list) or len(fields) != 10 or fields[0] != FORMAT_VERSION:
        raise ValueError("not a spool entry")
    return str(fields[1]), int(fields[9])
