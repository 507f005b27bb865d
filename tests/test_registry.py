"""The embedded device registry, through the real `tb-gateway device` commands and directly."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path
from typing import Any

import orjson
import pytest

from tb_gateway.attributes import AttributeStore
from tb_gateway.auth import AccessToken, MqttBasic
from tb_gateway.errors import RegistryError
from tb_gateway.registry import Registry, RegistryCredentials
from tests.gateway_process import GatewayProcess


@pytest.fixture
def cli(tmp_path: Path) -> GatewayProcess:
    return GatewayProcess(tmp_path / "cli")


def test_add_prints_a_random_token_list_and_remove(cli: GatewayProcess) -> None:
    token = cli.add_device("thermostat")
    assert len(token) >= 20 and token.isprintable() and " " not in token
    assert cli.add_device("meter", "MY_TOKEN_1", "--type", "power-meter") == "MY_TOKEN_1"
    rows = [orjson.loads(line) for line in cli.cli("device", "list", "--json").stdout.splitlines()]
    assert [(r["name"], r["type"], r["token"]) for r in rows] == [
        ("meter", "power-meter", "MY_TOKEN_1"),
        ("thermostat", "default", token),
    ]
    table = cli.cli("device", "list").stdout
    assert "thermostat" in table and token in table
    assert cli.cli("device", "remove", "meter").stdout.strip() == "removed meter"
    assert "meter" not in cli.cli("device", "list").stdout


def test_two_generated_tokens_differ(cli: GatewayProcess) -> None:
    assert cli.add_device("a") != cli.add_device("b")


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (["device", "add", "dup", "--token", "OTHER"], "a device named 'dup' already exists"),
        (["device", "add", "other", "--token", "TOKEN_X"], "access token is already used"),
        (["device", "remove", "ghost"], "no device named 'ghost'"),
        (["device", "add", "bad", "--token", "a/b"], "token must be non-empty"),
    ],
)
def test_refusals_are_clear_and_exit_non_zero(cli: GatewayProcess, second: list[str], message: str) -> None:
    cli.add_device("dup", "TOKEN_X")
    result = cli.cli(*second, check=False)
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stdout == ""


def test_mqtt_basic_credentials_resolve_in_thingsboards_order(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r.db")
    registry.add("basic", client_id="c1", username="u1", password="p1")
    registry.add("client-only", client_id="c2")
    registry.add("user-only", username="u3", password="p3")
    token_device = registry.add("token", token="TOK")
    source = RegistryCredentials(registry)

    def name(credentials: MqttBasic | AccessToken) -> str | None:
        identity = asyncio.run(source.lookup(credentials))
        return identity.name if identity else None

    assert name(MqttBasic("c1", "u1", "p1")) == "basic"
    assert name(MqttBasic("c1", "u1", "wrong")) is None
    assert name(MqttBasic("c2", "", "")) == "client-only"
    assert name(MqttBasic("any-client", "u3", "p3")) == "user-only"
    assert name(MqttBasic("any-client", "u3", "bad")) is None
    assert name(MqttBasic("whatever", "TOK", "ignored")) == "token"  # access token as user name
    assert name(AccessToken("TOK")) == "token"
    assert name(AccessToken("nope")) is None
    assert token_device.identity.token == "TOK"
    with pytest.raises(RegistryError, match="MQTT basic credentials are already used"):
        registry.add("again", client_id="c1", username="u1")


def test_data_version_changes_when_another_connection_writes(tmp_path: Path) -> None:
    gateway_side = Registry(tmp_path / "r.db")
    cli_side = Registry(tmp_path / "r.db")
    before = gateway_side.data_version()
    cli_side.add("new")
    assert gateway_side.data_version() != before


def test_a_transaction_commits_all_or_nothing(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r.db")
    with registry.transaction():
        for n in range(100):
            registry.add(f"bulk-{n}", token=f"BULK-{n}")
    assert len(registry.list()) == 100
    with pytest.raises(RegistryError), registry.transaction():
        registry.add("fine", token="FINE")
        registry.add("bulk-1")  # duplicate name: the whole transaction is rolled back
    assert registry.by_name("fine") is None


def _open_together(path: str, barrier: Any) -> None:
    barrier.wait()
    Registry(Path(path) / "registry.db").close()
    AttributeStore(Path(path) / "attributes.db").close()


def test_processes_creating_the_files_at_once_all_succeed(tmp_path: Path) -> None:
    """WORKERS=N start side by side: switching a new file to WAL must not fail with "database is locked"
    (SQLite refuses the second switch at once, without the busy timeout; it did ~1 in 10 starts)."""
    ctx = multiprocessing.get_context("fork")
    for attempt in range(60):
        barrier = ctx.Barrier(3)
        procs = [ctx.Process(target=_open_together, args=(str(tmp_path / str(attempt)), barrier)) for _ in range(3)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(30)
        assert [proc.exitcode for proc in procs] == [0] * 3, f"attempt {attempt}"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["line\nbreak"], "device name must not contain control characters"),
        (["tab\there"], "device name must not contain control characters"),
        (["x" * 256], "device name must be at most 255 characters (got 256)"),
        (["x" * 5000], "device name must be at most 255 characters (got 5000)"),
        (["ok", "--type", "a\nb"], "--type must not contain control characters"),
        (["ok", "--client-id", "c\x1b[2J"], "--client-id must not contain control characters"),
        (["ok", "--username", "u\r"], "--username must not contain control characters"),
        (["ok", "--token", "T\x7f"], "--token must not contain control characters"),
    ],
)
def test_names_with_control_characters_or_too_long_are_refused(
    cli: GatewayProcess, extra: list[str], message: str
) -> None:
    result = cli.cli("device", "add", *extra, check=False)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith(f"error: {message}") and len(result.stderr.splitlines()) == 1
    assert cli.cli("device", "list", "--json").stdout == ""


def test_longest_name_and_unicode_names_are_accepted(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry.db")
    for name in ("x" * 255, "Température salle 2", "датчик-1", "🌡️ sensor"):
        assert registry.add(name).name == name
    with pytest.raises(RegistryError, match="control characters"):
        registry.add("line\u2028separator")


@pytest.mark.parametrize("command", [["device", "add", "x"], ["device", "list"], ["device", "remove", "x"], ["run"]])
def test_registry_that_cannot_be_opened_is_one_line(cli: GatewayProcess, command: list[str]) -> None:
    """As with a read-only DATA_DIR: SQLite cannot open the file (here registry.db is a directory)."""
    (cli.data_dir / "registry.db").mkdir(parents=True)
    result = cli.cli(*command, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if not line.startswith("{")]  # `run` also logs JSON
    assert line == f"error: cannot open the device registry in DATA_DIR {cli.data_dir}: unable to open database file"


def test_unwritable_data_dir_is_named_as_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "registry.db").mkdir()
    monkeypatch.setattr("tb_gateway.registry.os.access", lambda path, mode: False)  # root writes anywhere
    with pytest.raises(RegistryError) as caught:
        Registry(data_dir / "registry.db")
    assert str(caught.value) == (
        f"cannot open the device registry in DATA_DIR {data_dir}: unable to open database file "
        "(the directory is not writable)"
    )
