"""All settings, read once at start-up from the environment and a ``.env`` file (docs/configuration.md).

The seed's variables keep their names and defaults; new ones follow the same style with the unit in the
name. A bad value stops start-up with one clear line per problem, naming the variable.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Annotated, Any

import orjson
from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tb_gateway.errors import ConfigError
from tb_gateway.ratelimit import format_limit, parse_limit


class LogFormat(enum.StrEnum):
    JSON = "json"
    TEXT = "text"


class LogLevel(enum.StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


class KafkaCompression(enum.StrEnum):
    NONE = "none"
    GZIP = "gzip"
    SNAPPY = "snappy"
    LZ4 = "lz4"
    ZSTD = "zstd"


class Protocol(enum.StrEnum):
    HTTP = "http"
    HTTPS = "https"


Port = Annotated[int, Field(ge=0, le=65535)]
Positive = Annotated[int, Field(gt=0)]
# every float setting is finite: `inf` / `nan` are refused (a "no limit" is spelled 0 where there is one)
# and a duration is at most ten years: a longer timer is no timer, and its milliseconds overflow (RPC expiry)
TEN_YEARS_S = 315_360_000.0
PositiveSeconds = Annotated[float, Field(gt=0, le=TEN_YEARS_S, allow_inf_nan=False)]
# a Kafka broker: host name or IPv4 address, or an IPv6 address in brackets, then the port
_BROKER = re.compile(r"(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", case_sensitive=False, extra="ignore", frozen=True
    )

    # --- backend connection (seed) ---
    tb_host: str = "localhost"
    tb_port: Port = 8080
    tb_protocol: Protocol = Protocol.HTTP
    gateway_access_token: str | None = None
    tb_http_enabled: bool = False  # forward to ThingsBoard's HTTP device API when Kafka is off
    tb_auth_enabled: bool | None = None  # check unknown tokens against ThingsBoard; unset = TB_HTTP_ENABLED
    tb_http_timeout_seconds: PositiveSeconds = 10.0  # per request; TB's own sync-session timeout is 10 s
    tb_http_max_retries: Annotated[int, Field(ge=0)] = 3  # retries per request; then the batch is spooled
    tb_http_retry_backoff_ms: Positive = 100  # first retry delay, doubled per attempt
    tb_http_retry_backoff_max_ms: Positive = 2000  # cap for one delay (and for a backend's Retry-After)
    tb_http_max_connections: Positive = 32  # keep-alive pool and concurrent requests to the backend

    # --- MQTT (seed + TLS and limits) ---
    mqtt_enabled: bool = True
    mqtt_bind_address: str = "0.0.0.0"
    mqtt_bind_port: Port = 1883
    mqtt_ssl_enabled: bool = False
    mqtt_ssl_bind_port: Port = 8883
    mqtt_ssl_cert_file: Path | None = None
    mqtt_ssl_key_file: Path | None = None
    mqtt_max_connections: Positive = 10000
    mqtt_max_inflight: Positive = 100  # PUBLISHes awaiting PUBACK per connection (reported by getSessionLimits)
    mqtt_max_topic_length: Positive = 1024
    mqtt_connect_timeout_seconds: PositiveSeconds = 10.0  # time allowed between accept and CONNECT

    # --- HTTP (seed + timeouts) ---
    http_enabled: bool = True
    http_bind_address: str = "0.0.0.0"
    http_bind_port: Port = 8081
    http_idle_timeout_seconds: PositiveSeconds = 60.0  # keep-alive connection with no request
    http_header_timeout_seconds: PositiveSeconds = 10.0  # slow-loris guard: whole head must arrive in this
    http_body_timeout_seconds: PositiveSeconds = 30.0  # whole body must arrive in this
    http_max_connections: Positive = 10000

    # --- CoAP (seed + timers) ---
    coap_enabled: bool = True
    coap_bind_address: str = "0.0.0.0"
    coap_bind_port: Port = 5683
    coap_piggyback_timeout_ms: Positive = 500  # ThingsBoard's COAP_PIGGYBACK_TIMEOUT
    coap_observer_check_seconds: PositiveSeconds = 86_400.0  # a silent observer is pinged (RFC 7641 §4.5: 24 h)

    # --- Kafka (seed) ---
    kafka_enabled: bool = True
    kafka_bootstrap_servers: Annotated[list[str], NoDecode] = ["localhost:9092"]
    kafka_topic_telemetry: str = "tb.telemetry"
    kafka_topic_attributes: str = "tb.attributes"
    kafka_topic_device_events: str = "tb.device-events"  # claim requests and device state events
    kafka_topic_rpc_requests: str = "tb.rpc.requests"  # client-side RPC requests from devices (uplink)
    kafka_topic_rpc_responses: str = "tb.rpc.responses"  # devices' RPC replies and every RPC's outcome (uplink)
    kafka_topic_server_rpc: str = "tb.rpc.server"  # downlink: server-side RPC requests to devices
    kafka_topic_shared_attributes: str = "tb.attributes.shared"  # downlink: shared attributes (compacted)
    kafka_topic_client_rpc_replies: str = "tb.rpc.client-replies"  # downlink: the backend's client-RPC replies
    kafka_downlink_enabled: bool = True  # consume the three downlink topics when KAFKA_ENABLED
    kafka_downlink_group_id: str = "tb-gateway"  # consumer group of the downlink topics
    kafka_linger_ms: Annotated[int, Field(ge=0, le=900_000)] = 1  # 0 = lowest latency; more = bigger batches
    kafka_compression: KafkaCompression = KafkaCompression.LZ4  # JSON shrinks ~3x; lz4 costs least CPU
    kafka_delivery_timeout_ms: Annotated[int, Field(ge=1000)] = 10_000  # then a record is spooled instead
    kafka_max_in_flight_batches: Positive = 3  # batches awaiting acks at once; fewer: lower latency (docs/pipeline.md)
    kafka_message_max_bytes: Annotated[int, Field(ge=1000)] = 1_000_000  # larger records are rejected

    # --- downlink: server-side RPC, shared attributes, client-side RPC, device state (docs/downlink.md) ---
    rpc_default_timeout_seconds: PositiveSeconds = 10.0  # an RPC without its own expiry; ThingsBoard's default
    rpc_max_timeout_seconds: PositiveSeconds = 86_400.0  # longest expiry accepted: pending RPCs live in memory
    rpc_max_pending_per_device: Positive = 100  # queued server-side RPCs per device; more are rejected
    client_side_rpc_timeout_seconds: PositiveSeconds = 60.0  # then {"error":"timeout"}; ThingsBoard's default
    client_side_rpc_max_pending: Positive = 10_000  # device->backend RPCs awaiting a reply, whole gateway
    device_inactivity_timeout_seconds: PositiveSeconds = 600.0  # ThingsBoard's DEFAULT_INACTIVITY_TIMEOUT
    device_state_max_devices: Positive = 1_000_000  # devices whose state is tracked at once (about 300 B each)

    # --- store and forward spool (DATA_DIR/spool/<sink>) ---
    spool_enabled: bool = True  # keep records in DATA_DIR while the backend is down, replay them later
    spool_max_bytes: Annotated[int, Field(ge=1_048_576)] = 1_073_741_824  # full -> visible refusals

    # --- pipeline and limits (seed + bounds) ---
    batch_size: Positive = 100
    batch_timeout: PositiveSeconds = 1.0
    # embedded store: batches start at most this often (group commit; one fdatasync costs ~45 µs of CPU)
    store_commit_interval: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.001
    # embedded store retention: whole 64 MiB segments go, oldest first (docs/records.md); 0 = no limit
    store_max_bytes: Annotated[int, Field(ge=0)] = 0
    # by age (hours; 0 = no limit); Kafka's default retention: 7 days
    store_retention_hours: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 168.0
    max_payload_size: Positive = 65536
    queue_max_records: Positive = 100_000  # pipeline bound: beyond it devices are refused (503 / 5.03 / 0x97)
    retry_after_seconds: Positive = 1  # Retry-After / Max-Age sent with an overload refusal
    json_type_cast_enabled: bool = True  # ThingsBoard's default: "42" is stored as the number 42
    json_max_string_value_length: Annotated[int, Field(ge=0)] = 0  # 0 = unlimited, as in ThingsBoard
    rate_limit_enabled: bool = False  # master switch of the per-device limits below
    rate_limit_requests_per_second: Positive = 100  # the messages limit ("N:1") when none more specific is set
    rate_limit_device_messages: str | None = None  # ThingsBoard format "capacity:seconds[,...]", e.g. "20:1,600:60"
    rate_limit_device_telemetry_messages: str | None = None
    rate_limit_device_telemetry_data_points: str | None = None
    rate_limit_max_devices: Positive = 1_000_000  # devices whose buckets are remembered at once (memory bound)

    # --- brute-force protection (ThingsBoard's transport IP limits; off by default as there) ---
    ip_block_enabled: bool = False
    ip_block_max_wrong_credentials: Positive = 10  # wrong credentials from one address before it is blocked
    ip_block_timeout_seconds: PositiveSeconds = 60.0  # how long it stays blocked; failures further apart than
    # this do not add up

    # --- scale-out (docs/scale-out.md) ---
    redis_url: str | None = None  # e.g. redis://redis:6379/0; shared credential cache and revocations; unset = off
    redis_key_prefix: str = "tbgw:"  # namespace of every key and channel, so gateways of several fleets can share
    redis_timeout_seconds: PositiveSeconds = 0.5  # per Redis command; beyond it the local cache answers alone
    workers: Annotated[int, Field(ge=1, le=256)] = 1  # processes sharing the ports (SO_REUSEPORT), one per core
    worker_index: Annotated[int, Field(ge=0)] | None = None  # set by the supervisor for each worker; not by hand

    # --- authentication ---
    auth_cache_ttl_seconds: PositiveSeconds = 3600.0
    auth_negative_cache_ttl_seconds: PositiveSeconds = 5.0
    auth_cache_max_entries: Positive = 1_000_000  # credentials remembered at once (about 450 B each)

    # --- operations ---
    data_dir: Path = Path("./data")
    metrics_port: Port = 9090
    metrics_bind_address: str = "0.0.0.0"
    admin_port: Port = 0  # localhost-only admin API for the CLI; 0 = pick a free port (written to DATA_DIR)
    log_level: LogLevel = LogLevel.INFO
    log_format: LogFormat = LogFormat.JSON
    shutdown_timeout_seconds: PositiveSeconds = 10.0

    @field_validator("kafka_bootstrap_servers", mode="before")
    @classmethod
    def _servers(cls, value: Any) -> Any:
        """Accept the seed's JSON list form and the plain comma-separated form."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return orjson.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _brokers(cls, value: list[str], info: ValidationInfo) -> list[str]:
        """host:port entries (Kafka's bootstrap.servers format); at least one when Kafka is on."""
        bad = [entry for entry in value if not _is_broker(entry)]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))}: expected host:port, e.g. kafka:9092")
        if not value and info.data.get("kafka_enabled"):
            raise ValueError("KAFKA_ENABLED=true needs at least one broker (host:port)")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        """redis-py's URL forms; blank means no Redis."""
        if value is None or not value.strip():
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"{value!r}: expected redis://host:port/db, rediss://... (TLS) or unix://path")
        return value

    @field_validator(
        "rate_limit_device_messages",
        "rate_limit_device_telemetry_messages",
        "rate_limit_device_telemetry_data_points",
    )
    @classmethod
    def _rate_limit(cls, value: str | None) -> str | None:
        """ThingsBoard's format, checked at start-up; blank means no limit."""
        if value is None or not value.strip():
            return None
        return format_limit(parse_limit(value))

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @property
    def tb_base_url(self) -> str:
        return f"{self.tb_protocol.value}://{self.tb_host}:{self.tb_port}"

    @property
    def tb_auth_active(self) -> bool:
        """Check tokens against ThingsBoard: as TB_AUTH_ENABLED says, by default whenever forwarding there."""
        return self.tb_http_enabled if self.tb_auth_enabled is None else self.tb_auth_enabled


