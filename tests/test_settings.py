"""The settings type (ranges, the gamma-1-is-off rule, where a model keeps it), what a clone shares on this
ComfyUI version, and which errors switch flex compilation off."""

import copy
import math
import logging
import sys

import pytest
import torch

from comfy.patcher_extension import WrappersMP

from devtools import lora_files
from devtools import tiny_models as tm
from devtools.sampling import ksample, schedule
from harness import run_report, taca
from reference import max_row_rel_err, taca_reference
from taca import hooks, kernels, settings as taca_settings
from taca.attention import JointLayout
from taca.settings import TacaSettings
from test_lora import lora_dir, save  # noqa: F401  (the LoRA folder fixture and writer)


@pytest.mark.parametrize(
    "gamma,threshold,mode",
    [(0.0, 0.97, "exact"), (-1.0, 0.97, "exact"), (float("nan"), 0.97, "exact"), (50.0, 0.97, "exact"),
     (1.2, -0.1, "exact"), (1.2, 1.5, "exact"), (1.2, float("inf"), "exact"), (1.2, 0.97, "fast")],
)
def test_bad_settings_are_refused_with_a_clear_message(gamma, threshold, mode):
    with pytest.raises(ValueError) as err:
        taca_settings.validate_settings(gamma, threshold, mode)
    text = str(err.value)
    assert "TACA" in text and ("gamma" in text or "threshold_sigma" in text or "mode" in text)


def test_good_settings_pass():
    for mode in taca_settings.MODES:
        taca_settings.validate_settings(1.2, 0.97, mode)
    taca_settings.validate_settings(1.0, 0.0, "exact")
    taca_settings.validate_settings(1.3, 1.0, "flex")


def test_active_while_sigma_is_at_or_above_the_threshold_and_never_at_gamma_one():
    on = TacaSettings.from_inputs(1.2, 0.5, "exact")
    assert [on.active_at(s) for s in (1.0, 0.5, 0.4999)] == [True, True, False]
    off = TacaSettings.from_inputs(1, 0.0, "exact")
    assert not off.enabled and not any(off.active_at(s) for s in (1.0, 0.5, 0.0))
    assert isinstance(off.gamma, float)


def test_the_node_schema_defaults_and_ranges_are_the_settings_defaults(pack_nodes):
    required = pack_nodes["TACAPatchModel"].INPUT_TYPES()["required"]
    defaults = TacaSettings()
    assert (required["gamma"][1]["default"], required["threshold_sigma"][1]["default"],
            required["mode"][1]["default"]) == (1.2, 0.97, "exact") == tuple(defaults)[:3]
    # the Advanced node's fields, at their defaults, are the simple node: no upper end, constant, all calls
    assert tuple(defaults)[3:] == (None, "constant", (), 0.0)
    assert (required["gamma"][1]["min"], required["gamma"][1]["max"]) == (0.1, 3.0)
    assert (required["threshold_sigma"][1]["min"], required["threshold_sigma"][1]["max"]) == (0.0, 1.0)


def pack_module(pack_nodes, node: str, name: str):
    """A module of the pack as ComfyUI's loader imported it (its classes are not the tests' ``taca`` ones)."""
    return getattr(sys.modules[pack_nodes[node].__module__], name)


def test_a_patched_model_keeps_the_settings_object_and_a_later_patch_replaces_it(pack_nodes):
    stored = pack_module(pack_nodes, "TACAPatchModel", "taca_settings").stored
    tiny = tm.build("flux")
    first = taca(pack_nodes, tiny.patcher, gamma=1.25, threshold=0.9, mode="selective")
    assert stored(first.model_options["transformer_options"]) == TacaSettings(1.25, 0.9, "selective")
    second = taca(pack_nodes, first, gamma=1.1)
    assert stored(second.model_options["transformer_options"]) == TacaSettings(1.1, 0.97, "exact")
    assert stored(tiny.patcher.model_options["transformer_options"]) is None


