"""Where records go once batched: the embedded store, Kafka or a ThingsBoard HTTP backend."""
