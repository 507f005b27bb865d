"""The ``tb-gateway`` command: ``run``, ``device add|list|remove``, ``messages``, ``rpc``, ``attributes``."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson

from tb_gateway import __version__
from tb_gateway.config import Settings, load_settings
from tb_gateway.errors import ConfigError, RegistryError
from tb_gateway.records import RecordKind
from tb_gateway.registry import Registry
from tb_gateway.sinks.store import read_messages

FOLLOW_POLL_S = 0.2
E = TypeVar("E", bound=BaseException)
# `messages` shows what devices sent unless asked for more (RPC and device state records: --kind, --all)
DEVICE_KINDS = (RecordKind.TELEMETRY.value, RecordKind.ATTRIBUTES.value, RecordKind.CLAIM.value)


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
    messages.add_argument(
        "--kind",
        action="append",
        choices=[k.value for k in RecordKind],
        help="only records of this kind (repeatable; default: what devices sent: " + ", ".join(DEVICE_KINDS) + ")",
    )
    messages.add_argument("--all", action="store_true", help="every kind, RPC and device state records included")

    rpc = commands.add_parser("rpc", help="send a server-side RPC to a device and print its reply")
    rpc.add_argument("device", help="device name")
    rpc.add_argument("method")
    rpc.add_argument("params", nargs="?", default="null", help="JSON (default: null)")
    rpc.add_argument("--oneway", action="store_true", help="expect no reply: done once delivered")
    rpc.add_argument("--timeout", type=float, help="seconds until the RPC expires (default: RPC_DEFAULT_TIMEOUT)")

    attrs = commands.add_parser("attributes", help="change a device's shared attributes").add_subparsers(
        dest="attributes_command", required=True
    )
    attr_set = attrs.add_parser("set", help="set shared attributes (value: JSON, else text)")
    attr_set.add_argument("device")
    attr_set.add_argument("pairs", nargs="+", metavar="key=value")
    attr_delete = attrs.add_parser("delete", help="delete shared attributes")
    attr_delete.add_argument("device")
    attr_delete.add_argument("keys", nargs="+", metavar="key")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"configuration error: {problem}", file=sys.stderr)
        return 2
    sub = {"device": "device_command", "attributes": "attributes_command"}.get(args.command)
    handler = _HANDLERS[f"{args.command} {getattr(args, sub)}" if sub else args.command]
    try:
        code = handler(settings, args)
        sys.stdout.flush()  # here, not at exit: a reader that went away (`| head`) is handled below
        return code
    except (RegistryError, AdminError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """stdout's reader exited (`tb-gateway messages | head -1`): stop quietly, as Unix tools do.

    Python would still flush stdout at exit and print a second BrokenPipeError, so stdout is pointed at
    /dev/null first (the Python docs' recipe, "Note on SIGPIPE"). The exit code is a SIGPIPE death's, 128 + 13.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from tb_gateway.app import run
    from tb_gateway.logs import setup_logging

    setup_logging(settings.log_level.value, settings.log_format.value)
    # Start-up problems raised while the gateway's TaskGroup runs (a busy port, TLS files, a bind address
    # that does not resolve) arrive wrapped in an ExceptionGroup: except* unwraps them (and bare ones alike).
    code = 0
    try:
        run(settings)
    except* ConfigError as group:
        for exc in _leaves(group):
            for problem in exc.problems:
                print(f"configuration error: {problem}", file=sys.stderr)
        code = 2
    except* OSError as group:
        for os_error in _leaves(group):
            print(f"error: cannot start: {os_error}", file=sys.stderr)
        code = code or 1
    return code


def _leaves(group: BaseExceptionGroup[E]) -> list[E]:
    """The exceptions of a (possibly nested) group."""
    leaves: list[E] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


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
    if settings.redis_url:
        _revoke_everywhere(settings, device.id)
    return 0


def _revoke_everywhere(settings: Settings, device_id: str) -> None:
    """REDIS_URL set: every gateway instance drops the device's cached credentials and closes its sessions."""
    import asyncio

    from redis.exceptions import RedisError

    from tb_gateway.redis_cache import revoke_device

    assert settings.redis_url is not None
    try:
        heard = asyncio.run(revoke_device(settings.redis_url, device_id, settings.redis_key_prefix))
    except (RedisError, OSError) as exc:
        print(f"warning: Redis unreachable, other instances keep their cached credentials: {exc}", file=sys.stderr)
        return
    print(f"revoked on {heard} gateway instance(s)")


def _messages(settings: Settings, args: argparse.Namespace) -> int:
    path = settings.data_dir / "messages"
    if not path.is_dir() and not args.follow:  # run elsewhere, or another DATA_DIR: say where it looked
        print(f"no embedded store in DATA_DIR={settings.data_dir} (no {path}/ yet)", file=sys.stderr)
    show: Callable[[dict[str, Any]], str] = _as_json if args.json else _as_text
    last = 0
    while True:
        kinds = None if args.all else args.kind or DEVICE_KINDS
        for message in read_messages(path, after_seq=last, device=args.device, kinds=kinds):
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


class AdminError(Exception):
    """The running gateway's admin API could not be reached or refused the request."""


def _admin(settings: Settings, path: str, body: dict[str, Any], timeout_s: float) -> tuple[int, dict[str, Any]]:
    """POST to the running gateway's admin API (localhost; docs/downlink.md); (status, JSON answer).

    With WORKERS=N every worker has one: an RPC goes to the worker that holds the device's session (worker 0
    when none does), a shared-attribute change to every worker (each pushes to its own sessions).
    """
    from tb_gateway.admin import admin_ports

    ports = admin_ports(settings.data_dir, settings.admin_port, settings.workers)
    if not ports:
        raise AdminError(f"the gateway is not running (no {settings.data_dir / 'admin.json'})")
    if len(ports) == 1:
        return _call(ports[0], path, body, timeout_s)
    if path == "/api/rpc":
        holder = next((port for port in ports if _holds(port, str(body["device"]))), ports[0])
        return _call(holder, path, body, timeout_s)
    answers = [_call(port, path, body, timeout_s) for port in ports]
    return next((answer for answer in answers if answer[1].get("pushed") is not None), answers[0])


def _holds(port: int, device: str) -> bool:
    from urllib.parse import quote

    status, answer = _call(port, f"/api/devices/{quote(device, safe='')}", None, 10)
    return status == 200 and bool(answer.get("sessions"))


def _call(port: int, path: str, body: dict[str, Any] | None, timeout_s: float) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    from tb_gateway.admin import HOST

    data = None if body is None else orjson.dumps(body)
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", data=data)
    request.add_header("Content-Type", "application/json")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost: never via a proxy
    try:
        with opener.open(request, timeout=timeout_s) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read() or b"{}")
    except (urllib.error.URLError, OSError) as exc:
        raise AdminError(f"the gateway is not running or not answering at {HOST}:{port} ({exc})") from None


