"""TACA LoRA Loader against ComfyUI's core LoRA loader, on tiny models with generated LoRA files."""

import inspect
import logging
import os
import pickle
import sys
import threading

import pytest
import safetensors.torch
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import comfy.model_patcher
import comfy.sd
import folder_paths

from devtools import lora_files
from devtools import tiny_models as tm
from devtools.sampling import one_step, schedule
from harness import rel_diff, taca

TOL = 1e-5  # fp32: low-rank beside the layer vs merged into the weight


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("loras"))
    folder_paths.add_model_folder_path("loras", path)
    return path


def save(lora_dir, name, tensors):
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(lora_dir, name))
    return name


def taca_lora(pack_nodes, model, name, strength=1.0, active="taca_steps"):
    return pack_nodes["TACALoraLoader"].execute(model=model, lora_name=name, strength=strength,
                                                active_during=active).result[0]


def core_lora(model, tensors, strength=1.0):
    """ComfyUI's core LoRA loader (merges into the weights). It does not map PEFT's "base_model.model."
    prefix for FLUX, so the reference gets the same tensors under the diffusers "transformer." name."""
    renamed = {("transformer." + k[len("base_model.model."):] if k.startswith("base_model.model.") else k): v
               for k, v in tensors.items()}
    return comfy.sd.load_lora_for_models(model, None, renamed, strength, 0)[0]


def inputs(tiny, batch=1):
    return tm.conditioning(tiny, 1, batch=batch), tm.conditioning(tiny, 2, batch=batch), tm.latent(tiny, batch=batch)


@pytest.mark.parametrize("kind", ["flux", "sd35_medium"])
@pytest.mark.parametrize("fmt", lora_files.FORMATS)
@pytest.mark.parametrize("rank", [16, 64])
def test_all_steps_equals_the_core_loader(pack_nodes, lora_dir, kind, fmt, rank):
    tiny = tm.build(kind)
    tensors = lora_files.make_lora(tiny, fmt, rank)
    name = save(lora_dir, f"{kind}_{fmt}_{rank}.safetensors", tensors)
    ours = taca_lora(pack_nodes, tiny.patcher, name, strength=0.8, active="all_steps")
    core = core_lora(tiny.patcher, tensors, strength=0.8)
    pos, neg, latent = inputs(tiny, batch=2)
    for sigma in (1.0, 0.5):
        a = one_step(ours, pos, neg, latent, sigma=sigma, cfg=3.0)
        b = one_step(core, pos, neg, latent, sigma=sigma, cfg=3.0)
        plain = one_step(tiny.patcher, pos, neg, latent, sigma=sigma, cfg=3.0)
        assert rel_diff(a, b) <= TOL, (sigma, rel_diff(a, b))
        assert rel_diff(plain, b) > 1e-2  # the LoRA matters


@pytest.mark.parametrize("kind", ["flux", "sd35_medium"])
def test_taca_steps_acts_like_the_core_loader_in_taca_steps_and_not_at_all_otherwise(pack_nodes, lora_dir, kind):
    tiny = tm.build(kind)
    tensors = lora_files.make_lora(tiny, "diffusers", 16)
    name = save(lora_dir, f"{kind}_gate.safetensors", tensors)
    ours = taca_lora(pack_nodes, taca(pack_nodes, tiny.patcher), name)
    reference = taca(pack_nodes, core_lora(tiny.patcher, tensors))
    taca_only = taca(pack_nodes, tiny.patcher)
    pos, neg, latent = inputs(tiny)
    assert rel_diff(one_step(ours, pos, neg, latent, 1.0, 3.0), one_step(reference, pos, neg, latent, 1.0, 3.0)) <= TOL
    inactive = one_step(ours, pos, neg, latent, 0.5, 3.0)
    assert torch.equal(inactive, one_step(taca_only, pos, neg, latent, 0.5, 3.0))
    assert torch.equal(inactive, one_step(tiny.patcher, pos, neg, latent, 0.5, 3.0))