def test_a_clone_shares_the_nodes_hooks_and_its_run_fills_the_nodes_report(pack_nodes, lora_dir, caplog):
    """ModelPatcher.clone copies the wrapper lists and object patches as the same objects, and model_options
    (deep-copied on 0.3.75, lists and dicts only on 0.33) hold only the settings tuple: no TACA object needs a
    __deepcopy__, and a clone's run is reported by the node that made the patch."""
    tiny = tm.build("flux")
    name = save(lora_dir, "flux_clone_16.safetensors", lora_files.make_lora(tiny, "diffusers", 16))
    model = pack_nodes["TACALoraLoader"].execute(model=taca(pack_nodes, tiny.patcher), lora_name=name, strength=1.0,
                                                 active_during="taca_steps").result[0]
    clone = model.clone().clone()
    lora = pack_module(pack_nodes, "TACALoraLoader", "taca_lora")
    for kind in (WrappersMP.APPLY_MODEL, WrappersMP.OUTER_SAMPLE):
        assert clone.get_wrappers(kind, hooks.WRAPPER_KEY) and all(
            a is b for a, b in zip(clone.get_wrappers(kind, hooks.WRAPPER_KEY), model.get_wrappers(kind, hooks.WRAPPER_KEY)))
    layer_patches = [p for p in model.object_patches.values() if isinstance(p, lora.LowRankForward)]
    assert layer_patches and all(clone.object_patches[n] is p for n, p in model.object_patches.items())
    assert copy.deepcopy(clone.model_options) == clone.model_options  # plain data, copies as such
    with caplog.at_level(logging.INFO, logger="comfyui-taca"):
        ksample(clone, tiny, steps=4)
    expected_steps = [i for i, s in enumerate(schedule(tiny.patcher, 4)[:-1].tolist()) if s >= 0.97]
    assert expected_steps and run_report(clone).model_calls == 4 and run_report(clone).acted_steps == expected_steps


@pytest.fixture
def fresh_flex_kernel(monkeypatch):
    """The process-wide flex compilation state, restored after the test."""
    monkeypatch.setattr(kernels.FlexKernel, "compiled", None)
    monkeypatch.setattr(kernels.FlexKernel, "compile_failed", False)
    return kernels.FlexKernel


def flex_inputs():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, 24, 16, generator=g) for _ in range(3))


def test_a_bad_mask_in_flex_propagates_and_keeps_compilation_on(fresh_flex_kernel):
    q, k, v = flex_inputs()
    with pytest.raises(RuntimeError) as err:
        fresh_flex_kernel.run(q, k, v, torch.zeros(5, 7), JointLayout.text_first(6, 24), 1.2)
    assert not isinstance(err.value, kernels.compile_errors())
    assert not fresh_flex_kernel.compile_failed


