"""The embedded store's on-disk form: an append-only log of preallocated segments (DATA_DIR/messages/).

Why not SQLite: an fsynced SQLite commit writes the WAL frames, grows the WAL and syncs; an append into a
preallocated file is one ``pwrite`` and one ``fdatasync`` with no metadata to grow, so the durable-write
latency that bounds HTTP / CoAP throughput is lower (figures in docs/pipeline.md, "The local store").

Layout:

- ``<first seq, 20 digits>.log`` segments, preallocated with ``posix_fallocate`` (``SEGMENT_BYTES``; larger
  only for a single entry that would not fit), so unwritten space reads as zeros. Writers also zero the
  space ahead of the tail, ``ZERO_AHEAD`` at a time: a preallocated extent is only reserved ("unwritten"
  on ext4 and XFS), and the first write into it changes its state, metadata that makes that ``fdatasync``
  commit the filesystem journal. Zeroed ahead, a sync of appended data is a data flush alone: on ext4 it
  took about a third of the time and CPU (docs/pipeline.md, "The local store"). The one append that
  zeroes pays a journal commit and the flush of the zeros: ``ZERO_AHEAD`` is sized for that sync's latency.
- Each entry: header ``[u32 length][u32 crc][u64 seq]`` (little-endian) then ``length`` payload bytes, the
  record as orjson of its documented dict (docs/records.md, without ``seq``: the seq is in the header,
  assigned under the writers' lock, while payloads are encoded before it). Seqs are consecutive from 1.
- ``crc`` is CRC32 over ``[length][seq]`` and the payload, seeded with the previous entry's crc (0 at the
  start of a segment). The chaining means a stale entry left behind a torn write can never pass as the
  successor of a newer entry written over the tear.
- A full segment ends with a seal, ``length = 0xFFFFFFFF``, whose ``seq`` is the next segment's first seq;
  a new segment is created only after its predecessor's seal is durable (then the file and the directory
  are fsynced).
- An all-zero header is the tail. A payload length must be below 2**24: its high byte is zero, which JSON
  never contains, so no payload can hold something that passes for a header.

Durability: ``append`` returns once ``fdatasync`` returned, so what was acknowledged survives ``kill -9``
and power loss. After a crash the tail is the first entry that is all zeros, torn, fails its crc or breaks
the seq chain; whatever follows is never read and is overwritten by the next append (a torn entry was
never acknowledged). An entry whose write failed may still survive complete: it was not acknowledged, so a
device resends it (a duplicate, never a loss).

Retention: whole sealed segments go, oldest first, while the log is above ``max_bytes`` or once their last
write is older than ``max_age_s``; never the newest segment, where appends go. A writer checks after each
roll-over and whenever ``enforce_retention`` is called, under the lock. A reader that was inside a removed
segment goes on from the oldest one left: its seqs jump, nothing is read twice.

Several writers (``WORKERS=N``) share the log: each append holds ``flock`` on ``lock`` and first moves its
cursor over entries the others appended (one 16-byte ``pread`` when there are none). Readers take no lock:
they read entries in order and stop cleanly at the tail, so they work beside running writers.
"""

from __future__ import annotations

import dataclasses
import enum
import fcntl
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

try:  # framing and the durable write in C (src/tb_gateway/_speedups.c): the writer thread gives up the GIL once a batch
    from tb_gateway import _speedups
except ImportError:  # pragma: no cover - built without a C compiler: frame() below does the same
    _speedups = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

HEADER = struct.Struct("<IIQ")  # payload length, chained crc32, seq
_CRC_FIELDS = struct.Struct("<IQ")  # what the crc covers before the payload: length, seq
ZERO_HEADER = bytes(HEADER.size)
SEAL = 0xFFFFFFFF
MAX_PAYLOAD = (1 << 24) - 1  # a record is at most MAX_PAYLOAD_SIZE (64 KiB) of JSON; longer is corruption
SEGMENT_BYTES = 64 * 1024 * 1024  # few files and rare roll-overs; unwritten space costs no disk writes
READ_CHUNK = 1024 * 1024  # a reader's pread size: many entries per system call
# zeroed in one write, with the append that reached it: one journal commit per 256 KiB, and that append's
# fdatasync flushes the zeros too. 1 MiB made that sync the p99 (MQTT open loop at 135k msg/s: p99 8-9 ms;
# 4 MiB 22-28 ms; 256 KiB 4.1-6.2 ms; 64 KiB 5.0-5.1 ms with a higher p50: more journal commits)
ZERO_AHEAD = 256 * 1024
SUFFIX = ".log"


class Stop(enum.Enum):
    """Why a scan of a segment stopped."""

    TAIL = "tail"  # an all-zero header: room to append here
    SEALED = "sealed"  # the segment is full; the log goes on in the next one
    TORN = "torn"  # garbage, a bad crc or a broken seq chain: the tail, left by a crashed writer
    END = "end"  # the file ends (truncated): no room for even a header