@pytest.mark.parametrize("order", ["taca_then_lora", "lora_then_taca"])
def test_gate_follows_the_taca_threshold_in_either_node_order(pack_nodes, lora_dir, order):
    tiny = tm.build("flux")
    tensors = lora_files.make_lora(tiny, "peft", 16)
    name = save(lora_dir, "flux_order.safetensors", tensors)
    if order == "taca_then_lora":
        model = taca_lora(pack_nodes, taca(pack_nodes, tiny.patcher, threshold=0.5), name)
    else:
        model = taca(pack_nodes, taca_lora(pack_nodes, tiny.patcher, name), threshold=0.5)
    taca_only = taca(pack_nodes, tiny.patcher, threshold=0.5)
    reference = taca(pack_nodes, core_lora(tiny.patcher, tensors), threshold=0.5)
    pos, neg, latent = inputs(tiny)
    assert rel_diff(one_step(model, pos, neg, latent, 0.6), one_step(reference, pos, neg, latent, 0.6)) <= TOL
    assert torch.equal(one_step(model, pos, neg, latent, 0.4), one_step(taca_only, pos, neg, latent, 0.4))


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_a_30_step_schedule_activates_the_lora_on_exactly_the_taca_steps(pack_nodes, lora_dir, kind):
    tiny = tm.build(kind)
    name = save(lora_dir, f"{kind}_30.safetensors", lora_files.make_lora(tiny, "kohya", 16))
    with_lora = taca_lora(pack_nodes, taca(pack_nodes, tiny.patcher), name)
    without = taca(pack_nodes, tiny.patcher)
    pos, neg, latent = inputs(tiny)
    sigmas = schedule(tiny.patcher, 30)[:-1].tolist()
    acted = [i for i, s in enumerate(sigmas)
             if not torch.equal(one_step(with_lora, pos, neg, latent, s, 3.0), one_step(without, pos, neg, latent, s, 3.0))]
    assert acted == [i for i, s in enumerate(sigmas) if s >= 0.97] == [0, 1, 2]


def test_without_taca_the_default_threshold_applies_and_the_user_is_told_once(pack_nodes, lora_dir, caplog):
    tiny = tm.build("flux")
    tensors = lora_files.make_lora(tiny, "comfy", 16)
    name = save(lora_dir, "flux_alone.safetensors", tensors)
    model = taca_lora(pack_nodes, tiny.patcher, name)
    core = core_lora(tiny.patcher, tensors)
    pos, neg, latent = inputs(tiny)
    with caplog.at_level(logging.WARNING):
        assert rel_diff(one_step(model, pos, neg, latent, 0.98), one_step(core, pos, neg, latent, 0.98)) <= TOL
        assert torch.equal(one_step(model, pos, neg, latent, 0.96), one_step(tiny.patcher, pos, neg, latent, 0.96))
        one_step(model, pos, neg, latent, 1.0)
    notices = [r for r in caplog.records if "meant to be used with TACA" in r.getMessage()]
    assert len(notices) == 1


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every new tensor any op allocates (views of existing storage are not allocations)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages:
                self.shapes.append(tuple(t.shape))
        return out


def weight_sized_allocations(patcher, tiny, weight_shapes):
    """Weight-shaped tensors allocated while loading the model and running two TACA steps."""
    pos, neg, latent = inputs(tiny)
    with ShapeRecorder() as recorder:
        one_step(patcher, pos, neg, latent, 1.0, 3.0)
        one_step(patcher, pos, neg, latent, 0.98, 3.0)
    return [s for s in recorder.shapes if s in weight_shapes]


def test_base_weights_untouched_and_no_weight_sized_tensor_allocated(pack_nodes, lora_dir):
    tiny = tm.build("flux")
    tensors = lora_files.make_lora(tiny, "diffusers", 64)
    name = save(lora_dir, "flux_alloc.safetensors", tensors)
    state = tiny.patcher.model.state_dict()
    targets = lora_files.target_weight_keys(tiny)
    weight_shapes = {tuple(state[k].shape) for k in targets}
    before = {k: v.clone() for k, v in state.items()}
    model = taca_lora(pack_nodes, taca(pack_nodes, tiny.patcher), name)
    assert weight_sized_allocations(model, tiny, weight_shapes) == []
    assert all(torch.equal(before[k], v) for k, v in tiny.patcher.model.state_dict().items())
    assert not any(k in model.backup for k in targets)  # ComfyUI keeps no weight backup for us
    # The detector works: the core loader, which merges, allocates weight-sized tensors.
    control = tm.build("flux")
    merged = core_lora(control.patcher, tensors)
    control_shapes = {tuple(control.patcher.model.state_dict()[k].shape) for k in targets}
    assert weight_sized_allocations(merged, control, control_shapes)


def test_the_unpatched_branch_never_sees_the_lora_and_runs_repeat(pack_nodes, lora_dir):
    tiny = tm.build("sd35_medium")
    fresh = tm.build("sd35_medium")
    name = save(lora_dir, "sd35_branch.safetensors", lora_files.make_lora(tiny, "diffusers", 16))
    model = taca_lora(pack_nodes, taca(pack_nodes, tiny.patcher), name)
    pos, neg, latent = inputs(tiny)
    first = one_step(model, pos, neg, latent, 1.0, 3.0)
    plain = one_step(tiny.patcher, pos, neg, latent, 1.0, 3.0)
    second = one_step(model, pos, neg, latent, 1.0, 3.0)
    assert torch.equal(plain, one_step(fresh.patcher, pos, neg, latent, 1.0, 3.0))
    assert torch.equal(first, second)  # the official pipeline loses its LoRA after one call; this does not
    assert not torch.equal(first, plain)


