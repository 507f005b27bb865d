# tb-gateway for production-like runs (docs/scale-out.md, "Docker"). The install step is the Makefile's, the
# one `make run` uses, so CI exercises it on every `make test` (tests/test_docker.py checks they match).
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends make gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/tb-gateway
COPY pyproject.toml setup.py Makefile README.md ./
COPY src ./src
RUN make install PYTHON=python3

# Devices: MQTT, HTTP, CoAP (udp); Prometheus metrics.
EXPOSE 1883 8081 5683/udp 9090
ENV DATA_DIR=/data \
    LOG_FORMAT=json
VOLUME ["/data"]
RUN useradd --system --home-dir /data gateway && mkdir -p /data && chown gateway /data
USER gateway
ENTRYPOINT ["/opt/tb-gateway/.venv/bin/tb-gateway"]
CMD ["run"]
