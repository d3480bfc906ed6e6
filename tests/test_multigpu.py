"""TACA, its Advanced schedule, its LoRA and the attention probe under ComfyUI's own MultiGPU CFG Split node.

On a CPU the node runs with two device objects, ``cpu:0`` (the model's load device here) and ``cpu``: the cond
and uncond model calls of each step then run at the same time in two threads, on two clones of the model.  The
prompts have different lengths, so a single device runs them as two model calls per step as well, one after
the other: the two runs do the same arithmetic, and everything the pack records must come out the same.
"""

import json
import threading

import pytest
import torch

import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample

from devtools import lora_files
from devtools import tiny_models as tm
from harness import run_report, with_run_spy
from test_lora import lora_dir, save  # noqa: F401  (a fixture)

multigpu = pytest.importorskip("comfy_extras.nodes_multigpu", reason="this ComfyUI has no MultiGPU CFG Split node")

STEPS = 8
THREAD_SPY_KEY = "test-thread-spy"


class ThreadSpy:
    """APPLY_MODEL wrapper: which thread ran each model call, and with which cond/uncond entries."""

    def __init__(self):
        self.calls = []
        self._lock = threading.Lock()

    def __call__(self, executor, x, t, *args, **kwargs):
        options = kwargs.get("transformer_options") or (args[3] if len(args) > 3 else {})
        with self._lock:
            self.calls.append((float(t.max()), tuple(options.get("cond_or_uncond", ())), threading.get_ident()))
        return executor(x, t, *args, **kwargs)


def on_cpu0(tiny):
    """The tiny model's patcher on load device ``cpu:0``, with a loader factory as ComfyUI's own loaders register
    (the MultiGPU node loads a fresh copy of the model for the other device through it)."""
    patcher = comfy.model_patcher.ModelPatcher(tiny.patcher.model, load_device=torch.device("cpu", 0),
                                               offload_device=torch.device("cpu", 0))
    patcher.cached_patcher_init = (lambda **kwargs: tm.build("flux").patcher, ())
    return patcher


def chain(pack_nodes, patcher, lora_name):
    model = pack_nodes["TACAPatchModelAdvanced"].execute(
        model=patcher, gamma=1.3, sigma_start=1.0, sigma_end=0.6, ramp="linear", blocks="0-2", target_share=0.0,
        mode="exact").result[0]
    model = pack_nodes["TACALoraLoader"].execute(model=model, lora_name=lora_name, strength=1.0,
                                                 active_during="taca_steps").result[0]
    model = pack_nodes["TACAAttentionProbe"].execute(model=model, record="taca_steps", max_rows=1024).result[0]
    return with_run_spy(model)


def sample(pack_nodes, model, tiny):
    spy = ThreadSpy()
    spied = model.clone()
    spied.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, THREAD_SPY_KEY, spy)
    latent = tm.latent(tiny)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    positive = tm.conditioning(tiny, 1)
    negative = tm.conditioning(tiny, 2, text_tokens=tiny.text_tokens - 2)  # never batched with the positive
    out = comfy.sample.sample(spied, noise, STEPS, 3.0, "euler", "simple", positive, negative, latent,
                              disable_pbar=True, seed=3)
    probe_json = pack_nodes["TACAProbeReport"].execute(model=spied, latent={"samples": out}).result[1]
    return out, run_report(spied).as_message(), probe_json, spy.calls


def test_multigpu_cfg_split_records_what_one_device_records(pack_nodes, lora_dir):  # noqa: F811
    tiny = tm.build("flux")
    name = save(lora_dir, "flux_multigpu.safetensors", lora_files.make_lora(tiny, "diffusers", 16))
    one_device = chain(pack_nodes, on_cpu0(tiny), name)
    split = multigpu.MultiGPUCFGSplitNode.execute(chain(pack_nodes, on_cpu0(tiny), name), 2).result[0]
    assert [m.load_device for m in split.get_additional_models_with_key("multigpu")] == [torch.device("cpu")]

    out_one, report_one, probe_one, calls_one = sample(pack_nodes, one_device, tiny)
    out_split, report_split, probe_split, calls_split = sample(pack_nodes, split, tiny)

    # Both runs made cond and uncond model calls of their own each step; the split run in two threads at once.
    assert len(calls_one) == len(calls_split) == 2 * STEPS
    assert len({thread for _, _, thread in calls_one}) == 1
    for step in range(STEPS):
        pair = calls_split[2 * step:2 * step + 2]
        assert pair[0][0] == pair[1][0] and {c[1] for c in pair} == {(0,), (1,)}
        assert pair[0][2] != pair[1][2], "the cond and uncond model calls of a step ran in one thread"

    assert torch.equal(out_split, out_one)
    assert report_split == report_one
    assert probe_split == probe_one
    # Nothing was lost: TACA acted on the first steps, and the probe holds both model calls of each of them.
    assert report_one["acted_steps"] and report_one["model_calls"] == 2 * STEPS
    assert report_one["model_calls_acted"] == 2 * len(report_one["acted_steps"])
    probe = json.loads(probe_one)
    assert probe["model_calls"] == 2 * len(report_one["acted_steps"]) == 2 * len(probe["steps"])
    for step in probe["steps"]:
        assert all(len(call["share_plain"]) == 2 for call in step["calls"])
