"""The pack as ComfyUI sees it: loading, the node's schema, the old-ComfyUI message, host syncs per call."""

import os
import subprocess
import sys

import torch

from devtools import tiny_models as tm
from conftest import COMFYUI, REPO
from devtools.host_reads import HostReadCounter
from devtools.sampling import ksample


def test_node_schema_inputs_in_order_with_tooltips(pack_nodes):
    node = pack_nodes["TACAPatchModel"]
    info = node.GET_NODE_INFO_V1()
    assert info["display_name"] == "TACA Patch Model"
    assert info["category"].startswith("model_patches")
    assert "2506.07986" in info["description"]
    required = info["input"]["required"]
    assert list(required) == ["model", "gamma", "threshold_sigma", "mode"]
    assert required["gamma"][1]["default"] == 1.2
    assert required["gamma"][1]["min"] > 0
    assert required["threshold_sigma"][1]["default"] == 0.97
    assert (required["threshold_sigma"][1]["min"], required["threshold_sigma"][1]["max"]) == (0.0, 1.0)
    assert list(required["mode"][0] if isinstance(required["mode"][0], list) else required["mode"][1]["options"]) \
        == ["exact", "selective", "flex"]
    assert required["mode"][1]["default"] == "exact"
    for name, (_, options) in required.items():
        assert options.get("tooltip"), f"input {name} has no tooltip"
    assert info["output"] == ["MODEL"]


def host_reads(patcher, tiny, steps, start_step=None):
    ksample(patcher, tiny, steps=steps, start_step=start_step)  # warm up (model load)
    with HostReadCounter() as counter:
        ksample(patcher, tiny, steps=steps, start_step=start_step)
    return counter.reads


def test_at_most_one_host_sync_added_per_model_call(pack_nodes):
    """Reads per model call are the slope over runs of 2 and 6 steps (cond+uncond batched: one call a step)."""
    tiny = tm.build("flux")  # 2 double + 2 single blocks: 4 joint attention calls per model call
    patched = pack_nodes["TACAPatchModel"].execute(model=tiny.patcher, gamma=1.2, threshold_sigma=0.0,
                                                    mode="exact").result[0]
    for threshold_note, start in (("every step a TACA step", None), ("no TACA step", 1)):
        model = patched if start is None else pack_nodes["TACAPatchModel"].execute(
            model=tiny.patcher, gamma=1.2, threshold_sigma=0.999, mode="exact").result[0]
        added = {n: host_reads(model, tiny, n, start) - host_reads(tiny.patcher, tiny, n, start) for n in (2, 6)}
        calls = {n: n - (start or 0) for n in added}
        per_call = (added[6] - added[2]) / (calls[6] - calls[2])
        per_run = added[2] - per_call * calls[2]
        assert per_call <= 1, (threshold_note, added)
        assert per_run <= 1, (threshold_note, added)  # the run report reads the schedule once, after sampling


def _load_pack_in_subprocess(prelude: str) -> subprocess.CompletedProcess:
    code = f"""
import asyncio, logging, sys
sys.path.insert(0, {COMFYUI!r})
import comfy.options; comfy.options.enable_args_parsing(False)
import comfy.cli_args; comfy.cli_args.args.cpu = True
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
{prelude}
import nodes
ok = asyncio.run(nodes.load_custom_node({REPO!r}, module_parent="custom_nodes"))
print("LOADED", ok, "TACAPatchModel" in nodes.NODE_CLASS_MAPPINGS)
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=COMFYUI)


def test_loads_in_current_comfyui():
    result = _load_pack_in_subprocess("")
    assert "LOADED True True" in result.stdout, result.stdout + result.stderr


def test_too_old_comfyui_logs_one_clear_line_and_registers_nothing():
    # Simulate a ComfyUI from before the attention override existed (< 0.3.60) by removing it.
    result = _load_pack_in_subprocess("import comfy.ldm.modules.attention as a; del a.wrap_attn")
    out = result.stdout + result.stderr
    lines = [line for line in out.splitlines() if "comfyui-taca" in line]
    assert len(lines) == 1, out
    assert "needs ComfyUI >= 0.3.75" in lines[0] and "wrap_attn" in lines[0]
    assert "Traceback" not in out
    # the pack loaded without an error and registered no node
    assert "LOADED True False" in result.stdout, out
    assert "LOADED True False" in out, out