def load_settings(**overrides: Any) -> Settings:
    """Read and validate every setting; raise ``ConfigError`` with one line per problem."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError([_describe(error) for error in exc.errors()]) from None
    except UnicodeDecodeError as exc:  # the environment is decoded by Python itself: this is the .env file
        raise ConfigError([_not_utf8(exc)]) from None
    except ValueError as exc:  # a list setting that is not valid JSON, raised before field validation
        raise ConfigError([str(exc)]) from None


def _describe(error: Any) -> str:
    name = "_".join(str(part) for part in error["loc"] if isinstance(part, str)).upper() or "SETTINGS"
    value = error.get("input")
    shown = f" (got {value!r})" if isinstance(value, str | int | float) else ""
    return f"{name}: {error['msg']}{shown}"


def _is_broker(entry: str) -> bool:
    match = _BROKER.fullmatch(entry)
    return match is not None and 0 < int(match.group(1)) < 65536


def _not_utf8(exc: UnicodeDecodeError) -> str:
    env_file = Settings.model_config.get("env_file")
    path = Path(env_file if isinstance(env_file, str | Path) else ".env").resolve()
    line = exc.object[: exc.start].count(b"\n") + 1
    return f"{path}: not UTF-8 text (line {line}: {exc.reason}, byte 0x{exc.object[exc.start]:02x}); save it as UTF-8"
