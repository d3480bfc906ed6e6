"""Make a development ComfyUI (scripts/setup_runtime.sh) importable, in CPU mode, like `main.py --cpu`.

Which one: ``TACA_COMFYUI_VERSION`` (``.runtime/comfyui-VERSION``, as scripts/test.sh and scripts/demo.sh set
it), else the newest runtime built; ``TACA_COMFYUI_DIR`` points at any other ComfyUI folder.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIMES = os.path.join(REPO, ".runtime")
PACK_NAME = "comfyui-taca"


def version_key(version: str) -> Tuple[int, ...]:
    """'0.33.0' -> (0, 33, 0), for ordering ComfyUI versions."""
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _runtime_home() -> str:
    version = os.environ.get("TACA_COMFYUI_VERSION")
    if version:
        return os.path.join(RUNTIMES, f"comfyui-{version}")
    built = [os.path.dirname(os.path.dirname(p))
             for p in glob.glob(os.path.join(RUNTIMES, "comfyui-*", "ComfyUI", "comfyui_version.py"))]
    if not built:
        return os.path.join(RUNTIMES, "comfyui-none")
    return max(built, key=lambda home: version_key(os.path.basename(home)[len("comfyui-"):]))


# Per-runtime folder for what tests and the demo generate (tiny model files), beside that ComfyUI.
RUNTIME_HOME = _runtime_home()
COMFYUI = os.environ.get("TACA_COMFYUI_DIR", os.path.join(RUNTIME_HOME, "ComfyUI"))


def activate(cpu: bool = True) -> str:
    """Put ComfyUI first on sys.path (its `nodes` module must win over this pack's `nodes/` package)
    and the repository last (for `taca` and `devtools`). Returns the ComfyUI folder."""
    if not os.path.isfile(os.path.join(COMFYUI, "comfyui_version.py")):
        raise RuntimeError(f"ComfyUI runtime not found at {COMFYUI}; run `bash scripts/setup_runtime.sh` first.")
    if COMFYUI in sys.path:
        sys.path.remove(COMFYUI)
    sys.path.insert(0, COMFYUI)
    if REPO not in sys.path:
        sys.path.append(REPO)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True
    return COMFYUI


def load_pack():
    """Load this pack through ComfyUI's own custom-node loader; returns ComfyUI's NODE_CLASS_MAPPINGS."""
    import asyncio

    import nodes as comfy_nodes

    if "TACAPatchModel" not in comfy_nodes.NODE_CLASS_MAPPINGS:
        # The runtime's link to the pack, when it points at this checkout (another checkout loads itself).
        pack_dir = os.path.join(COMFYUI, "custom_nodes", PACK_NAME)
        if not os.path.isdir(pack_dir) or os.path.realpath(pack_dir) != os.path.realpath(REPO):
            pack_dir = REPO
        if not asyncio.run(comfy_nodes.load_custom_node(pack_dir, module_parent="custom_nodes")):
            raise RuntimeError("ComfyUI failed to load the pack")
    return comfy_nodes.NODE_CLASS_MAPPINGS


def pack_module(name: str):
    """A module of the loaded pack, e.g. ``pack_module("taca.hooks")`` (the pack loads under its folder name)."""
    import importlib

    root = load_pack()["TACAPatchModel"].__module__.rsplit(".", 2)[0]
    return importlib.import_module(f"{root}.{name}")
