"""tb-gateway: a ThingsBoard-compatible device gateway (MQTT, HTTP, CoAP -> Kafka / ThingsBoard / embedded store)."""

__version__ = "0.1.0"
