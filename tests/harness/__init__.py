"""Test harnesses that start real servers (Kafka, ...) on free 127.0.0.1 ports and stop them by PID."""
