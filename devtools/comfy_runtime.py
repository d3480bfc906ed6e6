"""Make the development ComfyUI (scripts/setup_runtime.sh) importable, in CPU mode, like `main.py --cpu`."""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI = os.environ.get("TACA_COMFYUI_DIR", os.path.join(REPO, ".runtime", "ComfyUI"))
PACK_NAME = "comfyui-taca"


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
        pack_dir = os.path.join(COMFYUI, "custom_nodes", PACK_NAME)
        if not os.path.isdir(pack_dir):
            pack_dir = REPO
        if not asyncio.run(comfy_nodes.load_custom_node(pack_dir, module_parent="custom_nodes")):
            raise RuntimeError("ComfyUI failed to load the pack")
    return comfy_nodes.NODE_CLASS_MAPPINGS
