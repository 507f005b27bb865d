"""Runs ThingsBoard's ``tb-mqtt-client`` SDK against a gateway; executed by the SDK's own virtualenv.

Usage: python mqtt_sdk_client.py HOST PORT TOKEN -> one JSON line describing what the SDK saw.
(A separate interpreter: the SDK's ``tb-paho-mqtt-client`` and the project's ``paho-mqtt`` clash.)
"""

import json
import sys
import threading
import time

from tb_device_mqtt import TBDeviceMqttClient


def main() -> None:
    host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    out = {}
    connected = threading.Event()

    def on_connect(client, userdata, flags, result_code, *extra, **kwargs):
        out["connack"] = result_code.value if hasattr(result_code, "value") else result_code
        connected.set()

    client = TBDeviceMqttClient(host, port=port, username=token)
    # The SDK stores the callback only after starting its network thread (tb_device_mqtt.connect), so a server
    # that answers CONNECT fast enough sees the CONNACK handled before the callback exists, and it is never
    # called. Set it first; connect() then sets the same one again.
    client._TBDeviceMqttClient__connect_callback = on_connect
    client.connect(callback=on_connect)
    try:
        connected.wait(30)
        if out.get("connack") != 0:
            print(json.dumps(out))
            return
        deadline = time.monotonic() + 10
        while not client.rate_limits_received and time.monotonic() < deadline:
            time.sleep(0.05)
        out["limits_applied"] = client.rate_limits_received  # the getSessionLimits reply was applied
        out["max_payload_size"] = client.max_payload_size
        out["telemetry_rc"] = client.send_telemetry({"sdk_temp": 22.5, "sdk_on": True}).get()
        out["attributes_rc"] = client.send_attributes({"sdk_fw": "v-sdk"}).get()
        got = threading.Event()

        def on_attributes(content, exception, *args):
            out["attributes"] = content
            out["attributes_error"] = None if exception is None else str(exception)
            got.set()

        client.request_attributes(client_keys=["sdk_fw"], callback=on_attributes)
        got.wait(10)
        replied = threading.Event()

        def on_rpc(request_id, content, exception, *args):
            out["rpc"] = content
            replied.set()

        client.send_rpc_call("getCurrentTime", {}, on_rpc)
        replied.wait(10)
        out["connected_at_end"] = client.is_connected()
    finally:
        client.stop()
        client.disconnect()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
