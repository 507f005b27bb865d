"""The C module in use is built from the sources in this checkout (setup.py's SOURCES_SHA1), and a compiler
present means it must have been built: a failed in-place compile would otherwise leave the previous module
behind, and every test and benchmark of the fast paths would measure code that is no longer the source."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def setup_module_file() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tb_gateway_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not as __main__: setup() is not called
    return module


def test_module_is_built_from_these_sources() -> None:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler: the gateway runs the Python paths")
    from tb_gateway import _speedups

    assert setup_module_file().sources_sha1() == _speedups.SOURCES_SHA1, (
        "tb_gateway._speedups was built from other sources than these: run `make install`"
    )


def test_hash_covers_every_c_file_and_header(tmp_path: Path) -> None:
    setup = setup_module_file()
    c_files = {f"src/tb_gateway/{p.name}" for p in (ROOT / "src/tb_gateway").glob("_*.[ch]")}
    assert set(setup.SOURCES + setup.DEPENDS) == c_files
    for name in setup.SOURCES + setup.DEPENDS:  # a change to any one of them changes the hash
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    before = setup.sources_sha1(tmp_path)
    assert before == setup.sources_sha1()
    for name in setup.SOURCES + setup.DEPENDS:
        original = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(original + b"\n")
        assert setup.sources_sha1(tmp_path) != before, name
        (tmp_path / name).write_bytes(original)


def test_makefile_requires_the_build_where_a_compiler_exists() -> None:
    """`make -n install` shows the install step asking setup.py to fail on a failed compile."""
    if shutil.which("cc") is None or shutil.which("make") is None:
        pytest.skip("no C compiler or make")
    dry = subprocess.run(
        ["make", "-n", "-B", "install", f"PYTHON={sys.executable}", "VENV=/nonexistent-venv"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "TB_GATEWAY_SPEEDUPS=required /nonexistent-venv/bin/pip install" in dry


def test_a_failed_compile_fails_the_build_when_required(tmp_path: Path) -> None:
    """setup.py with TB_GATEWAY_SPEEDUPS=required stops on a compile error (optional: goes on without it)."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")  # alone: the extension's build needs no metadata
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    broken = tmp_path / "src/tb_gateway/_speedups.c"  # the first compiled: the build stops at once
    broken.write_text("#error this source does not compile\n" + broken.read_text())
    build = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    required = subprocess.run(
        build, cwd=tmp_path, capture_output=True, text=True, env={**env, "TB_GATEWAY_SPEEDUPS": "required"}
    )
    assert required.returncode != 0
    assert "this source does not compile" in required.stdout + required.stderr
    optional = subprocess.run(build, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert optional.returncode == 0, optional.stderr
    assert not list(tmp_path.rglob("_speedups*.so"))
