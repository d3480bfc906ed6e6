"""Test session setup: the real ComfyUI runtime (ComfyUI 0.3.75 from scripts/setup_runtime.sh) on CPU.

No ComfyUI module is stubbed: the tests import ComfyUI's own packages from the
runtime folder and load this pack through ComfyUI's own custom-node loader.
"""

import asyncio
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI = os.environ.get("TACA_COMFYUI_DIR", os.path.join(REPO, ".runtime", "ComfyUI"))
TESTS = os.path.dirname(os.path.abspath(__file__))

if not os.path.isfile(os.path.join(COMFYUI, "comfyui_version.py")):
    raise RuntimeError(f"ComfyUI runtime not found at {COMFYUI}; run `bash scripts/setup_runtime.sh` first "
                       "(or `bash scripts/test.sh`, which does it for you).")

# ComfyUI first (its `nodes` module must win over this pack's `nodes/` package), the
# tests' helpers next, and the repository last so the pure `taca` package can be imported alone.
for path in (TESTS, COMFYUI):
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
if REPO not in sys.path:
    sys.path.append(REPO)

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing(False)
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # same as `python main.py --cpu`

PACK_NAME = "comfyui-taca"


@pytest.fixture(scope="session")
def pack_nodes():
    """The pack loaded by ComfyUI's own custom-node loader; returns ComfyUI's NODE_CLASS_MAPPINGS."""
    import nodes as comfy_nodes

    pack_dir = os.path.join(COMFYUI, "custom_nodes", PACK_NAME)
    if not os.path.isdir(pack_dir):
        pack_dir = REPO
    ok = asyncio.run(comfy_nodes.load_custom_node(pack_dir, module_parent="custom_nodes"))
    assert ok, "ComfyUI failed to load the pack"
    return comfy_nodes.NODE_CLASS_MAPPINGS