@pytest.mark.parametrize("order", ["core_then_taca_lora", "taca_lora_then_core"])
def test_stacks_with_an_ordinary_lora_in_either_order(pack_nodes, lora_dir, order):
    tiny = tm.build("flux")
    ordinary = lora_files.make_lora(tiny, "kohya", 16, seed=7)
    ours = lora_files.make_lora(tiny, "diffusers", 16, seed=8)
    name = save(lora_dir, "flux_stack.safetensors", ours)
    if order == "core_then_taca_lora":
        model = taca_lora(pack_nodes, core_lora(tiny.patcher, ordinary), name, active="all_steps")
    else:
        model = core_lora(taca_lora(pack_nodes, tiny.patcher, name, active="all_steps"), ordinary)
    both_core = core_lora(core_lora(tiny.patcher, ordinary), ours)
    pos, neg, latent = inputs(tiny)
    assert rel_diff(one_step(model, pos, neg, latent, 0.7, 3.0), one_step(both_core, pos, neg, latent, 0.7, 3.0)) <= TOL


def test_low_rank_tensors_follow_the_model_dtype(pack_nodes, lora_dir):
    tiny = tm.build("flux", dtype=torch.bfloat16)
    tensors = lora_files.make_lora(tiny, "diffusers", 16)
    name = save(lora_dir, "flux_bf16.safetensors", tensors)
    ours = one_step(taca_lora(pack_nodes, tiny.patcher, name, active="all_steps"), *inputs(tiny), 1.0)
    core = one_step(core_lora(tiny.patcher, tensors), *inputs(tiny), 1.0)
    plain = one_step(tiny.patcher, *inputs(tiny), 1.0)
    assert torch.isfinite(ours).all()
    assert rel_diff(ours, core) <= 0.1 * rel_diff(plain, core)


def test_zero_matched_names_the_base_model_the_lora_was_made_for(pack_nodes, lora_dir):
    flux, sd3 = tm.build("flux"), tm.build("sd3")
    name = save(lora_dir, "made_for_flux.safetensors", lora_files.make_lora(flux, "diffusers", 16))
    with pytest.raises(ValueError) as err:
        taca_lora(pack_nodes, sd3.patcher, name)
    assert "FLUX.1" in str(err.value) and "SD3" in str(err.value) and "made_for_flux" in str(err.value)
    name = save(lora_dir, "made_for_sd3.safetensors", lora_files.make_lora(tm.build("sd35_medium"), "kohya", 16))
    with pytest.raises(ValueError) as err:
        taca_lora(pack_nodes, flux.patcher, name)
    assert "SD3 / SD3.5" in str(err.value) and "Flux" in str(err.value)


def test_partly_matching_file_warns_with_the_unused_tensors(pack_nodes, lora_dir, caplog):
    tiny = tm.build("flux")
    tensors = lora_files.make_lora(tiny, "diffusers", 16)
    tensors["transformer.not_a_layer.lora_A.weight"] = torch.zeros(16, 64)
    tensors["transformer.not_a_layer.lora_B.weight"] = torch.zeros(64, 16)
    wrong = "transformer.transformer_blocks.0.attn.to_out.0"
    tensors[f"{wrong}.lora_A.weight"] = torch.zeros(16, 99)  # does not fit the layer
    name = save(lora_dir, "flux_partial.safetensors", tensors)
    with caplog.at_level(logging.INFO):
        taca_lora(pack_nodes, tiny.patcher, name)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{len(tensors) - 4} of {len(tensors)} tensors matched" in text
    assert "transformer.not_a_layer.lora_A.weight" in text and f"{wrong}.lora_A.weight (shape" in text


class NotATensor:
    def __reduce__(self):
        return (os.getcwd, ())  # any callable: a pickle that runs code when loaded


def test_unsafe_pickle_is_refused_and_a_plain_tensor_pickle_is_accepted(pack_nodes, lora_dir):
    tiny = tm.build("flux")
    with open(os.path.join(lora_dir, "evil.pt"), "wb") as f:
        pickle.dump({"x": NotATensor()}, f)
    with pytest.raises(ValueError) as err:
        taca_lora(pack_nodes, tiny.patcher, "evil.pt")
    assert "not a safetensors file" in str(err.value) and "cannot be loaded safely" in str(err.value)
    torch.save(lora_files.make_lora(tiny, "diffusers", 16), os.path.join(lora_dir, "plain.pt"))
    taca_lora(pack_nodes, tiny.patcher, "plain.pt")


