"""HTTP device API (ThingsBoard ``/api/v1/{token}/...``) on httptools; see server.py."""
