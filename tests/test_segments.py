"""The embedded store's segment log: torn tails, roll-over, readers beside writers, crashes at any point."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tb_gateway.sinks import segments
from tb_gateway.sinks.segments import HEADER, SegmentWriter, read_log


def payloads(batch: int, sizes: list[int]) -> list[bytes]:
    return [orjson.dumps({"b": batch, "i": i, "pad": "x" * size}) for i, size in enumerate(sizes)]


def written(directory: Path, batches: list[list[bytes]], segment_bytes: int = 1 << 20) -> SegmentWriter:
    writer = SegmentWriter(directory, segment_bytes)
    writer.open()
    for batch in batches:
        writer.append(batch)
    return writer


def entries(directory: Path, after_seq: int = 0) -> list[bytes]:
    got = list(read_log(directory, after_seq))
    assert [seq for seq, _ in got] == list(range(after_seq + 1, after_seq + 1 + len(got)))  # consecutive
    return [payload for _, payload in got]


def only_segment(directory: Path) -> Path:
    [segment] = sorted(directory.glob("*.log"))
    return segment


def test_a_new_log_is_one_preallocated_segment_and_reads_back_in_order(tmp_path: Path) -> None:
    first, second = payloads(0, [1, 2, 3]), payloads(1, [40])
    writer = written(tmp_path, [first, second], segment_bytes=8192)
    assert writer.append(payloads(2, [5])) == 5  # the first seq of the batch
    writer.close()
    segment = only_segment(tmp_path)
    assert segment.name == "00000000000000000001.log" and segment.stat().st_size == 8192
    assert entries(tmp_path) == first + second + payloads(2, [5])
    assert entries(tmp_path, after_seq=3) == second + payloads(2, [5])
    assert entries(tmp_path, after_seq=5) == []
    assert list(read_log(tmp_path / "absent")) == []


@pytest.mark.parametrize(
    "damage",
    ["truncate-inside-last-entry", "garble-last-payload", "garble-last-header", "zero-last-crc", "cut-file-at-tail"],
)
def test_a_torn_last_entry_is_cut_off_and_the_log_goes_on(tmp_path: Path, damage: str) -> None:
    kept, torn = payloads(0, [10, 20]), payloads(1, [30])
    written(tmp_path, [kept, torn]).close()
    segment = only_segment(tmp_path)
    last = sum(HEADER.size + len(p) for p in kept)  # offset of the torn entry
    with segment.open("r+b") as f:
        if damage == "truncate-inside-last-entry":
            f.truncate(last + HEADER.size + 5)
        elif damage == "garble-last-payload":
            f.seek(last + HEADER.size + 7)
            f.write(b"#")
        elif damage == "garble-last-header":
            f.seek(last + 8)
            f.write(b"\xff")  # its seq
        elif damage == "zero-last-crc":
            f.seek(last + 4)
            f.write(bytes(4))
        else:
            f.truncate(last + 3)  # not even a header fits
    assert entries(tmp_path) == kept  # a reader stops cleanly at the tear
    writer = written(tmp_path, [payloads(2, [1, 2])])
    assert writer.append(payloads(3, [3])) == 5
    writer.close()
    assert entries(tmp_path) == kept + payloads(2, [1, 2]) + payloads(3, [3])
    assert only_segment(tmp_path).stat().st_size == 1 << 20  # a truncated segment got its room back


def test_a_torn_batch_is_cut_off_once_not_at_every_append(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A crashed writer's tail longer than one header (a batch half on disk): all of it is zeroed, so the
    appends after the cut take the fast path and nothing is cut off or logged again."""
    kept = payloads(0, [10, 20])
    written(tmp_path, [kept, payloads(1, [300, 300, 300])]).close()
    last = sum(HEADER.size + len(p) for p in kept)
    with only_segment(tmp_path).open("r+b") as f:
        f.seek(last + 8)
        f.write(b"\xff")  # the first entry of the last batch torn, the rest of it still on disk
    writer = written(tmp_path, [])
    appended = []
    for b in range(30):
        batch = payloads(10 + b, [5])
        writer.append(batch)
        appended += batch
    writer.close()
    assert entries(tmp_path) == kept + appended
    assert caplog.text.count("cut off a torn entry") == 1


