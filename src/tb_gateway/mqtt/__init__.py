"""MQTT 3.1 / 3.1.1 / 5.0 device endpoint: sans-IO codec and session, asyncio adapter (docs/mqtt.md)."""
