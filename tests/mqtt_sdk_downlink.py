"""ThingsBoard's ``tb-mqtt-client`` SDK as a downlink client; executed by the SDK's own virtualenv.

Usage: python mqtt_sdk_downlink.py HOST PORT TOKEN RPC_COUNT ATTRIBUTE_COUNT
Prints one JSON line per event as it happens ({"event": "connected" | "rpc" | "attributes" | "client_rpc" |
"shared" | "done", ...}), so the test can drive the gateway between them. Server-side RPCs are answered
``{"echo": <params>, "method": <method>}``. After ``connected`` it makes one client-side RPC (``getTime``)
and one attribute request for the shared key ``target``; it stops after RPC_COUNT server-side RPCs,
ATTRIBUTE_COUNT shared-attribute updates and the client-side RPC's answer, or after 60 s.
"""

import json
import sys
import threading
import time

from tb_device_mqtt import TBDeviceMqttClient


def say(**event):
    print(json.dumps(event), flush=True)


def main() -> None:
    host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    rpc_count, attribute_count = int(sys.argv[4]), int(sys.argv[5])
    connected = threading.Event()
    seen = {"rpc": 0, "attributes": 0, "client_rpc": 0}
    done = threading.Event()
    lock = threading.Lock()

    def count(kind):
        with lock:
            seen[kind] += 1
            if seen["rpc"] >= rpc_count and seen["attributes"] >= attribute_count and seen["client_rpc"]:
                done.set()

    def on_connect(client, userdata, flags, result_code, *extra, **kwargs):
        connected.set()

    client = TBDeviceMqttClient(host, port=port, username=token)

    def on_server_rpc(request_id, body):
        say(event="rpc", id=request_id, body=body)
        client.send_rpc_reply(request_id, {"echo": body.get("params"), "method": body.get("method")})
        count("rpc")

    def on_attributes(content, *args):
        say(event="attributes", content=content)
        count("attributes")

    client.set_server_side_rpc_request_handler(on_server_rpc)
    client.subscribe_to_all_attributes(on_attributes)
    # The SDK stores the callback only after starting its network thread (tb_device_mqtt.connect), so a server
    # that answers CONNECT fast enough sees the CONNACK handled before the callback exists, and it is never
    # called. Set it first; connect() then sets the same one again.
    client._TBDeviceMqttClient__connect_callback = on_connect
    client.connect(callback=on_connect)
    try:
        if not connected.wait(30):
            say(event="error", detail="no CONNACK")
            return
        deadline = time.monotonic() + 10
        while not client.rate_limits_received and time.monotonic() < deadline:
            time.sleep(0.05)
        say(event="connected")

        def on_client_rpc(request_id, content, exception, *args):
            say(event="client_rpc", content=content, error=None if exception is None else str(exception))
            count("client_rpc")

        client.send_rpc_call("getTime", {"tz": "UTC"}, on_client_rpc)

        def on_shared(content, exception, *args):
            say(event="shared", content=content)

        client.request_attributes(shared_keys=["target"], callback=on_shared)
        done.wait(60)
        time.sleep(0.3)  # let the last reply leave
    finally:
        client.stop()
        client.disconnect()
    say(event="done", seen=seen)


if __name__ == "__main__":
    main()
