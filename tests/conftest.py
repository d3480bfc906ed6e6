"""Test session setup: the real ComfyUI runtime on CPU (the version TACA_COMFYUI_VERSION names; see
scripts/setup_runtime.sh).

No ComfyUI module is stubbed: the tests import ComfyUI's own packages from the
runtime folder and load this pack through ComfyUI's own custom-node loader.
"""

import os
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TESTS))
from devtools import comfy_runtime  # noqa: E402

sys.path.pop(0)
COMFYUI = comfy_runtime.activate(cpu=True)
REPO = comfy_runtime.REPO
if TESTS in sys.path:
    sys.path.remove(TESTS)
sys.path.insert(0, TESTS)


@pytest.fixture(scope="session")
def pack_nodes():
    """The pack loaded by ComfyUI's own custom-node loader; returns ComfyUI's NODE_CLASS_MAPPINGS."""
    return comfy_runtime.load_pack()
