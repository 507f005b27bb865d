"""Run ``tb-gateway`` with its embedded store cut short at one point (bench/store_cost.py; never for real use).

    python -m bench.store_variant VARIANT TB_GATEWAY_PATH run

The variants drop the guarantee that an acknowledged record is durable: they exist only to measure what
each part of the store's write costs the gateway's core. ``as-is`` changes nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from tb_gateway import _speedups, cli
from tb_gateway.sinks.segments import HEADER, SegmentWriter


def _advance(writer: SegmentWriter, payloads: list[bytes], write: Callable[[int, bytes, int], object]) -> int | None:
    """``SegmentWriter._append_in_c`` with ``write(fd, data, offset)`` in place of the locked durable write."""
    cursor = writer._cursor
    if writer._fd is None:
        return None
    data, done, offset, seq, crc = _speedups.frame(
        payloads, 0, cursor.offset, cursor.seq, cursor.crc, writer._size - HEADER.size
    )
    if done < len(payloads) or offset + HEADER.size > writer._written:
        return None  # the locked path rolls over or zeroes ahead, durably, as always
    write(writer._fd, data, cursor.offset)
    first = cursor.seq
    cursor.offset, cursor.seq, cursor.crc = offset, seq, crc
    return first


def _no_append(writer: SegmentWriter, payloads: Sequence[bytes]) -> int:
    return writer._cursor.seq


# per variant: the SegmentWriter methods it replaces
VARIANTS: dict[str, dict[str, Callable[..., int | None]]] = {
    "as-is": {},
    # framed (CRC, the writer thread's Python) and written to the page cache, never fdatasynced
    "no-fdatasync": {"_append_in_c": lambda self, payloads: _advance(self, payloads, os.pwrite)},
    # records still encoded and handed to the writer thread, which returns at once
    "no-append": {"append": _no_append},
}


def main(argv: list[str]) -> int:
    variant, _gateway, *args = argv
    for name, replacement in VARIANTS[variant].items():
        setattr(SegmentWriter, name, replacement)
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
