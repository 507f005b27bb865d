"""Prometheus metrics (docs/metrics.md lists every name, label and meaning).

One ``Metrics`` object per gateway process, on its own registry so tests can run several gateways in one
interpreter. The seed's five names are kept; the rest are what an operator needs to see overload coming.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tb_gateway.records import Record
from tb_gateway.sinks.base import Outcome

# Device send -> device ack; buckets centred on the p99 <= 5 ms target.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages_received = Counter(
            "tb_gateway_messages_received_total",
            "Device messages received (before validation), by transport",
            ["transport"],
            registry=r,
        )
        self.messages_sent = Counter(
            "tb_gateway_messages_sent_total",
            "Records the sink confirmed durable, by transport",
            ["transport"],
            registry=r,
        )
        self.devices_connected = Gauge(
            "tb_gateway_devices_connected",
            "Devices with a live session (MQTT connections, CoAP observations, HTTP long polls)",
            ["transport"],
            registry=r,
        )
        self.auth_failures = Counter(
            "tb_gateway_auth_failures_total",
            "Requests or connections refused for unknown or wrong credentials",
            ["transport"],
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
        self.ack_latency = Histogram(
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
        self.kafka_delivery_latency = Histogram(
            "tb_gateway_kafka_delivery_latency_seconds",
            "Time from producing a record to Kafka's acknowledgement (acks=all)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.kafka_records = Counter(
            "tb_gateway_kafka_records_total",
            "Records produced to Kafka, by topic and result (delivered, rejected, failed)",
            ["topic", "result"],
            registry=r,
        )

    def count_sent(self, records: Sequence[Record], outcomes: Sequence[Outcome]) -> None:
        delivered: Tally[str] = Tally()
        failed: Tally[str] = Tally()
        for record, outcome in zip(records, outcomes, strict=True):
            if outcome is Outcome.DELIVERED:
                delivered[record.transport.value] += 1
            else:
                failed[outcome.value] += 1
        for transport, n in delivered.items():
            self.messages_sent.labels(transport=transport).inc(n)
        for outcome_name, n in failed.items():
            self.records_failed.labels(outcome=outcome_name).inc(n)

    def refused(self, transport: str, reason: str) -> None:
        self.refusals.labels(transport=transport, reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