def _json_arg(text: str, what: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        raise AdminError(f"{what} is not JSON: {text!r}") from None


def _rpc(settings: Settings, args: argparse.Namespace) -> int:
    timeout_s = args.timeout if args.timeout is not None else settings.rpc_default_timeout_seconds
    if not (math.isfinite(timeout_s) and timeout_s > 0):  # inf / nan: no RPC expiry can be made of them
        raise AdminError(f"--timeout must be positive and finite (seconds), not {timeout_s}")
    body = {
        "device": args.device,
        "method": args.method,
        "params": _json_arg(args.params, "PARAMS_JSON"),
        "oneway": args.oneway,
        "timeout_ms": max(1, round(timeout_s * 1000)),
    }
    status, answer = _admin(settings, "/api/rpc", body, timeout_s + 10)
    if status == 200:
        print(orjson.dumps(answer["response"]).decode() if answer["status"] == "replied" else answer["status"])
        return 0
    what = answer.get("status") or answer.get("error", f"HTTP {status}")
    print(f"error: RPC {args.method} to {args.device}: {what}", file=sys.stderr)
    return 1


def _attributes_change(settings: Settings, device: str, change: dict[str, Any]) -> int:
    status, answer = _admin(settings, "/api/attributes", {"device": device, **change}, 30)
    if status != 200:
        print(f"error: {answer.get('error', f'HTTP {status}')}", file=sys.stderr)
        return 1
    print(orjson.dumps(answer["pushed"]).decode() if answer["pushed"] is not None else "no change")
    return 0


def _attributes_set(settings: Settings, args: argparse.Namespace) -> int:
    update: dict[str, Any] = {}
    for pair in args.pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise AdminError(f"expected key=value, got {pair!r}")
        try:
            update[key] = orjson.loads(text)
        except orjson.JSONDecodeError:
            update[key] = text  # not JSON: a string, as typed
    return _attributes_change(settings, args.device, {"update": update})


def _attributes_delete(settings: Settings, args: argparse.Namespace) -> int:
    return _attributes_change(settings, args.device, {"delete": args.keys})


_HANDLERS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "run": _run,
    "device add": _device_add,
    "device list": _device_list,
    "device remove": _device_remove,
    "messages": _messages,
    "rpc": _rpc,
    "attributes set": _attributes_set,
    "attributes delete": _attributes_delete,
}
