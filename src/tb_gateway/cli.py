"""The ``tb-gateway`` command: ``run``, ``device add|list|remove``, ``messages``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from tb_gateway import __version__
from tb_gateway.config import Settings, load_settings
from tb_gateway.errors import ConfigError, RegistryError
from tb_gateway.registry import Registry
from tb_gateway.sinks.store import read_messages

FOLLOW_POLL_S = 0.2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tb-gateway", description="ThingsBoard-compatible device gateway (MQTT, HTTP, CoAP)."
    )
    parser.add_argument("--version", action="version", version=f"tb-gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("run", help="run the gateway (settings from the environment and .env)")

    device = commands.add_parser("device", help="manage the embedded device registry").add_subparsers(
        dest="device_command", required=True
    )
    add = device.add_parser("add", help="register a device and print its access token")
    add.add_argument("name")
    add.add_argument("--token", help="access token to use (default: a random 20-character token)")
    add.add_argument("--type", default="default", help="device type (default: default)")
    add.add_argument("--client-id", help="MQTT basic credentials: client id")
    add.add_argument("--username", help="MQTT basic credentials: user name")
    add.add_argument("--password", help="MQTT basic credentials: password")
    listing = device.add_parser("list", help="list registered devices")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    remove = device.add_parser("remove", help="remove a device")
    remove.add_argument("name")

    messages = commands.add_parser("messages", help="print the records kept in the embedded store")
    messages.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    messages.add_argument("--json", action="store_true", help="one JSON object per line")
    messages.add_argument("--device", help="only this device's records")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"configuration error: {problem}", file=sys.stderr)
        return 2
    handler = _HANDLERS[args.command if args.command != "device" else f"device {args.device_command}"]
    try:
        return handler(settings, args)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from tb_gateway.app import run
    from tb_gateway.logs import setup_logging

    setup_logging(settings.log_level.value, settings.log_format.value)
    try:
        run(settings)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"configuration error: {problem}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _registry(settings: Settings) -> Registry:
    return Registry(settings.data_dir / "registry.db")


def _device_add(settings: Settings, args: argparse.Namespace) -> int:
    device = _registry(settings).add(
        args.name,
        token=args.token,
        device_type=args.type,
        client_id=args.client_id,
        username=args.username,
        password=args.password,
    )
    print(device.token if device.token is not None else f"added {device.name} (MQTT basic credentials)")
    return 0


def _device_list(settings: Settings, args: argparse.Namespace) -> int:
    devices = _registry(settings).list()
    if args.json:
        for d in devices:
            row = {"name": d.name, "id": d.id, "type": d.type, "token": d.token, "client_id": d.client_id}
            row["username"] = d.username
            print(orjson.dumps(row).decode())
        return 0
    print(f"{'NAME':<24} {'TYPE':<12} {'TOKEN':<24} ID")
    for d in devices:
        credential = d.token or f"basic:{d.client_id or ''}/{d.username or ''}"
        print(f"{d.name:<24} {d.type:<12} {credential:<24} {d.id}")
    return 0


def _device_remove(settings: Settings, args: argparse.Namespace) -> int:
    device = _registry(settings).remove(args.name)
    print(f"removed {device.name}")
    return 0


def _messages(settings: Settings, args: argparse.Namespace) -> int:
    path = settings.data_dir / "messages.db"
    show: Callable[[dict[str, Any]], str] = _as_json if args.json else _as_text
    last = 0
    while True:
        for message in read_messages(path, after_seq=last, device=args.device):
            last = message.pop("seq")
            print(show(message), flush=True)
        if not args.follow:
            return 0
        time.sleep(FOLLOW_POLL_S)


def _as_json(message: dict[str, Any]) -> str:
    return orjson.dumps(message).decode()


def _as_text(message: dict[str, Any]) -> str:
    when = datetime.fromtimestamp(message["ts"] / 1000, UTC).isoformat(timespec="milliseconds")
    values = orjson.dumps(message["values"]).decode()
    return f"{when}  {message['device']:<16} {message['kind']:<10} {message['transport']:<4}  {values}"


_HANDLERS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "run": _run,
    "device add": _device_add,
    "device list": _device_list,
    "device remove": _device_remove,
    "messages": _messages,
}
