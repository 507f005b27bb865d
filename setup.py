"""The optional C fast paths (src/tb_gateway/_speedups.c, _lanes.c, _mqtt_lane.c, _kafka_lane.c, _seen.c: one module).

``optional=True``: where no C compiler is available the build goes on without it and normalize.py runs the
same rules in Python (slower, identical results). ``TB_GATEWAY_SPEEDUPS=required`` (what the Makefile sets
when ``cc`` exists) makes a failed compile fail the install instead: an in-place build that fails silently
leaves the previous module in place, and tests and benchmarks would run code that is no longer the source.
The module carries ``SOURCES_SHA1``, the hash of the files it was built from (tests/test_speedups_build.py
compares it with the checkout). Everything else about the package is in pyproject.toml.
"""

import hashlib
import os
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent
SOURCES = [
    "src/tb_gateway/_speedups.c",
    "src/tb_gateway/_lanes.c",
    "src/tb_gateway/_mqtt_lane.c",
    "src/tb_gateway/_kafka_lane.c",
    "src/tb_gateway/_seen.c",
]
DEPENDS = ["src/tb_gateway/_speedups.h"]


def sources_sha1(root: Path = HERE) -> str:
    """The hash of every file the module is built from, in this order."""
    digest = hashlib.sha1()
    for name in SOURCES + DEPENDS:
        digest.update((root / name).read_bytes())
    return digest.hexdigest()


if __name__ == "__main__":  # setuptools runs this file as __main__; the test imports it for sources_sha1
    setup(
        ext_modules=[
            Extension(
                "tb_gateway._speedups",
                SOURCES,
                depends=DEPENDS,
                define_macros=[("TB_SOURCES_SHA1", f'"{sources_sha1()}"')],
                optional=os.environ.get("TB_GATEWAY_SPEEDUPS", "optional") != "required",
            )
        ]
    )
