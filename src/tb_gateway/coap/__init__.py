"""CoAP transport: a sans-IO codec and endpoint (``codec``, ``endpoint``, ``blockwise``) and a thin asyncio
adapter (``server``) that maps ThingsBoard's CoAP device API onto ``DeviceApi`` (docs/coap.md)."""
