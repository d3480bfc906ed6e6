"""Development tools shared by the tests, the benchmark and the demo (never imported by ComfyUI)."""
