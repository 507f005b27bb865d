"""CLI output into a pipe whose reader goes away (`tb-gateway messages | head -1`): a quiet exit, as Unix tools."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

from tb_gateway.records import DeviceIdentity, Record, RecordKind, Transport
from tb_gateway.sinks.store import StoreSink
from tests.gateway_process import BIN, GatewayProcess

SIGPIPE_EXIT = 128 + signal.SIGPIPE  # what a shell reports for `yes | head -1`'s yes


def fill_store(data_dir: Path, count: int) -> None:
    async def main() -> None:
        sink = StoreSink(data_dir / "messages")
        await sink.start()
        device = DeviceIdentity("id-1", "dev")
        await sink.deliver([Record(device, RecordKind.TELEMETRY, i, {"n": i}, Transport.HTTP, i) for i in range(count)])
        await sink.close()

    asyncio.run(main())


def test_messages_into_a_closed_pipe_exit_quietly(tmp_path: Path) -> None:
    cli = GatewayProcess(tmp_path / "gw")
    fill_store(cli.data_dir, 5000)  # ~400 KB of JSON lines: far more than a pipe holds
    with subprocess.Popen(
        [str(BIN / "tb-gateway"), "messages", "--json"],
        env=cli.env,
        cwd=cli.data_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert b'"device":"dev"' in proc.stdout.readline()
        proc.stdout.close()  # `head -1` exits
        assert proc.stderr.read() == b""
        assert proc.wait(30) == SIGPIPE_EXIT


def test_device_list_into_a_closed_pipe_exit_quietly(tmp_path: Path) -> None:
    """The reader is gone before anything is written: the error comes at the final flush."""
    cli = GatewayProcess(tmp_path / "gw")
    cli.add_device("dev", "TOKEN_1")
    with subprocess.Popen(
        [str(BIN / "tb-gateway"), "device", "list"],
        env=cli.env,
        cwd=cli.data_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        assert proc.stderr.read() == b""
        assert proc.wait(30) == SIGPIPE_EXIT


def test_messages_says_where_it_looked_when_there_is_no_store(tmp_path: Path) -> None:
    """Run from another directory (DATA_DIR=./data there), it printed nothing and exited 0, no hint why."""
    cli = GatewayProcess(tmp_path / "gw")
    cli.data_dir.mkdir(parents=True)
    done = subprocess.run(
        [str(BIN / "tb-gateway"), "messages"], env=cli.env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and done.stdout == ""
    assert f"no embedded store in DATA_DIR={cli.data_dir}" in done.stderr
    fill_store(cli.data_dir, 1)
    done = subprocess.run(
        [str(BIN / "tb-gateway"), "messages"], env=cli.env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and '{"n":0}' in done.stdout and done.stderr == ""