def test_a_stale_entry_behind_an_overwritten_tear_is_never_read(tmp_path: Path) -> None:
    """Power loss can write an unsynced batch's later sectors but not an earlier one; a new entry of the same
    size over the tear must not make the stale one after it readable (the crc chains entries)."""
    batch = payloads(0, [10, 10, 10])
    written(tmp_path, [batch]).close()
    second = HEADER.size + len(batch[0])
    with only_segment(tmp_path).open("r+b") as f:
        f.seek(second + HEADER.size + 3)
        f.write(b"#")  # entry 2 torn, entry 3 intact on disk
    assert entries(tmp_path) == batch[:1]
    again = payloads(9, [10])  # same length and seq as the torn entry 2
    assert len(again[0]) == len(batch[1])
    written(tmp_path, [again]).close()
    assert entries(tmp_path) == batch[:1] + again  # not the stale entry 3


def test_bad_files_and_bad_headers_stop_the_reader_without_errors(tmp_path: Path) -> None:
    written(tmp_path, [payloads(0, [1, 2])]).close()
    (tmp_path / "notes.txt").write_text("not a segment")
    (tmp_path / "x.log").write_text("not numbered")
    assert entries(tmp_path) == payloads(0, [1, 2])
    segment = tmp_path / segments.segment_name(1)
    with segment.open("r+b") as f:
        f.write(HEADER.pack(segments.MAX_PAYLOAD + 1, 0, 1))  # an impossible length on the first entry
    assert entries(tmp_path) == []
    segment.write_bytes(b"")  # an empty file
    assert entries(tmp_path) == []


def test_full_segments_roll_over_with_the_directory_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced_directories: list[str] = []
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            synced_directories.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(segments.os, "fsync", recording_fsync)
    batches = [payloads(b, [30 * (b % 4), 5, 70]) for b in range(40)]
    writer = written(tmp_path, batches[:-1], segment_bytes=1024)
    big = payloads(99, [3000])  # one entry larger than a segment gets a segment of its own size
    writer.append(big + batches[-1])
    writer.close()
    names = sorted(p.name for p in tmp_path.glob("*.log"))
    assert len(names) > 10
    firsts = [int(n[:20]) for n in names]
    assert firsts[0] == 1 and firsts == sorted(set(firsts))
    assert synced_directories.count(str(tmp_path)) == len(names)  # each new file's entry made durable
    everything = [p for batch in batches[:-1] for p in batch] + big + batches[-1]
    assert entries(tmp_path) == everything
    for after in (0, 1, firsts[3] - 1, firsts[3], firsts[-1], len(everything) - 1, len(everything)):
        assert entries(tmp_path, after_seq=after) == everything[after:]
    assert max(p.stat().st_size for p in tmp_path.glob("*.log")) > 3000
    reopened = written(tmp_path, [payloads(100, [1])], segment_bytes=1024)
    reopened.close()
    assert entries(tmp_path) == everything + payloads(100, [1])


def test_a_reader_beside_a_writer_sees_a_growing_consistent_prefix(tmp_path: Path) -> None:
    batches = [payloads(b, [b % 50, 3 * (b % 7)]) for b in range(300)]
    expected = [p for batch in batches for p in batch]
    done = threading.Event()

    def write() -> None:
        written(tmp_path, batches, segment_bytes=2048).close()
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    seen: list[bytes] = []
    reads = 0
    while True:
        finished = done.is_set()
        seen += entries(tmp_path, after_seq=len(seen))
        assert seen == expected[: len(seen)]
        reads += 1
        if finished:
            break
    writer.join()
    assert seen == expected and reads > 1


def test_a_follower_resumes_where_its_last_scan_ended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = written(tmp_path, [payloads(0, [100] * 50)])
    assert len(entries(tmp_path)) == 50
    offsets: list[int] = []
    pread = os.pread
    monkeypatch.setattr(segments.os, "pread", lambda fd, n, at: offsets.append(at) or pread(fd, n, at))
    writer.append(payloads(1, [1, 2]))
    assert entries(tmp_path, after_seq=50) == payloads(1, [1, 2])
    assert min(offsets) > 50 * 100  # not from the segment's start again
    offsets.clear()
    assert entries(tmp_path, after_seq=10) == payloads(0, [100] * 50)[10:] + payloads(1, [1, 2])
    assert min(offsets) == 0  # an earlier position: scanned from the start
    writer.close()


