"""Runs the real ``tb-gateway`` process for end-to-end tests: free ports, its own DATA_DIR, log to a file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.ports import free_port

BIN = Path(sys.executable).parent
READY_LINE = "gateway ready"


@dataclass
class GatewayProcess:
    data_dir: Path
    overrides: dict[str, str] = field(default_factory=dict)
    http_port: int = field(default_factory=free_port)
    mqtt_port: int = field(default_factory=free_port)
    coap_port: int = field(default_factory=lambda: free_port(socket.SOCK_DGRAM))
    metrics_port: int = field(default_factory=free_port)
    prefix: list[str] = field(default_factory=list)  # e.g. ["taskset", "-c", "0"] for benchmarks
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "HTTP_", "COAP_", "KAFKA_"))}
        env.update(
            DATA_DIR=str(self.data_dir),
            HTTP_BIND_ADDRESS="127.0.0.1",
            HTTP_BIND_PORT=str(self.http_port),
            MQTT_BIND_ADDRESS="127.0.0.1",
            MQTT_BIND_PORT=str(self.mqtt_port),
            MQTT_SSL_BIND_PORT=str(free_port()),
            COAP_BIND_ADDRESS="127.0.0.1",
            COAP_BIND_PORT=str(self.coap_port),
            METRICS_BIND_ADDRESS="127.0.0.1",
            METRICS_PORT=str(self.metrics_port),
            KAFKA_ENABLED="false",
            LOG_FORMAT="json",
            LOG_LEVEL=os.environ.get("TB_TEST_LOG_LEVEL", "INFO"),  # DEBUG to chase a flaky end-to-end test
            BATCH_TIMEOUT="0.05",
        )
        env.update(self.overrides)
        return env

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"gateway-{self.starts}.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 20.0) -> GatewayProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, str(BIN / "tb-gateway"), "run"],
                env=self.env,
                cwd=self.data_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if READY_LINE in self.log():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.proc.send_signal(signal.SIGUSR1)  # the gateway prints its threads' stacks: where is it stuck?
        time.sleep(0.5)
        raise RuntimeError(f"gateway not ready within {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM and wait: the clean shutdown path."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cli(self, *args: str, check: bool = True, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [str(BIN / "tb-gateway"), *args],
            env=self.env,
            cwd=self.data_dir,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"tb-gateway {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def add_device(self, name: str, token: str | None = None, *extra: str) -> str:
        args = ["device", "add", name, *(["--token", token] if token else []), *extra]
        return self.cli(*args).stdout.strip()
