#!/usr/bin/env bash
# The README's test command: builds the runtime if needed (idempotent), then runs the whole suite
# against the real ComfyUI 0.3.75. Extra arguments go to pytest (e.g. -k flux, -x).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_runtime.sh
exec .runtime/venv/bin/python -m pytest tests "$@"
