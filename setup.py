"""The optional C fast paths (src/tb_gateway/_speedups.c, _lanes.c, _mqtt_lane.c, _kafka_lane.c, _seen.c: one module).

``optional=True``: where no C compiler is available the build goes on without it and normalize.py runs the
same rules in Python (slower, identical results). Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tb_gateway._speedups",
            [
                "src/tb_gateway/_speedups.c",
                "src/tb_gateway/_lanes.c",
                "src/tb_gateway/_mqtt_lane.c",
                "src/tb_gateway/_kafka_lane.c",
                "src/tb_gateway/_seen.c",
            ],
            depends=["src/tb_gateway/_speedups.h"],
            optional=True,
        )
    ]
)