def test_two_writers_share_one_log(tmp_path: Path) -> None:
    """WORKERS=N: every worker appends to the one log; the lock orders them and nothing is lost."""
    per_writer = {w: [payloads(100 * w + b, [w, b % 9]) for b in range(60)] for w in (1, 2)}
    threads = [threading.Thread(target=lambda w=w: written(tmp_path, per_writer[w], 1024).close()) for w in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = [orjson.loads(p) for p in entries(tmp_path)]
    assert len(got) == 240
    for w in (1, 2):  # each writer's batches in its own order, each batch contiguous
        mine = [(r["b"], r["i"]) for r in got if r["b"] // 100 == w]
        assert mine == [(100 * w + b, i) for b in range(60) for i in range(2)]
    assert all(got[k]["b"] == got[k + 1]["b"] for k in range(0, 240, 2))


def test_writers_taking_turns_follow_each_others_appends_and_roll_overs(tmp_path: Path) -> None:
    one, two = SegmentWriter(tmp_path, 1024), SegmentWriter(tmp_path, 1024)
    one.open()
    two.open()
    expected: list[bytes] = []
    for b in range(40):
        writer, sizes = (one, [b * 7 % 90, 20]) if b % 3 else (two, [b * 13 % 400])
        batch = payloads(b, sizes)
        assert writer.append(batch) == len(expected) + 1
        expected += batch
    one.close()
    two.close()
    assert len(list(tmp_path.glob("*.log"))) > 5
    assert entries(tmp_path) == expected


APPEND_UNDER_STRACE = """
import sys
from pathlib import Path
from tb_gateway.sinks import segments
if sys.argv[2] == "python":
    segments._speedups = None
writer = segments.SegmentWriter(Path(sys.argv[1]), 65536)
writer.open()
writer.append([b"warm-up"])
print("MARK", flush=True)
writer.append([b'{"a":1}', b'{"b":2}'])
print("DONE", flush=True)
"""


@pytest.mark.parametrize("path", ["c", "python"])
def test_an_append_is_one_locked_write_and_sync_in_that_order(tmp_path: Path, path: str) -> None:
    """Watched with strace: both paths take the lock, check the tail, write, fdatasync, then unlock — the
    append returns (and the sink acknowledges) only after the sync."""
    assert path == "python" or segments._speedups is not None
    trace = tmp_path / "trace"
    command = ["strace", "-f", "-e", "trace=flock,pread64,pwrite64,fdatasync,write", "-o", str(trace)]
    script = [sys.executable, "-c", APPEND_UNDER_STRACE, str(tmp_path / "log"), path]
    subprocess.run(
        command + script,
        check=True,
        capture_output=True,
        timeout=60,
    )
    calls, between = [], False
    for line in trace.read_text().splitlines():
        if re.search(r'write\(1, "MARK', line):
            between = True
        elif re.search(r'write\(1, "DONE', line):
            break
        elif between and (found := re.match(r"\d+\s+(\w+)\((.*)", line)) and found[1] != "write":
            calls.append(
                found[1] + ("(LOCK_EX)" if "LOCK_EX" in found[2] else "(LOCK_UN)" if "LOCK_UN" in found[2] else "")
            )
    assert calls == ["flock(LOCK_EX)", "pread64", "pwrite64", "fdatasync", "flock(LOCK_UN)"]


class Crashed(BaseException):
    """The process died (BaseException: the writer must not catch it)."""


class CrashingOs:
    """Stands in for ``os`` inside segments.py: the ``crash_at``-th durable-path call kills the process.

    A write that is cut short reaches the disk only in part: a prefix (``kill -9`` in the middle of a
    write) or any subset of its 512-byte sectors (power loss before the sync).
    """

    def __init__(self, crash_at: int, tear: tuple[str, Any]) -> None:
        self.crash_at, self.tear, self.calls = crash_at, tear, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def _step(self) -> bool:
        self.calls += 1
        return self.calls == self.crash_at

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        if not self._step():
            return os.pwrite(fd, data, offset)
        data = bytes(data)
        mode, arg = self.tear
        if mode == "prefix":
            os.pwrite(fd, data[: arg % (len(data) + 1)], offset)
        else:
            for i in range(0, len(data), 512):
                if arg[(i // 512) % len(arg)]:
                    os.pwrite(fd, data[i : i + 512], offset + i)
        raise Crashed

    def _crashing(self, real: Any, *args: Any) -> Any:
        if self._step():
            raise Crashed
        return real(*args)

    def fdatasync(self, fd: int) -> None:
        self._crashing(os.fdatasync, fd)

    def fsync(self, fd: int) -> None:
        self._crashing(os.fsync, fd)

    def posix_fallocate(self, fd: int, offset: int, length: int) -> None:
        self._crashing(os.posix_fallocate, fd, offset, length)

    def open(self, path: Any, flags: int, mode: int = 0o777) -> int:
        return int(self._crashing(os.open, path, flags, mode))


tears = st.one_of(
    st.tuples(st.just("prefix"), st.integers(0, 5000)),
    st.tuples(st.just("sectors"), st.lists(st.booleans(), min_size=1, max_size=6)),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(st.lists(st.integers(0, 700), min_size=1, max_size=8), min_size=1, max_size=10),
    crashes=st.lists(st.tuples(st.integers(1, 30), tears), max_size=4),
)
def test_any_crash_leaves_exactly_the_acknowledged_entries_and_a_prefix_of_the_torn_batch(
    batches: list[list[int]], crashes: list[tuple[int, tuple[str, Any]]]
) -> None:
    plan = iter(crashes)
    outcomes: list[tuple[list[bytes], bool]] = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "messages"
        # the Python path, whose every system call the fake os can break (the C one is the same sequence)
        with (
            mock.patch.object(segments, "_speedups", None),
            mock.patch.object(segments, "os", CrashingOs(0, ("prefix", 0))) as fake,
        ):

            def start() -> SegmentWriter:
                while True:  # the restarted process may crash again while it opens the log
                    fake.crash_at, fake.tear = next(plan, (0, ("prefix", 0)))
                    fake.calls = 0
                    fresh = SegmentWriter(directory, segment_bytes=1024)
                    try:
                        fresh.open()
                        return fresh
                    except Crashed:
                        fresh.close()

            writer: SegmentWriter | None = None
            for b, sizes in enumerate(batches):
                writer = writer or start()
                batch = payloads(b, sizes)
                try:
                    writer.append(batch)
                    outcomes.append((batch, True))
                except Crashed:
                    writer.close()  # the process is gone; its descriptors (and its lock) with it
                    writer = None
                    outcomes.append((batch, False))
            if writer is not None:
                writer.close()
        got = entries(directory)  # read with the real os, after every crash
    crashed = [i for i, (_, acknowledged) in enumerate(outcomes) if not acknowledged]
    event(f"batches lost to a crash: {len(crashed)}")
    event(f"acknowledged after a crash: {any(ok for _, ok in outcomes[crashed[0] + 1 :]) if crashed else None}")
    for batch, acknowledged in outcomes:
        survived = 0
        while survived < len(batch) and survived < len(got) and got[survived] == batch[survived]:
            survived += 1
        if acknowledged:
            assert survived == len(batch), "an acknowledged entry was lost"
        got = got[survived:]
    assert got == [], "an entry appeared that was never written, or out of order"


# --- framing in C (_speedups.frame) against segments.frame, the reference ---------------------------------


def test_the_c_framing_is_built() -> None:
    assert segments._speedups is not None  # `make test` builds it; else the property below compares nothing


@given(
    payloads=st.lists(st.binary(max_size=300), max_size=12),
    index=st.integers(0, 3),
    offset=st.integers(0, 5000),
    seq=st.integers(0, 2**64 - 20),
    crc=st.integers(0, 2**32 - 1),
    room=st.integers(0, 6000),
)
def test_the_c_framing_writes_what_frame_writes(
    payloads: list[bytes], index: int, offset: int, seq: int, crc: int, room: int
) -> None:
    assert segments._speedups is not None
    index = min(index, len(payloads))
    cursor = segments.Cursor(offset, seq, crc)
    expected, i = [], index
    while i < len(payloads) and cursor.offset + HEADER.size + len(payloads[i]) <= room:
        expected.append(segments.frame(cursor, payloads[i]))
        i += 1
    got = segments._speedups.frame(payloads, index, offset, seq, crc, room)
    assert got == (b"".join(expected), i, cursor.offset, cursor.seq, cursor.crc)


# --- retention -----------------------------------------------------------------------------------------


def firsts(directory: Path) -> list[int]:
    return [first for first, _ in segments.segments(directory)]


def test_a_size_cap_removes_the_oldest_whole_segments_and_the_rest_reads_on(tmp_path: Path) -> None:
    removed: list[str] = []
    writer = SegmentWriter(tmp_path, 1024, max_bytes=4 * 1024, on_removed=removed.append)
    writer.open()
    batches = [payloads(b, [60, 70]) for b in range(60)]
    for batch in batches:
        writer.append(batch)
    everything = [p for batch in batches for p in batch]
    kept = firsts(tmp_path)
    assert len(kept) == 4 and sum(p.stat().st_size for p in tmp_path.glob("*.log")) <= 4 * 1024
    assert removed and set(removed) == {"size"}
    assert len(removed) + len(kept) > 10  # it rolled over many times, and removed all but the newest four
    got = list(read_log(tmp_path))
    assert got[0][0] == kept[0]  # seqs start at the oldest segment left, then run on without gaps
    assert [seq for seq, _ in got] == list(range(kept[0], len(everything) + 1))
    assert [p for _, p in got] == everything[kept[0] - 1 :]
    writer.close()


def test_a_cap_below_one_segment_keeps_the_newest_where_appends_go(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path, 1024, max_bytes=1)
    writer.open()
    for b in range(30):
        writer.append(payloads(b, [100, 100]))
        assert len(firsts(tmp_path)) == 1
    assert writer.append(payloads(99, [5])) == 61
    writer.close()
    assert [seq for seq, _ in read_log(tmp_path)][-1] == 61


def test_the_age_limit_removes_sealed_segments_whose_last_write_is_older(tmp_path: Path) -> None:
    now = [1_000_000.0]
    removed: list[str] = []
    writer = SegmentWriter(tmp_path, 1024, max_age_s=3600, on_removed=removed.append, clock=lambda: now[0])
    writer.open()
    for b in range(12):
        writer.append(payloads(b, [100, 100]))
    listed = segments.segments(tmp_path)
    assert len(listed) >= 4 and not removed  # everything is fresh: the clock says their mtimes are in the past
    for age_h, (_, path) in zip([5, 4, 2, 0.5], listed, strict=False):
        os.utime(path, (now[0] - age_h * 3600, now[0] - age_h * 3600))
    os.utime(listed[-1][1], (now[0] - 9 * 3600, now[0] - 9 * 3600))  # the newest: never removed, even old
    assert writer.enforce_retention() == 3
    assert removed == ["age"] * 3
    assert firsts(tmp_path) == [first for first, _ in listed[3:]]
    now[0] += 2 * 3600  # later on, the 0.5-hour one is 2.5 hours old: still kept; the rest were written now
    assert writer.enforce_retention() == 0
    writer.close()


def test_a_follower_inside_a_removed_segment_goes_on_from_the_oldest_left(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path, 1024)
    writer.open()
    for b in range(20):
        writer.append(payloads(b, [100, 100]))
    listed = firsts(tmp_path)
    follower = list(read_log(tmp_path, after_seq=listed[1] + 1))  # a reader positioned inside segment 2
    assert follower[0][0] == listed[1] + 2
    writer.max_bytes = 2 * 1024
    assert writer.enforce_retention() == len(listed) - 2
    left = firsts(tmp_path)
    jumped = [seq for seq, _ in read_log(tmp_path, after_seq=listed[1] + 1)]
    assert jumped[0] == left[0] and jumped == list(range(left[0], jumped[-1] + 1))  # the seqs jump, then run on
    later = [seq for seq, _ in read_log(tmp_path, after_seq=left[0] + 3)]
    assert later[0] == left[0] + 4
    writer.close()


def test_a_reader_at_a_seal_skips_next_segments_retention_removed(tmp_path: Path) -> None:
    """The writer and reader meet a seal whose next segment is gone: both go on in the newest one."""
    writer = SegmentWriter(tmp_path, 1024)
    writer.open()
    for b in range(20):
        writer.append(payloads(b, [100, 100]))
    listed = segments.segments(tmp_path)
    stale = SegmentWriter(tmp_path, 1024)  # an idle worker whose cursor is still in the first segment
    stale.open()
    stale._forget_position()
    stale._enter(listed[0][0], create=False)
    for _, path in listed[1:-1]:
        path.unlink()
    seqs = [seq for seq, _ in read_log(tmp_path)]
    assert seqs[: listed[1][0] - 1] == list(range(1, listed[1][0]))
    assert seqs[listed[1][0] - 1] == listed[-1][0]  # from the first segment's seal straight to the newest
    first_new = stale.append(payloads(99, [5]))
    assert first_new == seqs[-1] + 1  # the stale writer found the true tail, not a re-created old segment
    assert firsts(tmp_path) == [listed[0][0], listed[-1][0]]
    writer.close()
    stale.close()


def test_a_follower_is_not_misled_by_a_removed_segments_inode_given_to_a_newer_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ext4 hands a freed inode number to the next new file: a resume point must name its segment too."""
    writer = SegmentWriter(tmp_path, 1024)
    writer.open()
    for b in range(6):
        writer.append(payloads(b, [100, 100]))
    [(_, first_path), *_] = segments.segments(tmp_path)
    stat = os.fstat  # (st_mode, st_ino, st_dev, ...): every segment file now looks like inode 4242
    monkeypatch.setattr(segments.os, "fstat", lambda fd: os.stat_result((stat(fd)[0], 4242, *stat(fd)[2:])))
    seen = [seq for seq, _ in read_log(tmp_path)]
    writer.max_bytes = 1  # keep only the newest: the follower's next read starts there, on "the same inode"
    writer.enforce_retention()
    for b in range(6, 12):
        writer.append(payloads(b, [100, 100]))
    left = segments.segments(tmp_path)
    assert first_path not in [path for _, path in left]
    after = [seq for seq, _ in read_log(tmp_path, after_seq=seen[-1])]
    assert after == list(range(left[0][0], 24 + 1))
    writer.close()


class _SmallDisk:
    """``posix_fallocate`` on a disk of ``room`` bytes for the log's segments: ENOSPC beyond it."""

    def __init__(self, directory: Path, room: int) -> None:
        self.directory = directory
        self.room = room
        self.real = os.posix_fallocate

    def __call__(self, fd: int, offset: int, length: int) -> None:
        mine = os.fstat(fd).st_size
        used = sum(p.stat().st_size for p in self.directory.glob("*.log")) - mine
        if used + max(mine, offset + length) > self.room:
            raise OSError(28, "No space left on device")
        self.real(fd, offset, length)


def test_a_disk_too_small_for_two_segments_rolls_over_under_a_size_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sealed segment is removed before the next one takes its room (it was allocated first, failed
    with ENOSPC, and every later append and restart failed the same way)."""
    disk = _SmallDisk(tmp_path, room=1536)
    monkeypatch.setattr(segments.os, "posix_fallocate", disk)
    writer = SegmentWriter(tmp_path, 1024, max_bytes=1)
    writer.open()
    batches = [payloads(b, [100, 100]) for b in range(40)]
    for batch in batches:
        writer.append(batch)  # never ENOSPC
    writer.close()
    got = list(read_log(tmp_path))
    assert len(firsts(tmp_path)) == 1 and got[-1][0] == 80
    assert [seq for seq, _ in got] == list(range(got[0][0], 81))
    assert [p for _, p in got] == [p for batch in batches for p in batch][got[0][0] - 1 :]


def test_a_full_disk_refuses_appends_until_there_is_room_and_a_restart_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = _SmallDisk(tmp_path, room=1536)
    monkeypatch.setattr(segments.os, "posix_fallocate", disk)
    writer = SegmentWriter(tmp_path, 1024, max_bytes=1)
    writer.open()
    acknowledged: list[bytes] = []
    disk.room = 1000  # not even one segment fits any more: the roll-over cannot take its room
    refused = 0
    for b in range(30):
        batch = payloads(b, [100, 100])
        try:
            writer.append(batch)
        except OSError as exc:
            assert exc.errno == 28
            refused += 1
        else:
            acknowledged += batch
    assert refused and acknowledged
    writer.close()
    disk.room = 1536  # room again: a new writer (a restart) opens and appends
    reopened = SegmentWriter(tmp_path, 1024, max_bytes=1)
    reopened.open()
    reopened.append(payloads(99, [5]))
    reopened.close()
    stored = [p for _, p in read_log(tmp_path)]
    assert stored[-1] == payloads(99, [5])[0]
    assert not set(stored) - set(acknowledged) - set(payloads(99, [5]))  # nothing refused was stored


FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_EXTENT_UNWRITTEN = 0x800


def unwritten_ranges(path: Path) -> list[tuple[int, int]] | None:
    """The file's extents that are only reserved (FIEMAP), or None where the filesystem cannot say."""
    import fcntl
    import struct

    count = 512
    request = bytearray(struct.pack("=QQIIII", 0, 2**64 - 1, 1, 0, count, 0) + bytes(56 * count))  # 1: sync first
    with path.open("rb") as f:
        try:
            fcntl.ioctl(f.fileno(), FIEMAP, request)
        except OSError:
            return None
    mapped = struct.unpack_from("=I", request, 20)[0]
    found = []
    for n in range(mapped):
        logical, _, length = struct.unpack_from("=QQQ", request, 32 + 56 * n)
        flags = struct.unpack_from("=I", request, 32 + 56 * n + 40)[0]
        if flags & FIEMAP_EXTENT_UNWRITTEN:
            found.append((logical, logical + length))
    return found


@pytest.mark.parametrize("native", [True, False], ids=["c", "python"])
def test_the_space_ahead_of_the_tail_is_zeroed_so_appends_sync_no_extent_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """A preallocated extent is only reserved until written; the first write into it is a metadata change
    that makes the append's fdatasync commit the journal. The writer zeroes ZERO_AHEAD past the tail, once
    per ZERO_AHEAD of appends."""
    if not native:
        monkeypatch.setattr(segments, "_speedups", None)
    zero_writes: list[int] = []
    pwrite = os.pwrite
    monkeypatch.setattr(
        segments.os, "pwrite", lambda fd, data, at: (not any(data) and zero_writes.append(at)) or pwrite(fd, data, at)
    )
    ahead = segments.ZERO_AHEAD
    writer = written(tmp_path, [], segment_bytes=8 * ahead)
    segment = only_segment(tmp_path)
    if unwritten_ranges(segment) is None or not unwritten_ranges(segment):
        pytest.skip("this filesystem does not report reserved extents")
    count = int(2.5 * ahead) // (40 * (200 + segments.HEADER.size)) + 1
    batches = [payloads(b, [200] * 40) for b in range(count)]  # about 2.5 ZERO_AHEAD
    for batch in batches:
        reserved, tail, zeroings = unwritten_ranges(segment) or [], writer._cursor.offset, len(zero_writes)
        writer.append(batch)
        if len(zero_writes) == zeroings:  # written where the writer had zeroed before: no extent changed
            assert not [r for r in reserved if r[0] < writer._cursor.offset and tail < r[1]], (tail, reserved)
    assert len(zero_writes) == 3  # once per ZERO_AHEAD, not per append
    tail = writer._cursor.offset
    writer.close()
    reopened = written(tmp_path, [payloads(count, [5])], segment_bytes=8 * ahead)  # mid-segment after a restart
    reopened.close()
    assert entries(tmp_path) == [p for batch in batches for p in batch] + payloads(count, [5])
    assert zero_writes[-1] >= tail and all(start >= tail + ahead for start, _ in unwritten_ranges(segment) or [])
