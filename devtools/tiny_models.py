"""Tiny random-weight models built with ComfyUI's own classes (supported_models -> model_base -> ldm).

Each is a real ``comfy.model_base`` model wrapped in a real ``ModelPatcher``;
only the sizes are small and the weights random (seeded), so a forward pass
runs in milliseconds on the CPU.
"""

from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Optional

import torch

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

CONTEXT_DIM = 32  # width of the (random) text-encoder output fed to the models


class TinyModel(NamedTuple):
    kind: str
    patcher: Any  # comfy.model_patcher.ModelPatcher
    latent_channels: int
    text_tokens: int  # length of the conditioning we feed (before model-internal registers)
    register_tokens: int
    patch: int
    extra_cond: Dict[str, Any]


_FLUX = {
    "image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "vec_in_dim": 24,
    "context_in_dim": CONTEXT_DIM, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2,
    "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True,
}
_FLUX2 = {
    "image_model": "flux2", "guidance_embed": True, "in_channels": 128, "out_channels": 128, "vec_in_dim": None,
    "context_in_dim": CONTEXT_DIM, "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 2, "depth": 1,
    "depth_single_blocks": 2, "axes_dim": [8, 8, 8, 8], "theta": 2000, "patch_size": 1, "qkv_bias": False,
    "global_modulation": True, "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index",
    "ref_index_scale": 10.0,
}
_CHROMA = {
    "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": CONTEXT_DIM,
    "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 2,
    "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True,
    "in_dim": 64, "out_dim": 64, "hidden_dim": 64, "n_layers": 1,
}


def _sd3_config(x_block_self_attn_layers=()):
    depth = 2  # MMDiT: hidden = 64 * depth, heads = depth
    return {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth, "input_size": None,
        "adm_in_channels": 24, "pos_embed_scaling_factor": None, "pos_embed_max_size": 16, "num_patches": 256,
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": CONTEXT_DIM, "out_features": 64 * depth}},
        "qk_norm": "rms" if x_block_self_attn_layers else None,
        "x_block_self_attn_layers": list(x_block_self_attn_layers),
    }


KINDS = {
    # kind: (unet_config, latent_channels, text_tokens, extra cond)
    "flux": (_FLUX, 16, 256, {"pooled_output": 24, "guidance": 3.5}),
    "flux_schnell": (dict(_FLUX, guidance_embed=False), 16, 256, {"pooled_output": 24}),
    "flux2": (_FLUX2, 128, 512, {"pooled_output": 24, "guidance": 4.0}),
    "chroma": (_CHROMA, 16, 40, {"pooled_output": 24}),
    "sd3": (_sd3_config(), 16, 154, {"pooled_output": 24}),
    "sd35_medium": (_sd3_config(x_block_self_attn_layers=(0, 1)), 16, 154, {"pooled_output": 24}),
}


# Larger variants for the benchmark: FLUX-like head dim 128, attention about a third of the work.
BENCH_CONFIGS = {
    "flux": {"hidden_size": 512, "num_heads": 4, "axes_dim": [16, 56, 56], "depth": 1, "depth_single_blocks": 2,
             "mlp_ratio": 4.0},
}
BENCH_LATENT = {"flux": (32, 32)}  # 256 image tokens next to 256 text tokens


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Seeded weights with unit-scale activations (ComfyUI creates parameters uninitialised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:  # norm scales (RMSNorm/LayerNorm weights, QK-norm scales)
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        # SD3's position table is a buffer that a checkpoint would fill; ComfyUI leaves it uninitialised.
        for _, b in sorted(module.named_buffers(), key=lambda kv: kv[0]):
            if b.is_floating_point():
                b.copy_(0.5 * torch.randn(b.shape, generator=g))


def build(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32, size: str = "tiny") -> TinyModel:
    unet_config, latent_channels, text_tokens, extra = KINDS[kind]
    unet_config = dict(unet_config)
    if size == "bench":
        unet_config.update(BENCH_CONFIGS[kind])
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config)
    assert model_config is not None, f"ComfyUI found no model config for {kind}"
    model_config.set_inference_dtype(dtype, None)
    device = torch.device("cpu")
    base = model_config.get_model({}, device=device)
    _randomize(base.diffusion_model, seed)
    base.eval()
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)
    registers = int(getattr(base.diffusion_model, "register_length", 0) or 0)
    patch = int(unet_config.get("patch_size", 2))
    return TinyModel(kind, patcher, latent_channels, text_tokens, registers, patch, dict(extra))


def conditioning(tiny: TinyModel, seed: int, text_tokens: Optional[int] = None, batch: int = 1, **extra_cond):
    """A ComfyUI conditioning list [[context, {pooled_output, guidance, ...}]] of random text features."""
    g = torch.Generator().manual_seed(seed)
    n = tiny.text_tokens if text_tokens is None else text_tokens
    context = torch.randn(batch, n, CONTEXT_DIM, generator=g)
    options: Dict[str, Any] = {}
    for key, value in tiny.extra_cond.items():
        if key == "pooled_output":
            options[key] = torch.randn(batch, value, generator=g)
        else:
            options[key] = value
    options.update(extra_cond)
    return [[context, options]]


def latent(tiny: TinyModel, height: int = 16, width: int = 16, batch: int = 1) -> torch.Tensor:
    """An empty latent (B, C, H, W); for Flux.2 the latent is already at 1/16 scale."""
    return torch.zeros(batch, tiny.latent_channels, height, width)


def image_tokens(tiny: TinyModel, height: int, width: int) -> int:
    return math.ceil(height / tiny.patch) * math.ceil(width / tiny.patch)


def unload_all() -> None:
    comfy.model_management.unload_all_models()


# Models TACA refuses, built for the error-path tests (never sampled).
UNSUPPORTED = {
    "sd15": (comfy.supported_models.SD15, {
        "context_dim": 32, "model_channels": 32, "use_linear_in_transformer": False, "adm_in_channels": None,
        "use_temporal_attention": False, "in_channels": 4, "out_channels": 4, "num_res_blocks": [1, 1],
        "channel_mult": [1, 2], "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
        "transformer_depth_middle": 1, "use_spatial_transformer": True, "legacy": False, "image_size": 32,
        "use_checkpoint": False, "num_classes": None}),
    # AuraFlow is joint attention but not supported yet (issue: every joint-attention model).
    "auraflow": (comfy.supported_models.AuraFlow, {
        "cond_seq_dim": 32, "max_seq": 64, "dim": 64, "n_layers": 2, "n_double_layers": 1, "n_heads": 2,
        "patch_size": 2, "in_channels": 4, "out_channels": 4}),
}


def build_unsupported(kind: str):
    config_class, unet_config = UNSUPPORTED[kind]
    device = torch.device("cpu")
    base = config_class(dict(unet_config)).get_model({}, device=device)
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)
