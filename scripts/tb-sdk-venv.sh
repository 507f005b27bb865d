#!/usr/bin/env bash
# ThingsBoard's Python SDK (tb-mqtt-client) in its own virtualenv: it depends on tb-paho-mqtt-client, which
# installs the same `paho` package as paho-mqtt, so it must never share the project's venv. mmh3 is
# preinstalled because the SDK would otherwise pip-install it on the fly at import time.
# Usage: scripts/tb-sdk-venv.sh [VENV_DIR]   (default .cache/tb-sdk-venv; idempotent)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.cache/tb-sdk-venv}"
python="${PYTHON:-python3}"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import tb_device_mqtt, mmh3" 2>/dev/null; then
    exit 0
fi
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "tb-mqtt-client>=1.13" mmh3
"$venv/bin/python" -c "import tb_device_mqtt, mmh3; print('tb-mqtt-client ready in $venv')"