@dataclass(slots=True)
class Cursor:
    """A position in one segment: the offset of the next entry, its seq and the crc it chains from."""

    offset: int
    seq: int
    crc: int = 0
    stop: Stop = Stop.TAIL


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SUFFIX}"


def segments(directory: Path) -> list[tuple[int, Path]]:
    """The segments as (first seq, path), in order; an absent directory has none."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = [
        (int(n[: -len(SUFFIX)]), directory / n) for n in names if n.endswith(SUFFIX) and n[: -len(SUFFIX)].isdigit()
    ]
    return sorted(found)


def _crc(prev: int, length: int, seq: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(_CRC_FIELDS.pack(length, seq), prev))


def frame(cursor: Cursor, payload: bytes) -> bytes:
    """The entry for ``payload`` at ``cursor``, which moves past it."""
    crc = _crc(cursor.crc, len(payload), cursor.seq, payload)
    entry = HEADER.pack(len(payload), crc, cursor.seq) + payload
    cursor.offset += len(entry)
    cursor.seq += 1
    cursor.crc = crc
    return entry


def seal(cursor: Cursor) -> bytes:
    crc = _crc(cursor.crc, SEAL, cursor.seq, b"")
    return HEADER.pack(SEAL, crc, cursor.seq)


def read_entries(fd: int, cursor: Cursor, size: int, chunk: int = READ_CHUNK) -> Iterator[tuple[int, bytes]]:
    """Entries (seq, payload) from ``cursor`` on, which follows them; ``cursor.stop`` says why it ended."""
    buf, base = b"", cursor.offset  # buf holds the file's bytes [base, base + len(buf))
    while True:
        at = cursor.offset - base
        if at + HEADER.size > len(buf):
            buf, base, at = os.pread(fd, min(chunk, size - cursor.offset), cursor.offset), cursor.offset, 0
            if len(buf) < HEADER.size:
                cursor.stop = Stop.END
                return
        length, crc, seq = HEADER.unpack_from(buf, at)
        if length == SEAL:
            good = seq == cursor.seq and crc == _crc(cursor.crc, SEAL, seq, b"")
            cursor.stop = Stop.SEALED if good else Stop.TORN
            return
        if length > MAX_PAYLOAD or seq != cursor.seq:
            cursor.stop = Stop.TAIL if buf[at : at + HEADER.size] == ZERO_HEADER else Stop.TORN
            return
        end = at + HEADER.size + length
        if end > len(buf):
            buf, base, at = os.pread(fd, HEADER.size + length + chunk, cursor.offset), cursor.offset, 0
            end = HEADER.size + length
            if len(buf) < end:
                cursor.stop = Stop.TORN
                return
        payload = buf[at + HEADER.size : end]
        if crc != _crc(cursor.crc, length, seq, payload):
            cursor.stop = Stop.TORN
            return
        cursor.offset += HEADER.size + length
        cursor.seq += 1
        cursor.crc = crc
        yield seq, payload


def read_log(directory: Path, after_seq: int = 0) -> Iterator[tuple[int, bytes]]:
    """Every entry with a seq above ``after_seq``, in order, up to the current tail; needs no lock.

    Whole segments before ``after_seq`` are skipped by their names, and a reader that asks again for what
    follows (``messages --follow``) resumes where its last scan of that segment file ended: entries before
    the tail are never rewritten. A seal whose next segment is not listed yet (a writer is rolling over)
    makes it look again once. Segments that retention removed are skipped: the seqs jump.
    """
    listed = segments(directory)
    start = max((i for i, (first, _) in enumerate(listed) if first <= after_seq + 1), default=0)
    listed = listed[start:]
    while listed:
        first, path = listed.pop(0)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        stat = os.fstat(fd)
        # the first seq too: a segment that retention removed frees its inode for a newer segment
        file = (stat.st_dev, stat.st_ino, first)
        known, cursor = _resume.get(directory, (None, Cursor(0, first)))
        if known != file or cursor.seq - 1 > after_seq:
            cursor = Cursor(0, first)
        cursor = dataclasses.replace(cursor)
        try:
            for seq, payload in read_entries(fd, cursor, stat.st_size):
                if seq > after_seq:
                    yield seq, payload
        finally:
            os.close(fd)
            if len(_resume) >= 16:
                _resume.clear()
            _resume[directory] = (file, dataclasses.replace(cursor))
        if cursor.stop is not Stop.SEALED or cursor.seq <= first:
            return
        if not listed:
            listed = [s for s in segments(directory) if s[0] >= cursor.seq]
        if not listed:  # the next one is not created yet (a writer is rolling over): look again next time
            return
        # listed[0] starts at cursor.seq, or later when retention removed the segments in between


_resume: dict[Path, tuple[tuple[int, int, int] | None, Cursor]] = {}  # per log: the file and where its last scan ended


class SegmentWriter:
    """Appends batches of payloads durably; blocking I/O, meant for one thread of one process (others may
    append through their own writer: the lock orders them)."""

    def __init__(
        self,
        directory: Path,
        segment_bytes: int = SEGMENT_BYTES,
        *,
        max_bytes: int = 0,
        max_age_s: float = 0.0,
        on_removed: Callable[[str], object] = lambda reason: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes  # 0: no size cap
        self.max_age_s = max_age_s  # 0: no age limit
        self._on_removed = on_removed  # called with the reason ("size" or "age") of each removal
        self._clock = clock
        self._lock_fd: int | None = None
        self._fd: int | None = None  # the segment the cursor is in
        self._size = 0
        self._written = 0  # in the current segment, all below this offset is written (data or zeros)
        self._cursor = Cursor(0, 1)

    @property
    def is_open(self) -> bool:
        return self._lock_fd is not None

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        with self._locked():
            self._remove_old()  # first: entering the tail may need the room it frees (a disk that filled up)
            self._catch_up()

    def enforce_retention(self) -> int:
        """Remove the sealed segments the retention settings no longer keep; returns how many went."""
        if not (self.max_bytes or self.max_age_s) or not self.is_open:
            return 0
        with self._locked():
            removed = self._remove_old()  # before the catch-up, which may need the room (a full disk)
            self._catch_up()
            return removed

    def append(self, payloads: Sequence[bytes]) -> int:
        """Writes the entries and returns the first one's seq once they are durable. ``OSError``: not
        acknowledged (they may still survive); the next append re-reads the tail from disk."""
        if any(len(p) > MAX_PAYLOAD for p in payloads):
            raise ValueError(f"an entry is larger than {MAX_PAYLOAD} bytes")
        if _speedups is not None and self._fd is not None and type(payloads) is list:
            first = self._append_in_c(payloads)
            if first is not None:
                return first
        with self._locked():
            try:
                self._catch_up()
                first = self._cursor.seq
                self._write(payloads)
            except OSError:
                self._forget_position()
                raise
        return first

    def _append_in_c(self, payloads: list[bytes]) -> int | None:
        """The common case, with the GIL released once: everything fits the current segment and no other
        writer appended since our last write. None when it is not (nothing written): the locked path then
        catches up or rolls over and frames again."""
        assert _speedups is not None and self._fd is not None and self._lock_fd is not None
        cursor = self._cursor
        data, done, offset, seq, crc = _speedups.frame(
            payloads, 0, cursor.offset, cursor.seq, cursor.crc, self._size - HEADER.size
        )
        if done < len(payloads) or offset + HEADER.size > self._written:  # the locked path zeroes ahead first
            return None
        try:
            if not _speedups.append_durably(self._lock_fd, self._fd, data, cursor.offset):
                return None
        except OSError:
            self._forget_position()
            raise
        first = cursor.seq
        cursor.offset, cursor.seq, cursor.crc = offset, seq, crc
        return first

    def close(self) -> None:
        self._forget_position()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _locked(self) -> _Flock:
        assert self._lock_fd is not None, "open() first"
        return _Flock(self._lock_fd)

    def _write(self, payloads: Sequence[bytes]) -> None:
        i = 0
        while i < len(payloads):
            assert self._fd is not None
            cursor, room = self._cursor, self._size - HEADER.size  # a seal must always fit
            if cursor.offset == 0 and HEADER.size + len(payloads[i]) > room:  # one entry larger than a segment
                self._grow(2 * HEADER.size + len(payloads[i]))
                continue
            start, parts = cursor.offset, []
            if _speedups is not None and type(payloads) is list:  # one C call instead of a loop holding the GIL
                data, i, cursor.offset, cursor.seq, cursor.crc = _speedups.frame(
                    payloads, i, cursor.offset, cursor.seq, cursor.crc, room
                )
                parts.append(data)
            while i < len(payloads) and cursor.offset + HEADER.size + len(payloads[i]) <= room:
                parts.append(frame(cursor, payloads[i]))
                i += 1
            if i < len(payloads):
                parts.append(seal(cursor))
            _pwrite_all(self._fd, b"".join(parts), start)
            if i == len(payloads):  # not behind a seal: the cursor is still at it and the segment is done
                self._zero_ahead(cursor.offset)
            os.fdatasync(self._fd)
            if i < len(payloads):
                self._enter(cursor.seq, create=True)

    def _zero_ahead(self, end: int) -> None:
        """Under the lock, with the cursor at the tail and ``end`` past it: zeroes the next ``ZERO_AHEAD``
        bytes after ``end`` (past what an earlier call zeroed) so that later appends there sync no metadata.
        Safe with other writers: nothing acknowledged lies beyond the tail."""
        assert self._fd is not None
        if end + HEADER.size <= self._written:
            return
        start, stop = max(self._written, end), min(self._size, end + ZERO_AHEAD)
        if stop > start:
            _pwrite_all(self._fd, bytes(stop - start), start)
        self._written = max(self._written, stop)

    def _catch_up(self) -> None:
        """Moves the cursor to the true tail: past what other writers appended, over what crashed ones tore."""
        if self._fd is None:
            listed = segments(self.directory)
            first = listed[-1][0] if listed else 1
            self._enter(first, create=not listed)
        elif os.pread(self._fd, HEADER.size, self._cursor.offset) == ZERO_HEADER:
            return  # nobody appended since our last write: the common case
        while True:
            assert self._fd is not None
            for _ in read_entries(self._fd, self._cursor, self._size):
                pass
            stop = self._cursor.stop
            if stop is Stop.SEALED:
                # Retention may have removed the next segments while this writer was idle: go on in the newest
                # one (all before it are sealed); create the next only when none exists yet.
                following = [first for first, _ in segments(self.directory) if first >= self._cursor.seq]
                self._enter(following[-1] if following else self._cursor.seq, create=not following)
            elif stop is Stop.END:  # a truncated file: give it its room back
                self._grow(max(self.segment_bytes, self._cursor.offset + 2 * HEADER.size))
            else:
                if stop is Stop.TORN:
                    log.warning("embedded store: cut off a torn entry at seq %d (never acknowledged)", self._cursor.seq)
                    self._zero_tail(self._cursor.offset)
                    os.fdatasync(self._fd)
                return

    def _zero_tail(self, offset: int) -> None:
        """Zero what a crashed writer left from ``offset`` on, up to the first chunk that is zeros already
        (unwritten space): zeroing only the torn header left the rest of the torn batch behind the next
        append, found torn again, and cut off and logged once per append."""
        assert self._fd is not None
        while offset < self._size:
            chunk = os.pread(self._fd, min(READ_CHUNK, self._size - offset), offset)
            if not chunk or not any(chunk):
                return
            _pwrite_all(self._fd, bytes(len(chunk)), offset)
            offset += len(chunk)

    def _enter(self, first_seq: int, *, create: bool) -> None:
        """Makes ``first_seq``'s segment current (created and preallocated if missing), cursor at its start.

        A new segment's directory entry is made durable before it is preallocated, and retention runs in
        between: the sealed segment before it is no longer the newest, so a size cap can free its room first
        (on a disk too small for two segments, allocating before removing failed for good). The file and the
        directory are synced even when the file exists: a writer that crashed while rolling over may have
        left it without a durable directory entry (rare: at start-up and roll-over only)."""
        self._forget_position()
        fd = os.open(self.directory / segment_name(first_seq), os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
        self._fd, self._size, self._cursor = fd, os.fstat(fd).st_size, Cursor(0, first_seq)
        self._written = 0  # unknown beyond the tail: zeroed again once, which is harmless
        if create:
            _fsync_directory(self.directory)
            self._remove_old()
        if self._size < self.segment_bytes:
            os.posix_fallocate(fd, 0, self.segment_bytes)
            self._size = os.fstat(fd).st_size
        os.fsync(fd)
        if not create:
            _fsync_directory(self.directory)

    def _remove_old(self) -> int:
        """Under the lock: oldest first, every sealed segment beyond the size cap or past the age limit."""
        if not (self.max_bytes or self.max_age_s):
            return 0
        sized = []
        for first, path in segments(self.directory)[:-1]:  # the newest one is where appends go
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            sized.append((first, path, stat.st_size, stat.st_mtime))
        total = sum(size for _, _, size, _ in sized)
        if self._fd is not None:
            total += max(self._size, self.segment_bytes)  # a new segment is counted at the size it is about to take
        now, removed = self._clock(), 0
        for first, path, size, written_at in sized:
            if self.max_bytes and total > self.max_bytes:
                reason = "size"
            elif self.max_age_s and now - written_at > self.max_age_s:
                reason = "age"
            else:
                break  # the rest are newer
            path.unlink(missing_ok=True)  # another worker may have removed it first
            total -= size
            removed += 1
            log.info("embedded store: removed segment %s (seq %d on) by its %s limit", path.name, first, reason)
            self._on_removed(reason)
        if removed:
            _fsync_directory(self.directory)
        return removed

    def _grow(self, size: int) -> None:
        assert self._fd is not None
        os.posix_fallocate(self._fd, 0, size)
        os.fsync(self._fd)
        self._size = os.fstat(self._fd).st_size

    def _forget_position(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _Flock:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
