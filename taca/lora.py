"""The TACA LoRA, applied beside each target layer at forward time and only while TACA acts.

The authors fine-tune LoRAs with TACA active and switch them off once TACA
stops (their pipelines unload the LoRA after the TACA steps).  ComfyUI's core
loader merges a LoRA into the weights for every step; this module instead adds
the low-rank update to the layer's *output*, ``y += s * (x A^T) B^T`` (written
into the output slice of fused qkv / linear1 layers), so

* base weights are never modified and no weight-sized backup or temporary
  exists; low-VRAM offloaded layers work because A and B follow the input's
  device and dtype;
* the update can be switched per model call: a gate that reads the pack's
  context of the model call under way, the same window test TACA uses.

The patches are ComfyUI object patches on ``<layer>.forward``, so every patcher
applies and restores them the same way: ``ModelPatcher.patch_model`` /
``unpatch_model``, which ComfyUI 0.33's ``ModelPatcherDynamic.partially_load``
calls too (it casts each layer's weight to the GPU inside the layer's own
forward, which the patch calls unchanged).  A patch holds the layer's own bound
forward; a clone onto another model object (0.33's ``clone(disable_dynamic=True)``
for torch.compile or hooks, ``force_deepcopy``, ``deepclone_multigpu``) gets its
patches rebound to that model's layers by an ON_CLONE callback.

Key mapping is ComfyUI's own (``comfy.lora.model_lora_keys_unet``,
``comfy.lora_convert.convert_lora``, ``comfy.lora.load_lora``); the only
addition is PEFT's ``base_model.model.`` prefix, which ComfyUI maps for SD3
but not for FLUX.  ComfyUI modules are imported inside the functions that need
them, so importing this module does not import ComfyUI.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import hooks, settings as taca_settings
from .report import running_server

log = logging.getLogger("comfyui-taca")

ACTIVE_DURING = ("taca_steps", "all_steps")
CALLBACK_KEY = "comfyui-taca-lora"


class LowRank(NamedTuple):
    """One LoRA pair for one target layer: y[..., start:start+size] += scale * (x @ down.T) @ up.T."""

    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_size, rank)
    scale: float  # strength * alpha / rank (ComfyUI: alpha / rank if alpha is given, else 1)
    start: Optional[int]  # output slice for fused layers, or None for the whole output

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        down = self.down.to(device=x.device, dtype=x.dtype)
        up = self.up.to(device=x.device, dtype=x.dtype)
        delta = torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)
        if self.scale != 1.0:
            delta = delta * self.scale
        if self.start is None:
            return out.add_(delta)
        out.narrow(-1, self.start, delta.shape[-1]).add_(delta)
        return out


class LoraGate:
    """Whether the LoRA acts in the model call under way; shared by one loader's layer patches.

    It reads the context of the model call under way in this thread (``taca.hooks.current_call``), so model
    calls running at the same time (ComfyUI 0.33's multi-GPU sampling, one thread per device) each see their own.
    """

    def __init__(self, always: bool, node_id: Optional[str] = None, lora_name: str = ""):
        self.always = always
        self.node_id = node_id
        self.lora_name = lora_name
        self._told_no_taca = False

    @property
    def active(self) -> bool:
        if self.always:
            return True
        call = hooks.current_call()
        if call is None:
            return False  # a layer run outside a model call of the pack's wrapper
        if call.settings is None:
            self._tell_no_taca()
        return call.taca_window

    def _tell_no_taca(self) -> None:
        if self._told_no_taca:
            return
        self._told_no_taca = True
        message = (f"TACA LoRA '{self.lora_name}' is meant to be used with TACA, but this model has no TACA Patch "
                   f"Model; the LoRA acts while sigma >= {taca_settings.DEFAULT_SCHEDULE.sigma_end} without TACA. "
                   "Add a TACA Patch Model node (before or after the loader) or set active_during to all_steps.")
        log.warning(message)
        notify_node(self.node_id, message)


class LowRankForward:
    """Replaces one layer's ``forward`` (an object patch): original output plus the low-rank updates."""

    def __init__(self, original_forward, updates: Sequence[LowRank], gate: LoraGate, module_path: str,
                 own_forward: bool):
        self.original_forward = original_forward
        self.updates = tuple(updates)
        self.gate = gate
        self.module_path = module_path
        # True when original_forward is the layer's own bound forward (not another pack's patch):
        # then it belongs to one model object and is rebound for a clone onto another one.
        self.own_forward = own_forward

    def __call__(self, x, *args, **kwargs):
        out = self.original_forward(x, *args, **kwargs)
        if not self.gate.active:
            return out
        for update in self.updates:
            out = update.add_to(out, x)
        return out

    def for_model(self, model: torch.nn.Module) -> "LowRankForward":
        """This patch calling ``model``'s layer instead of the one it was made on (self if already so)."""
        import comfy.utils

        original = self.original_forward
        if isinstance(original, LowRankForward):  # two TACA LoRA loaders on one layer
            rebound = original.for_model(model)
        elif self.own_forward:
            module = comfy.utils.get_attr(model, self.module_path)
            rebound = original if original.__self__ is module else original.__func__.__get__(module)
        else:
            rebound = original  # another pack's forward patch: its own business
        if rebound is original:
            return self
        return LowRankForward(rebound, self.updates, self.gate, self.module_path, self.own_forward)


def rebind_on_clone(source: Any, clone: Any) -> None:
    """ON_CLONE callback: a clone holding another model object gets patches calling that model's layers.

    Without it the clone's layers would run the source model's layers (its weights, its device,
    its weight patches), since the copied object patches hold their bound forwards.
    """
    if clone.model is source.model:
        return
    for name, patch_object in list(clone.object_patches.items()):
        if isinstance(patch_object, LowRankForward):
            clone.object_patches[name] = patch_object.for_model(clone.model)


def notify_node(node_id: Optional[str], text: str) -> None:
    """Show ``text`` on the node in the frontend, when a ComfyUI server is running."""
    if node_id is None:
        return
    server = running_server()
    if server is None or not hasattr(server, "send_progress_text"):
        return  # no server (scripts, tests) or an older server: the log line suffices
    try:
        server.send_progress_text(text, node_id)
    except Exception as err:  # a notice must never fail the run
        log.debug("TACA LoRA notice not sent: %s", err)


class LoraMatch(NamedTuple):
    updates: Dict[str, List[LowRank]]  # module path (e.g. diffusion_model.double_blocks.0.img_attn.qkv) -> pairs
    matched_tensors: int
    total_tensors: int
    unmatched: List[str]  # file tensor names that were not used, with a reason where one is known


def load_lora_file(path: str) -> Dict[str, torch.Tensor]:
    """Load a LoRA file the safe way: safetensors, or a pickle holding plain tensors only."""
    import comfy.utils

    try:
        return comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as err:
        name = os.path.basename(path)
        if name.lower().endswith(".safetensors"):
            raise ValueError(f"TACA LoRA Loader: '{name}' is not a readable safetensors file ({err}).") from err
        raise ValueError(
            f"TACA LoRA Loader: '{name}' is not a safetensors file and cannot be loaded safely: it contains "
            f"more than plain tensors (pickled objects can run code). Use the .safetensors release of the "
            f"LoRA, or convert the file to safetensors. ({type(err).__name__})") from err


def guess_base_model(tensors: Dict[str, torch.Tensor]) -> str:
    """The base model a LoRA file looks made for, from its key names and layer widths."""
    names = " ".join(tensors)
    if any(s in names for s in ("single_transformer_blocks", "double_blocks", "single_blocks", "img_attn", "txt_attn")):
        return "FLUX.1"
    if any(s in names for s in ("joint_blocks", "context_block", "x_block")):
        return "SD3 / SD3.5"
    if "transformer_blocks" in names and ("add_q_proj" in names or "attn2" in names):
        widths = {t.shape[1] for k, t in tensors.items() if k.endswith(("lora_A.weight", "lora_down.weight"))
                  and t.ndim == 2}
        if 3072 in widths:
            return "FLUX.1 (double blocks only)"
        return "SD3 / SD3.5"
    if any(s in names for s in ("down_blocks", "up_blocks", "input_blocks", "output_blocks", "lora_te")):
        return "an SD1.x / SDXL UNet"
    return "an unknown model"


def _key_map(base_model: Any) -> Dict[str, Any]:
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(base_model, {})
    # PEFT saves "base_model.model.<diffusers name>"; ComfyUI maps that for SD3, not for FLUX.
    for key in list(key_map):
        if key.startswith("transformer."):
            key_map.setdefault("base_model.model." + key[len("transformer."):], key_map[key])
    return key_map


def match_lora(base_model: Any, tensors: Dict[str, torch.Tensor], strength: float) -> LoraMatch:
    """Map a LoRA file onto ``base_model``'s layers with ComfyUI's key maps, checking every shape."""
    import comfy.lora
    import comfy.lora_convert
    from comfy.weight_adapter import LoRAAdapter

    converted = comfy.lora_convert.convert_lora(tensors)
    key_map = _key_map(base_model)
    # Every dotted prefix of the file's names (and the part before "_lora." of diffusers-style names):
    # the key-map entries the file can possibly use.
    prefixes = set()
    for name in converted:
        parts = name.split(".")
        prefixes.update(".".join(parts[:i]) for i in range(1, len(parts)))
        if "_lora." in name:
            prefixes.add(name.split("_lora.")[0])
    modules = dict(base_model.named_modules())
    updates: Dict[str, List[LowRank]] = {}
    used = set()
    reasons: Dict[str, str] = {}
    for lora_prefix in sorted(prefixes.intersection(key_map)):
        # One prefix per call: load_lora shares one loaded-keys set among the adapters of a call.
        patches = comfy.lora.load_lora(converted, {lora_prefix: key_map[lora_prefix]}, log_missing=False)
        for target, adapter in patches.items():
            keys = sorted(getattr(adapter, "loaded_keys", ()) or ())
            reason = _unsupported_reason(target, adapter, modules, LoRAAdapter)
            if reason is not None:
                for key in keys:
                    reasons[key] = reason
                continue
            weight_key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
            up, down, alpha = adapter.weights[0], adapter.weights[1], adapter.weights[2]
            scale = strength * ((alpha / down.shape[0]) if alpha is not None else 1.0)
            start = offset[1] if offset is not None else None
            updates.setdefault(weight_key[:-len(".weight")], []).append(
                LowRank(down.float(), up.float(), float(scale), start))
            used.update(keys)
    unmatched = [f"{k} ({reasons[k]})" if k in reasons else k for k in sorted(converted) if k not in used]
    return LoraMatch(updates, len(used), len(converted), unmatched)


def _unsupported_reason(target: Any, adapter: Any, modules: Dict[str, Any], lora_adapter_class: type) -> Optional[str]:
    """Why a ComfyUI patch cannot be applied beside its layer, or None if it can."""
    weight_key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
    extra_function = not isinstance(target, str) and len(target) > 2 and target[2] is not None
    module = modules.get(weight_key[:-len(".weight")]) if weight_key.endswith(".weight") else None
    if not isinstance(adapter, lora_adapter_class):
        return f"not a plain LoRA ({getattr(adapter, 'name', type(adapter).__name__)})"
    if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor) or module.weight.ndim != 2:
        return "target is not a linear layer"
    if extra_function or (offset is not None and offset[0] != 0):
        return "unsupported fused-layer mapping"
    up, down, alpha, mid, dora_scale, reshape = adapter.weights
    out_size = offset[2] if offset is not None else module.weight.shape[0]
    if mid is not None or dora_scale is not None or reshape is not None:
        return "LoCon/DoRA/reshape LoRAs are not supported"
    if up.ndim != 2 or down.ndim != 2 or down.shape[1] != module.weight.shape[1] or up.shape[0] != out_size:
        return f"shape {tuple(up.shape)} x {tuple(down.shape)} does not fit {weight_key} {tuple(module.weight.shape)}"
    return None


