"""The spool log alone: order, cap, recovery from torn and corrupt entries, head persistence, segments."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_gateway.records import DeviceIdentity, Record, RecordKind, Transport
from tb_gateway.sinks.spool import ENTRY_HEADER, Spool, decode_record, encode_record


def rec(device: str, seq: int, kind: RecordKind = RecordKind.TELEMETRY, received_at: int = 1_000) -> Record:
    return Record(
        device=DeviceIdentity(id=f"id-{device}", name=device, type="sensor", token=f"tok-{device}"),
        kind=kind,
        ts=1_700_000_000_000 + seq,
        values={"seq": seq, "t": 21.5, "s": "x", "nested": {"a": [1, 2]}},
        transport=Transport.MQTT,
        received_at=received_at + seq,
    )


def seqs(records: list[Record]) -> list[tuple[str, int]]:
    return [(r.device.name, r.values["seq"]) for r in records]


def opened(path: Path, max_bytes: int = 10_000_000, segment_bytes: int = 1 << 20) -> Spool:
    spool = Spool(path, max_bytes, segment_bytes=segment_bytes)
    spool.open()
    return spool


def test_encode_round_trip_keeps_every_field_including_the_token() -> None:
    for kind in RecordKind:
        original = rec("dev", 7, kind)
        assert decode_record(encode_record(original)) == original
        assert decode_record(encode_record(original)).device.token == "tok-dev"


def test_decode_refuses_an_unknown_format_version() -> None:
    payload = encode_record(rec("d", 1)).replace(b"[1,", b"[9,", 1)
    with pytest.raises(ValueError, match="format 9"):
        decode_record(payload)


def test_append_read_commit_keeps_order_and_counts(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    batch = [rec("a", 1), rec("b", 1), rec("a", 2)]
    assert spool.append(batch)
    assert spool.append([rec("a", 3)])
    assert spool.records == 4
    assert spool.devices == {"id-a": 3, "id-b": 1}
    assert spool.oldest_received_at == batch[0].received_at
    first = spool.read(2)
    assert seqs([s.record for s in first]) == [("a", 1), ("b", 1)]
    rest = spool.read(10)
    assert seqs([s.record for s in rest]) == [("a", 2), ("a", 3)]
    assert spool.read(10) == []
    spool.commit(first)
    assert spool.records == 2
    assert spool.devices == {"id-a": 2}
    assert spool.oldest_received_at == rest[0].record.received_at
    spool.commit(rest)
    assert (spool.records, spool.bytes, dict(spool.devices), spool.oldest_received_at) == (0, 0, {}, None)
    spool.close()


def test_an_empty_spool_takes_no_disk_after_it_drained(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    spool.append([rec("a", i) for i in range(50)])
    spool.commit(spool.read(100))
    assert sum(p.stat().st_size for p in tmp_path.glob("*.seg")) == 0
    spool.append([rec("a", 99)])  # and it keeps working from offset 0
    assert seqs([s.record for s in spool.read(5)]) == [("a", 99)]
    spool.close()


def test_rewind_reads_again_from_the_committed_head(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    spool.append([rec("a", i) for i in range(5)])
    chunk = spool.read(3)
    spool.commit(chunk[:1])
    spool.rewind()
    assert seqs([s.record for s in spool.read(10)]) == [("a", i) for i in range(1, 5)]
    spool.close()


def test_cap_refuses_a_whole_batch_and_writes_nothing(tmp_path: Path) -> None:
    one = ENTRY_HEADER.size + len(encode_record(rec("a", 1)))
    spool = opened(tmp_path, max_bytes=one * 3)
    assert spool.append([rec("a", 1), rec("a", 2)])
    size_before = sum(p.stat().st_size for p in tmp_path.glob("*.seg"))
    assert not spool.append([rec("a", 3), rec("a", 4)])  # would make 4 > 3
    assert sum(p.stat().st_size for p in tmp_path.glob("*.seg")) == size_before
    assert spool.records == 2
    assert spool.append([rec("a", 3)])  # exactly at the cap is allowed
    assert not spool.append([rec("a", 4)])
    spool.commit(spool.read(1))  # replay frees room
    assert spool.append([rec("a", 4)])
    assert seqs([s.record for s in spool.read(10)]) == [("a", 2), ("a", 3), ("a", 4)]
    spool.close()


def test_reopen_resumes_at_the_committed_head(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    spool.append([rec("a", i) for i in range(10)])
    spool.commit(spool.read(4))
    spool.read(3)  # read but not committed: must come back after a crash
    spool.close()
    again = opened(tmp_path)
    assert again.records == 6
    assert again.devices == {"id-a": 6}
    assert seqs([s.record for s in again.read(100)]) == [("a", i) for i in range(4, 10)]
    again.close()


@pytest.mark.parametrize("cut", [1, ENTRY_HEADER.size - 1, ENTRY_HEADER.size, ENTRY_HEADER.size + 5])
def test_a_torn_last_entry_is_cut_and_the_rest_survives(tmp_path: Path, cut: int) -> None:
    spool = opened(tmp_path)
    spool.append([rec("a", 1), rec("a", 2)])
    spool.close()
    segment = next(tmp_path.glob("*.seg"))
    good = segment.stat().st_size
    payload = encode_record(rec("a", 3))
    entry = ENTRY_HEADER.pack(len(payload), zlib.crc32(payload)) + payload
    with segment.open("ab") as f:
        f.write(entry[:cut])  # the crash happened in the middle of this write
    again = opened(tmp_path)
    assert segment.stat().st_size == good
    assert again.records == 2
    again.append([rec("a", 4)])
    assert seqs([s.record for s in again.read(10)]) == [("a", 1), ("a", 2), ("a", 4)]
    again.close()


def test_a_corrupt_last_entry_is_cut(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    spool.append([rec("a", 1), rec("a", 2)])
    spool.close()
    segment = next(tmp_path.glob("*.seg"))
    data = bytearray(segment.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the last payload: the CRC no longer matches
    segment.write_bytes(bytes(data))
    again = opened(tmp_path)
    assert again.records == 1
    assert seqs([s.record for s in again.read(10)]) == [("a", 1)]
    again.close()


def test_an_entry_with_a_valid_crc_but_foreign_content_is_cut(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    spool.append([rec("a", 1)])
    spool.close()
    segment = next(tmp_path.glob("*.seg"))
    junk = b'{"not": "a spool entry"}'
    with segment.open("ab") as f:
        f.write(ENTRY_HEADER.pack(len(junk), zlib.crc32(junk)) + junk)
    again = opened(tmp_path)
    assert again.records == 1
    again.close()


def test_an_absurd_length_is_treated_as_corruption(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    spool.append([rec("a", 1)])
    spool.close()
    segment = next(tmp_path.glob("*.seg"))
    with segment.open("ab") as f:
        f.write(struct.pack("<II", 0xFFFFFFFF, 0) + b"x" * 100)
    again = opened(tmp_path)
    assert again.records == 1
    again.close()


def test_a_damaged_head_file_replays_everything_rather_than_losing_anything(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    spool.append([rec("a", i) for i in range(5)])
    spool.commit(spool.read(2))
    spool.close()
    (tmp_path / "head").write_bytes(b"\x00" * 20)  # right size, wrong CRC
    again = opened(tmp_path)
    assert seqs([s.record for s in again.read(10)]) == [("a", i) for i in range(5)]
    again.close()


def test_segments_roll_and_replayed_ones_are_deleted(tmp_path: Path) -> None:
    spool = opened(tmp_path, segment_bytes=1000)
    for i in range(40):
        assert spool.append([rec("a", i), rec("b", i)])
    assert len(list(tmp_path.glob("*.seg"))) > 5
    out = []
    while chunk := spool.read(7):
        out.extend(chunk)
        spool.commit(chunk)
        assert spool.records == 80 - len(out)
    assert [r.values["seq"] for r in (s.record for s in out) if r.device.name == "a"] == list(range(40))
    assert len(list(tmp_path.glob("*.seg"))) == 1
    spool.close()


def test_reopen_across_segments_counts_bytes_exactly(tmp_path: Path) -> None:
    spool = opened(tmp_path, segment_bytes=500)
    for i in range(20):
        spool.append([rec("a", i)])
    spool.commit(spool.read(7))
    expected = (spool.records, spool.bytes, dict(spool.devices))
    spool.close()
    again = opened(tmp_path, segment_bytes=500)
    assert (again.records, again.bytes, dict(again.devices)) == expected
    again.close()


def test_stats_report_depth_and_age(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    assert spool.stats(now_ms=5_000)["oldest_age_seconds"] == 0.0
    spool.append([rec("a", 0, received_at=1_000), rec("b", 0, received_at=3_000)])
    stats = spool.stats(now_ms=4_000)
    assert stats["records"] == 2
    assert stats["devices"] == 2
    assert stats["oldest_age_seconds"] == pytest.approx(3.0)
    assert stats["bytes"] == spool.bytes > 0
    spool.close()


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 6)),
            st.tuples(st.just("read"), st.integers(1, 8)),
            st.tuples(st.just("commit"), st.integers(0, 8)),
            st.tuples(st.just("rewind"), st.just(0)),
            st.tuples(st.just("reopen"), st.just(0)),
        ),
        max_size=30,
    )
)
def test_model_nothing_lost_nothing_reordered(tmp_path_factory: pytest.TempPathFactory, ops: list) -> None:
    """Any mix of appends, reads, partial commits and restarts behaves like a FIFO queue."""
    path = tmp_path_factory.mktemp("model")
    spool = opened(path, max_bytes=5_000, segment_bytes=400)
    model: list[tuple[str, int]] = []  # what is still in the spool, oldest first
    read: list = []  # read but not committed
    n = 0
    for op, arg in ops:
        if op == "append":
            batch = [rec("abc"[(n + i) % 3], n + i) for i in range(arg)]
            if spool.append(batch):
                model.extend(seqs(batch))
                n += arg
        elif op == "read":
            read.extend(spool.read(arg))
            assert seqs([s.record for s in read]) == model[: len(read)]
        elif op == "commit":
            done, read = read[:arg], read[arg:]
            spool.commit(done)
            del model[: len(done)]
        elif op == "rewind":
            spool.rewind()
            read = []
        else:
            spool.close()
            spool = opened(path, max_bytes=5_000, segment_bytes=400)
            read = []
        assert spool.records == len(model)
    spool.rewind()
    assert seqs([s.record for s in spool.read(10_000)]) == model
    spool.close()
