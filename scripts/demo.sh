#!/usr/bin/env bash
# The README's first command: sets up the runtime if needed, then runs the TACA comparison workflow on a
# headless ComfyUI (tiny built-in models; --models DIR for your FLUX.1-dev / SD3.5-Medium files).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_runtime.sh
exec .runtime/venv/bin/python -m devtools.demo "$@"
