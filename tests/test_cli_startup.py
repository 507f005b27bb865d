"""Start-up problems found once start-up is under way (TLS files, busy ports, bind addresses that do not resolve):
one line naming what is wrong, the right exit code, and everything started before the failure stopped again."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tb_gateway.app import Gateway
from tb_gateway.config import load_settings
from tb_gateway.errors import ConfigError
from tests.gateway_process import GatewayProcess
from tests.harness.ports import free_port


@pytest.fixture
def gateway(tmp_path: Path) -> GatewayProcess:
    # ERROR: the start-up problem is then the only line on stderr
    return GatewayProcess(tmp_path / "gw", {"LOG_LEVEL": "ERROR"})


def start_up_lines(gateway: GatewayProcess, expected_code: int) -> list[str]:
    result = gateway.cli("run", check=False)
    assert "Traceback" not in result.stderr
    assert result.returncode == expected_code, result.stderr
    return result.stderr.splitlines()


@pytest.fixture
def busy_tcp() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", free_port()))
        holder.listen()
        yield holder.getsockname()[1]


def test_tls_without_certificate_is_a_configuration_error(gateway: GatewayProcess) -> None:
    gateway.overrides["MQTT_SSL_ENABLED"] = "true"
    assert start_up_lines(gateway, 2) == [
        "configuration error: MQTT_SSL_ENABLED: needs MQTT_SSL_CERT_FILE and MQTT_SSL_KEY_FILE"
    ]


def test_missing_certificate_file_is_a_configuration_error_naming_it(gateway: GatewayProcess, tmp_path: Path) -> None:
    key = tmp_path / "present.key"
    key.write_text("not a key")
    gateway.overrides |= {
        "MQTT_SSL_ENABLED": "true",
        "MQTT_SSL_CERT_FILE": str(tmp_path / "absent.pem"),
        "MQTT_SSL_KEY_FILE": str(key),
    }
    [line] = start_up_lines(gateway, 2)
    assert line == f"configuration error: MQTT_SSL_CERT_FILE: no such file: {tmp_path / 'absent.pem'}"


def test_unloadable_certificate_files_are_a_configuration_error(gateway: GatewayProcess, tmp_path: Path) -> None:
    for name in ("bad.pem", "bad.key"):
        (tmp_path / name).write_text("not PEM")
    gateway.overrides |= {
        "MQTT_SSL_ENABLED": "true",
        "MQTT_SSL_CERT_FILE": str(tmp_path / "bad.pem"),
        "MQTT_SSL_KEY_FILE": str(tmp_path / "bad.key"),
    }
    [line] = start_up_lines(gateway, 2)
    assert line.startswith("configuration error: MQTT_SSL_CERT_FILE / MQTT_SSL_KEY_FILE: cannot load: ")


@pytest.mark.parametrize("transport", ["HTTP", "MQTT"])
def test_busy_tcp_port_is_one_line_naming_the_listener(gateway: GatewayProcess, busy_tcp: int, transport: str) -> None:
    gateway.overrides[f"{transport}_BIND_PORT"] = str(busy_tcp)
    [line] = start_up_lines(gateway, 1)
    assert line.startswith(f"error: cannot start: {transport} listener (")
    assert f"{transport}_BIND_PORT={busy_tcp}" in line and "address already in use" in line


def test_busy_coap_port_is_one_line_naming_the_listener(gateway: GatewayProcess) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", gateway.coap_port))
        [line] = start_up_lines(gateway, 1)
    assert line.startswith("error: cannot start: COAP listener (")
    assert f"COAP_BIND_PORT={gateway.coap_port}" in line


def test_busy_metrics_port_names_the_setting(gateway: GatewayProcess, busy_tcp: int) -> None:
    gateway.metrics_port = busy_tcp
    [line] = start_up_lines(gateway, 1)
    assert line.startswith("error: cannot start: metrics endpoint (")
    assert f"METRICS_PORT={busy_tcp}" in line


def test_unresolvable_bind_address_is_one_line(gateway: GatewayProcess) -> None:
    gateway.overrides["HTTP_BIND_ADDRESS"] = "no-such-host.invalid"  # RFC 6761: never resolves
    [line] = start_up_lines(gateway, 1)
    assert line.startswith("error: cannot start: HTTP listener (HTTP_BIND_ADDRESS=no-such-host.invalid, ")


def test_what_started_before_the_failure_is_stopped(tmp_path: Path) -> None:
    """The HTTP listener, MQTT's plain listener and the admin API were up when the TLS listener failed: all
    are closed (their ports bindable again, admin.json gone) by the time the error arrives."""
    http_port, mqtt_port, admin_port = free_port(), free_port(), free_port()
    settings = load_settings(
        data_dir=tmp_path,
        kafka_enabled=False,
        http_bind_address="127.0.0.1",
        http_bind_port=http_port,
        mqtt_bind_address="127.0.0.1",
        mqtt_bind_port=mqtt_port,
        mqtt_ssl_enabled=True,
        mqtt_ssl_bind_port=free_port(),
        coap_bind_address="127.0.0.1",
        coap_bind_port=free_port(socket.SOCK_DGRAM),
        metrics_bind_address="127.0.0.1",
        metrics_port=free_port(),
        admin_port=admin_port,
    )

    async def main() -> None:
        gateway = Gateway(settings)
        with pytest.raises(ExceptionGroup) as caught:
            async with asyncio.timeout(30):
                await gateway.run()
        assert caught.group_contains(ConfigError)
        for port in (http_port, mqtt_port, admin_port):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port))  # OSError if still listening
        assert not (tmp_path / "admin.json").exists()
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        assert not tasks, tasks

    asyncio.run(main())