def test_bad_active_during_is_refused(pack_nodes, lora_dir):
    tiny = tm.build("flux")
    name = save(lora_dir, "flux_bad.safetensors", lora_files.make_lora(tiny, "diffusers", 16))
    with pytest.raises(ValueError) as err:
        taca_lora(pack_nodes, tiny.patcher, name, active="sometimes")
    assert "active_during" in str(err.value)


CLONE_CAN_SWAP_MODEL = "force_deepcopy" in inspect.signature(comfy.model_patcher.ModelPatcher.clone).parameters


@pytest.mark.skipif(not CLONE_CAN_SWAP_MODEL, reason="this ComfyUI's ModelPatcher.clone always shares the model")
@pytest.mark.parametrize("how", ["force_deepcopy", "deepclone_multigpu"])
def test_a_clone_onto_a_reloaded_model_runs_the_lora_beside_that_models_layers(pack_nodes, lora_dir, how):
    """ComfyUI 0.33 clones onto a freshly loaded model (TorchCompileModel and hooked conditioning under
    ModelPatcherDynamic: clone(disable_dynamic=True); multi-GPU: deepclone_multigpu); the loader is
    cached_patcher_init. Its model here has other weights, so running the source model's layers shows."""
    tiny = tm.build("flux")
    tiny.patcher.cached_patcher_init = (lambda **kwargs: tm.build("flux", seed=1).patcher, ())
    tensors = lora_files.make_lora(tiny, "diffusers", 16)
    name = save(lora_dir, f"flux_reloaded_{how}.safetensors", tensors)
    model = taca_lora(pack_nodes, taca(pack_nodes, tiny.patcher), name)
    clone = model.clone(force_deepcopy=True) if how == "force_deepcopy" else model.deepclone_multigpu()
    assert clone.model is not tiny.patcher.model
    reloaded = tm.build("flux", seed=1)
    reference = taca(pack_nodes, core_lora(reloaded.patcher, tensors))
    pos, neg, latent = inputs(tiny)
    assert rel_diff(one_step(clone, pos, neg, latent, 1.0, 3.0), one_step(reference, pos, neg, latent, 1.0, 3.0)) <= TOL
    assert torch.equal(one_step(clone, pos, neg, latent, 0.5, 3.0), one_step(reloaded.patcher, pos, neg, latent, 0.5, 3.0))
    # The source keeps its own layers.
    source_reference = taca(pack_nodes, core_lora(tiny.patcher, tensors))
    assert rel_diff(one_step(model, pos, neg, latent, 1.0, 3.0),
                    one_step(source_reference, pos, neg, latent, 1.0, 3.0)) <= TOL


@pytest.mark.skipif(not hasattr(comfy.model_patcher, "ModelPatcherDynamic"),
                    reason="this ComfyUI has no ModelPatcherDynamic")
def test_model_patcher_dynamic_on_a_cpu_load_device_is_the_plain_model_patcher():
    """Why no test runs the LoRA under ModelPatcherDynamic on the CPU: ComfyUI hands a CPU load device
    the plain ModelPatcher, and a GPU one needs comfy-aimdo's native library initialised on a CUDA/ROCm
    device. If this fails, ComfyUI can run it on the CPU: run the LoRA tests under it."""
    tiny = tm.build("flux")
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcherDynamic(tiny.patcher.model, cpu, cpu)
    assert type(patcher) is comfy.model_patcher.ModelPatcher and not patcher.is_dynamic()


def test_the_gate_is_per_thread(pack_nodes, lora_dir):
    """ComfyUI 0.33's multi-GPU sampling runs each device's model call in its own thread, all through one
    wrapper and one gate: the gate reads the model call under way in its own thread, so a call on one device
    never opens or closes it for another."""
    tiny = tm.build("flux")
    name = save(lora_dir, "flux_threads.safetensors", lora_files.make_lora(tiny, "diffusers", 16))
    model = taca_lora(pack_nodes, taca(pack_nodes, tiny.patcher), name)
    # by name: the pack ComfyUI loaded is another module object than this repository's taca.lora
    gates = {p.gate for p in model.object_patches.values() if type(p).__name__ == "LowRankForward"}
    assert len(gates) == 1
    gate = gates.pop()
    pack_hooks = sys.modules[type(gate).__module__].hooks
    settings = model.model_options["transformer_options"]["taca"]
    seen = []
    assert not gate.active  # no model call under way
    token = pack_hooks._current_call.set(pack_hooks.CallContext(1.0, 1.0, settings, settings.gamma, {}))
    try:
        other = threading.Thread(target=lambda: seen.append(gate.active))
        other.start()
        other.join()
        assert gate.active and seen == [False]
    finally:
        pack_hooks._current_call.reset(token)
    assert not gate.active
