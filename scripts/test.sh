#!/usr/bin/env bash
# The README's test command: builds the runtimes if needed (idempotent), then runs the whole suite against
# each ComfyUI version the pack supports, oldest first. Usage:
#   bash scripts/test.sh [--comfyui VERSION] [pytest args]     e.g. --comfyui 0.33.0 -k flux -x
# TACA_COMFYUI_VERSIONS="0.3.75 0.33.0" (space-separated) does the same as repeating --comfyui.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
versions="${TACA_COMFYUI_VERSIONS:-}"
while [ "${1:-}" = "--comfyui" ]; do versions="$versions $2"; shift 2; done
[ -n "${versions// /}" ] || versions="$(bash scripts/setup_runtime.sh --list)"
bash scripts/setup_runtime.sh $versions
failed=()
for v in $versions; do
    echo "[test] ComfyUI $v"
    TACA_COMFYUI_VERSION="$v" ".runtime/comfyui-$v/venv/bin/python" -m pytest tests "$@" || failed+=("$v")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "[test] failed on ComfyUI ${failed[*]}" >&2
    exit 1
fi
echo "[test] passed on ComfyUI $versions"