def install(model_patcher: Any, match: LoraMatch, active_during: str, node_id: Optional[str],
            lora_name: str) -> None:
    """Object-patch each target layer's forward on ``model_patcher`` (a clone the caller owns)."""
    import comfy.utils
    from comfy.patcher_extension import CallbacksMP

    gate = LoraGate(always=(active_during == "all_steps"), node_id=node_id, lora_name=lora_name)
    for module_path, updates in match.updates.items():
        name = module_path + ".forward"
        original = model_patcher.get_model_object(name)  # chains onto another pack's forward patch
        module = comfy.utils.get_attr(model_patcher.model, module_path)
        own = inspect.ismethod(original) and original.__self__ is module
        model_patcher.add_object_patch(name, LowRankForward(original, updates, gate, module_path, own))
    if rebind_on_clone not in model_patcher.get_callbacks(CallbacksMP.ON_CLONE, CALLBACK_KEY):
        model_patcher.add_callback_with_key(CallbacksMP.ON_CLONE, CALLBACK_KEY, rebind_on_clone)
    if active_during == "taca_steps":
        hooks.ensure_call_wrapper(model_patcher, None)  # the gate reads the model call's context


def summarize(match: LoraMatch, lora_name: str, model_name: str, shown: int = 12) -> Tuple[str, Optional[str]]:
    """(info line, warning or None) for the log and the node."""
    info = (f"TACA LoRA '{lora_name}': {match.matched_tensors} of {match.total_tensors} tensors matched "
            f"{sum(len(v) for v in match.updates.values())} layers of {model_name}.")
    if not match.unmatched:
        return info, None
    listed = ", ".join(match.unmatched[:shown])
    more = f" and {len(match.unmatched) - shown} more" if len(match.unmatched) > shown else ""
    return info, f"TACA LoRA '{lora_name}': {len(match.unmatched)} tensors not used: {listed}{more}."


def no_match_error(tensors: Dict[str, torch.Tensor], lora_name: str, model_name: str) -> ValueError:
    guess = guess_base_model(tensors)
    return ValueError(
        f"TACA LoRA Loader: none of the {len(tensors)} tensors in '{lora_name}' match the model it was applied to "
        f"({model_name}). The file looks made for {guess}. Load the TACA LoRA that matches your base model "
        "(the authors publish one for FLUX.1-dev and one for SD3.5-Medium).")
