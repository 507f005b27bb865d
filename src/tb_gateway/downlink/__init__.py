"""Downlink and device state: server-side RPC, shared attributes, client-side RPC, online/offline.

``sessions`` (the ``DownlinkSession`` protocol every transport session implements, and the registry device
-> live sessions), sans-IO cores ``rpc``, ``client_rpc``, ``shared_attributes``, ``device_state``; ``hub``
is the asyncio adapter the transports and sources talk to; ``kafka_source`` consumes the downlink topics.
docs/downlink.md describes the behaviour and how it scales to several processes.
"""
