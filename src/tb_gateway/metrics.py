"""Prometheus metrics (docs/metrics.md lists every name, label and meaning).

One ``Metrics`` object per gateway process, on its own registry so tests can run several gateways in one
interpreter. The seed's five names are kept; the rest are what an operator needs to see overload coming.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Sequence
from operator import attrgetter

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from tb_gateway.fastmetrics import FastCounter, FastHistogram
from tb_gateway.records import Record, RecordKind, Transport
from tb_gateway.sinks.base import Outcome

_KIND_TRANSPORT = attrgetter("kind", "transport")

try:  # the tally of a delivered batch in C (setup.py builds it where a compiler is present)
    from tb_gateway._speedups import sent_by_transport as _sent_by_transport
except ImportError:  # pragma: no cover - collections.Counter below does the same
    _sent_by_transport = None  # type: ignore[assignment]

# Device send -> device ack; buckets centred on the p99 <= 5 ms target.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages_received = FastCounter(
            "tb_gateway_messages_received_total",
            "Device messages received (before validation), by transport",
            ["transport"],
            registry=r,
        )
        self.messages_sent = FastCounter(
            "tb_gateway_messages_sent_total",
            "Device records the sink confirmed durable, by transport (gateway-made device-state events excluded)",
            ["transport"],
            registry=r,
        )
        self.devices_connected = Gauge(
            "tb_gateway_devices_connected",
            "Devices with a live connection (MQTT sessions; long polls and observations are downlink subscriptions)",
            ["transport"],
            registry=r,
        )
        self.auth_failures = Counter(
            "tb_gateway_auth_failures_total",
            "Requests or connections refused for unknown or wrong credentials",
            ["transport"],
            registry=r,
        )
        self.auth_blocked = Counter(
            "tb_gateway_auth_blocked_total",
            "Requests or connections refused unchecked: their address is blocked for repeated wrong credentials",
            ["transport"],
            registry=r,
        )
        self.rate_limited = Counter(
            "tb_gateway_rate_limited_total",
            "Device messages refused by a per-device rate limit, by transport and limit "
            "(messages, telemetry_messages, telemetry_data_points)",
            ["transport", "limit"],
            registry=r,
        )
        self.redis_up = Gauge(
            "tb_gateway_redis_up",
            "1 while the shared Redis credential cache answers, 0 while the gateway runs on its local cache",
            registry=r,
        )
        self.revocations = Counter(
            "tb_gateway_revocations_total",
            "Device revocations applied (cached credentials dropped, live sessions closed), by origin",
            ["origin"],
            registry=r,
        )
        self.errors = Counter(
            "tb_gateway_errors_total",
            "Internal errors (sink failures, unexpected exceptions), by component",
            ["component"],
            registry=r,
        )
        self.refusals = Counter(
            "tb_gateway_refusals_total",
            "Device messages refused, by transport and reason",
            ["transport", "reason"],
            registry=r,
        )
        self.records_failed = Counter(
            "tb_gateway_records_failed_total",
            "Records the sink did not make durable, by outcome",
            ["outcome"],
            registry=r,
        )
        self.queue_depth = Gauge("tb_gateway_queue_depth", "Records waiting in the pipeline queue", registry=r)
        self.ack_latency = FastHistogram(
            "tb_gateway_ack_latency_seconds",
            "Time from a device message being read to its acknowledgement being written",
            ["transport"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.connections = Counter(
            "tb_gateway_connections_total",
            "Connections accepted (MQTT, HTTP), by transport",
            ["transport"],
            registry=r,
        )
        self.thingsboard_requests = Counter(
            "tb_gateway_thingsboard_requests_total",
            "HTTP requests to the ThingsBoard backend, by purpose (telemetry, attributes, claim, auth) and "
            "result (status code, or 'error' when no answer came)",
            ["endpoint", "result"],
            registry=r,
        )
        self.store_segments_removed = Counter(
            "tb_gateway_store_segments_removed_total",
            "Embedded store segments removed by retention, by the limit that removed them (size or age)",
            ["reason"],
            registry=r,
        )
        # --- store and forward (sinks/reliable.py) and Kafka (sinks/kafka.py) ---
        self.spool_records = Gauge(
            "tb_gateway_spool_records", "Records waiting in the local spool, by sink", ["sink"], registry=r
        )
        self.spool_bytes = Gauge(
            "tb_gateway_spool_bytes",
            "Bytes of records waiting in the local spool, by sink",
            ["sink"],
            registry=r,
        )
        self.spool_oldest_age = Gauge(
            "tb_gateway_spool_oldest_age_seconds",
            "Age (since the gateway received it) of the oldest record in the spool; 0 when empty",
            ["sink"],
            registry=r,
        )
        self.spool_appended = Counter(
            "tb_gateway_spool_appended_total",
            "Records written to the spool because the backend was down or failing, by sink",
            ["sink"],
            registry=r,
        )
        self.spool_replayed = Counter(
            "tb_gateway_spool_replayed_total",
            "Spooled records the backend took on replay, by sink",
            ["sink"],
            registry=r,
        )
        # observed in the poll thread per record (in C by _kafka_lane.c's DeliveryReport): no lock of its own
        self.kafka_delivery_latency = FastHistogram(
            "tb_gateway_kafka_delivery_latency_seconds",
            "Time from producing a record to Kafka's acknowledgement (acks=all)",
            [],
            buckets=LATENCY_BUCKETS,
            registry=r,
        ).labels()
        self.kafka_records = Counter(
            "tb_gateway_kafka_records_total",
            "Records produced to Kafka, by topic and result (delivered, rejected, failed)",
            ["topic", "result"],
            registry=r,
        )

        # --- downlink: RPC, shared attributes, device state (downlink/, docs/downlink.md) ---
        self.rpc_outcomes = Counter(
            "tb_gateway_rpc_total",
            "Server-side RPC steps by status: delivered, replied, expired, timeout, rejected, cancelled; "
            "unmatched_reply counts device replies no pending request matched",
            ["status"],
            registry=r,
        )
        self.rpc_pending = Gauge("tb_gateway_rpc_pending", "Server-side RPC requests not yet finished", registry=r)
        self.client_rpc = Counter(
            "tb_gateway_client_rpc_total",
            "Client-side RPC requests by result: replied, timeout, refused, local (getSessionLimits)",
            ["result"],
            registry=r,
        )
        self.shared_attribute_updates = Counter(
            "tb_gateway_shared_attribute_updates_total",
            "Shared-attribute changes applied to the attribute store",
            registry=r,
        )
        self.downlink_pushes = Counter(
            "tb_gateway_downlink_pushes_total",
            "Messages pushed down to device sessions, by kind (rpc, attributes)",
            ["kind"],
            registry=r,
        )
        self.downlink_subscriptions = Gauge(
            "tb_gateway_downlink_subscriptions",
            "Live device sessions subscribed to a downlink feature (rpc, attributes)",
            ["feature"],
            registry=r,
        )
        self.device_state_events = Counter(
            "tb_gateway_device_state_events_total",
            "Device state events by event: connect, disconnect, activity, inactivity",
            ["event"],
            registry=r,
        )
        self.device_states_forgotten = Counter(
            "tb_gateway_device_states_forgotten_total",
            "Dormant devices whose state was forgotten to stay within DEVICE_STATE_MAX_DEVICES",
            registry=r,
        )
        self.devices_active = Gauge(
            "tb_gateway_devices_active", "Devices active now (ThingsBoard's 'active' attribute)", registry=r
        )
        self.downlink_records_failed = Counter(
            "tb_gateway_downlink_records_failed_total",
            "RPC outcome, client-RPC request and device state records the pipeline did not store, by kind and outcome",
            ["kind", "outcome"],
            registry=r,
        )
        self.downlink_consumed = Counter(
            "tb_gateway_downlink_consumed_total",
            "Downlink Kafka records read, by topic and result (applied, invalid, unmatched)",
            ["topic", "result"],
            registry=r,
        )

    def count_sent(self, records: Sequence[Record], outcomes: Sequence[Outcome]) -> None:
        """Count a settled batch; tallies by (kind, transport[, outcome]) run in C, not a Python loop."""
        if outcomes.count(Outcome.DELIVERED) == len(outcomes):  # the common case: everything durable
            # device-state records are made by the gateway, not sent by a device: not counted
            for transport, n in self._sent_by_transport(records).items():
                self.messages_sent.labels(transport=transport.value).inc(n)
            return
        for (kind, transport), outcome in zip(map(_KIND_TRANSPORT, records), outcomes, strict=True):
            if kind is RecordKind.DEVICE_STATE:
                continue
            if outcome is Outcome.DELIVERED:
                self.messages_sent.labels(transport=transport.value).inc()
            else:
                self.records_failed.labels(outcome=outcome.value).inc()

    @staticmethod
    def _sent_by_transport(records: Sequence[Record]) -> dict[Transport, int]:
        if _sent_by_transport is not None and type(records) is list:
            return _sent_by_transport(records, RecordKind.DEVICE_STATE)
        tally: Tally[Transport] = Tally()
        for (kind, transport), n in Tally(map(_KIND_TRANSPORT, records)).items():
            if kind is not RecordKind.DEVICE_STATE:
                tally[transport] += n
        return tally

    def refused(self, transport: str, reason: str) -> None:
        self.refusals.labels(transport=transport, reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
