"""The real-server harness lives in devtools/comfy_server.py (shared with the demo); re-exported for the tests."""

from devtools.comfy_server import ComfyServer, free_port, port_in_use  # noqa: F401
