"""A real Apache Kafka 4.x broker for tests: one node in KRaft mode, jars from Maven Central, cached.

``python -m tests.harness.kafka fetch`` downloads ``org.apache.kafka:kafka_2.13`` and its runtime
dependencies once into ``.cache/kafka/<version>/libs`` (the Makefile's ``deps`` target calls it);
``KafkaBroker`` formats a log dir, starts ``kafka.Kafka`` on a free 127.0.0.1 port and stops it by PID. A
broker can be stopped and started again on the same port and log dir, which is what the fault tests need.

Set ``TB_KAFKA_VERSION`` to try another 4.x release, ``TB_KAFKA_CACHE`` to keep the jars elsewhere.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.harness.ports import free_port

REPO = Path(__file__).resolve().parents[2]
KAFKA_VERSION = os.environ.get("TB_KAFKA_VERSION", "4.1.1")
LOG4J_VERSION = "2.24.3"  # the log4j2 Kafka 4.1 is built with; its slf4j binding makes the broker's log visible
CACHE = Path(os.environ.get("TB_KAFKA_CACHE", REPO / ".cache" / "kafka"))
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0

POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>tb-gateway.tests</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""

LOG4J2 = """status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {path}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = %d{{HH:mm:ss.SSS}} %-5p %c{{1}} - %m%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = file
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = INFO
"""


def libs_dir(version: str = KAFKA_VERSION) -> Path:
    return CACHE / version / "libs"


def fetch(version: str = KAFKA_VERSION) -> Path:
    """The folder of the broker's jars, downloaded with Maven on first use (a few seconds, ~45 MB)."""
    libs = libs_dir(version)
    done = libs.parent / "complete"
    if done.exists():
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    pom = libs.parent / "pom.xml"
    pom.write_text(POM.format(kafka=version, log4j=LOG4J_VERSION))
    result = subprocess.run(
        [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={libs}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        raise RuntimeError(f"mvn could not fetch Kafka {version}:\n{result.stdout[-4000:]}{result.stderr[-4000:]}")
    if not (libs / f"kafka_2.13-{version}.jar").exists():
        raise RuntimeError(f"mvn ran but {libs} has no kafka_2.13-{version}.jar")
    done.write_text(version + "\n")
    return libs


class KafkaBroker:
    """One KRaft node (broker + controller) in ``workdir``; ``port`` 0 picks a free one, kept for restarts."""

    def __init__(
        self,
        workdir: Path,
        *,
        libs: Path | None = None,
        port: int = 0,
        partitions: int = 3,
        heap_mb: int = 512,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.libs = libs or fetch()
        self.port = port or free_port()
        self.controller_port = free_port()
        self.partitions = partitions
        self.heap_mb = heap_mb
        self.extra = dict(extra or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def properties(self) -> Path:
        return self.workdir / "server.properties"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.log_dir),
            "num.partitions": str(self.partitions),
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            **self.extra,
        }
        self.properties.write_text("".join(f"{k}={v}\n" for k, v in config.items()))
        (self.workdir / "log4j2.properties").write_text(LOG4J2.format(path=self.workdir / "broker.log"))

    def _java(self, main: str, *args: str) -> list[str]:
        return [
            "java",
            f"-Xmx{self.heap_mb}m",
            "-Xms128m",
            "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
            "-cp",
            f"{self.libs}/*",
            main,
            *args,
        ]

    def _format(self) -> None:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        result = subprocess.run(
            # "=" form: a random id may start with "-", which argparse would take for an option
            self._java(
                "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", f"--config={self.properties}"
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"kafka-storage format failed:\n{result.stdout}{result.stderr}")

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> KafkaBroker:
        """Start (formatting the log dir the first time) and wait until the broker answers metadata."""
        if self.running:
            return self
        if not (self.log_dir / "meta.properties").exists():
            self._write_config()
            self._format()
        self.starts += 1
        with (self.workdir / f"stdout-{self.starts}.log").open("wb") as out:
            self.proc = subprocess.Popen(
                self._java("kafka.Kafka", str(self.properties)), stdout=out, stderr=subprocess.STDOUT
            )
        self.wait_ready(timeout_s)
        return self

    def _admin_config(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap, "logger": _Silent()}

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient(self._admin_config())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"Kafka exited with {self.proc and self.proc.returncode}:\n{self.log()}")
            try:
                if admin.list_topics(timeout=1).brokers:
                    return
            except Exception:  # KafkaException until the listener is up
                time.sleep(0.1)
        raise RuntimeError(f"Kafka not ready within {timeout_s} s:\n{self.log()}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (a clean broker shutdown) and wait; SIGKILL if it hangs."""
        if not self.running or self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.running and self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> KafkaBroker:
        self.stop()
        return self.start()

    def log(self) -> str:
        parts = []
        for path in sorted(self.workdir.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def create_topic(self, name: str, *, partitions: int = 3, config: Mapping[str, str] | None = None) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]  # not in __all__

        admin = AdminClient(self._admin_config())
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, config=dict(config or {}))]
        )
        futures[name].result(timeout=30)


def read_topic(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Every record now in ``topic``, per partition in offset order, as plain dicts."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"tb-test-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "logger": _Silent(),
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        if meta.error is not None:
            raise RuntimeError(f"topic {topic}: {meta.error}")
        high = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in meta.partitions}
        pending = {p for p, h in high.items() if h > 0}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in pending])
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error() is not None:
                raise RuntimeError(f"consuming {topic}: {msg.error()}")
            out.append(
                {
                    "topic": msg.topic(),
                    "partition": msg.partition(),
                    "offset": msg.offset(),
                    "key": msg.key(),
                    "value": msg.value(),
                    "headers": msg.headers(),
                }
            )
            if (msg.offset() or 0) + 1 >= high[msg.partition()]:
                pending.discard(msg.partition())
        if pending:
            raise RuntimeError(f"{topic}: partitions {sorted(pending)} not read to their end in {timeout_s} s")
        return out
    finally:
        consumer.close()


class _Silent:
    def log(self, *args: object, **kwargs: object) -> None:
        pass


def main(argv: list[str]) -> int:
    if argv[1:] == ["fetch"]:
        print(fetch())
        return 0
    if argv[1:] == ["run"]:  # a broker in the foreground, for trying things by hand
        import tempfile

        broker = KafkaBroker(Path(tempfile.mkdtemp(prefix="kafka-")))
        broker.start()
        print(f"Kafka {KAFKA_VERSION} on {broker.bootstrap} (pid {broker.proc and broker.proc.pid}); ^C stops it")
        try:
            while broker.running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        broker.stop()
        return 0
    print("usage: python -m tests.harness.kafka fetch|run", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