def test_out_of_memory_in_the_compiled_call_propagates_and_keeps_compilation_on(fresh_flex_kernel, monkeypatch):
    def out_of_memory(*args, **kwargs):  # what the compiled kernel raises on a device that is full
        raise torch.OutOfMemoryError("out of memory")

    fresh_flex_kernel.run(*flex_inputs(), None, JointLayout.text_first(6, 24), 1.2)  # compiles
    monkeypatch.setattr(kernels.FlexKernel, "compiled", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        fresh_flex_kernel.run(*flex_inputs(), None, JointLayout.text_first(6, 24), 1.2)
    assert not fresh_flex_kernel.compile_failed


def test_a_compiler_failure_falls_back_to_eager_flex(fresh_flex_kernel, monkeypatch, caplog):
    """A compiler backend that cannot build the kernel (as inductor without a C++ compiler): torch.compile
    reports it as BackendCompilerFailed, and flex goes on eager, exact."""
    from torch.nn.attention.flex_attention import flex_attention

    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no working C++ compiler")

    torch._dynamo.reset()
    monkeypatch.setattr(kernels.FlexKernel, "compiled", torch.compile(flex_attention, backend=broken_backend,
                                                                      dynamic=False))
    q, k, v = flex_inputs()
    try:
        with caplog.at_level(logging.WARNING, logger="comfyui-taca"):
            out = fresh_flex_kernel.run(q, k, v, None, JointLayout.text_first(6, 24), 1.2)
    finally:
        torch._dynamo.reset()
    assert fresh_flex_kernel.compile_failed
    assert "torch.compile of flex_attention failed (BackendCompilerFailed" in caplog.text
    assert max_row_rel_err(out, taca_reference(q, k, v, 0, 6, 1.2)) <= 1e-4


@pytest.mark.parametrize("text,blocks", [
    ("", ()), (" ", ()), ("3", (3,)), ("0-2,5", (0, 1, 2, 5)), (" 5 , 0 - 2 ,", (0, 1, 2, 5)), ("2-2", (2,)),
    ("4,1-3,2", (1, 2, 3, 4)), ("1023", (1023,)),
])
def test_blocks_text_parses_to_sorted_indices_and_formats_back(text, blocks):
    assert taca_settings.parse_blocks(text) == blocks
    assert taca_settings.parse_blocks(taca_settings.format_blocks(blocks)) == blocks


@pytest.mark.parametrize("text,words", [
    ("a", "'a' is not a block index"), ("1-", "'1-' is not"), ("-3", "'-3' is not"), ("1.5", "'1.5' is not"),
    ("7-3", "runs backwards"), ("1024", "1024 is above 1023"), ("0-2000", "2000 is above 1023"),
])
def test_bad_blocks_text_is_refused_naming_the_item(text, words):
    with pytest.raises(ValueError) as err:
        taca_settings.parse_blocks(text)
    assert words in str(err.value) and "blocks=" in str(err.value)


def test_the_ramp_runs_from_gamma_at_sigma_start_to_one_at_sigma_end():
    for ramp in taca_settings.RAMPS:
        s = TacaSettings.from_advanced_inputs(1.5, 0.9, 0.5, ramp, "", 0.0, "exact")
        assert s.gamma_at(0.9) == pytest.approx(1.5) and s.gamma_at(0.91) == 1.0 and s.gamma_at(0.49) == 1.0
        assert s.gamma_at(0.5) == pytest.approx(1.5 if ramp == "constant" else 1.0)
    linear = TacaSettings.from_advanced_inputs(1.5, 0.9, 0.5, "linear", "", 0.0, "exact")
    cosine = TacaSettings.from_advanced_inputs(1.5, 0.9, 0.5, "cosine", "", 0.0, "exact")
    assert linear.gamma_at(0.7) == pytest.approx(1.25) == cosine.gamma_at(0.7)  # both halfway at the middle
    assert cosine.gamma_at(0.6) == pytest.approx(1.0 + 0.5 * (1 - math.cos(math.pi / 4)) / 2)
    below = TacaSettings.from_advanced_inputs(0.8, 1.0, 0.0, "linear", "", 0.0, "exact")  # gamma < 1 ramps up to 1
    assert below.gamma_at(1.0) == pytest.approx(0.8) and below.gamma_at(0.5) == pytest.approx(0.9)


def test_a_window_of_one_sigma_and_the_edges_of_the_ranges():
    point = TacaSettings.from_advanced_inputs(1.3, 0.7, 0.7, "cosine", "", 0.0, "exact")
    assert point.gamma_at(0.7) == 1.3 and point.gamma_at(0.7001) == 1.0 and point.gamma_at(0.6999) == 1.0
    edges = TacaSettings.from_advanced_inputs(3.0, 1.0, 0.0, "constant", "0-1023", 0.99, "flex")
    assert edges.adaptive and edges.acts_on_block(1023) and edges.gamma_at(0.0) == 3.0
    off = TacaSettings.from_advanced_inputs(1.0, 1.0, 0.0, "linear", "", 0.5, "exact")
    assert not off.enabled and off.gamma_at(0.5) == 1.0
    with pytest.raises(ValueError, match="sigma_end=0.97 is above sigma_start=0.9"):
        TacaSettings.from_advanced_inputs(1.2, 0.9, 0.97, "constant", "", 0.0, "exact")
    with pytest.raises(ValueError, match="sigma_end=1.2 is out of range"):
        TacaSettings.from_advanced_inputs(1.2, 1.0, 1.2, "constant", "", 0.0, "exact")
    with pytest.raises(ValueError, match="target_share=inf"):
        TacaSettings.from_advanced_inputs(1.2, 1.0, 0.97, "constant", "", float("inf"), "exact")
