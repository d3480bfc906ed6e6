#!/usr/bin/env bash
# The README's demo command: sets up the runtime if needed, then runs the TACA comparison workflow on a
# headless ComfyUI (the built-in compositional-world model; --models DIR for your FLUX.1-dev / SD3.5-Medium
# files; --tiny for the random-weight test models).
# The newest supported ComfyUI by default; --comfyui VERSION (first) picks another.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
version="$(bash scripts/setup_runtime.sh --list | awk '{print $NF}')"
if [ "${1:-}" = "--comfyui" ]; then version="$2"; shift 2; fi
bash scripts/setup_runtime.sh "$version"
TACA_COMFYUI_VERSION="$version" exec ".runtime/comfyui-$version/venv/bin/python" -m devtools.demo "$@"
