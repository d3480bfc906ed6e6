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


def _random_patcher(model_config, dtype: torch.dtype, seed: int):
    """(BaseModel, ModelPatcher) of a ComfyUI model config on the CPU, with seeded random weights."""
    model_config.set_inference_dtype(dtype, None)
    device = torch.device("cpu")
    base = model_config.get_model({}, device=device)
    _randomize(base.diffusion_model, seed)
    base.eval()
    return base, comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)


def build(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32, size: str = "tiny") -> TinyModel:
    unet_config, latent_channels, text_tokens, extra = KINDS[kind]
    unet_config = dict(unet_config)
    if size == "bench":
        unet_config.update(BENCH_CONFIGS[kind])
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config)
    assert model_config is not None, f"ComfyUI found no model config for {kind}"
    base, patcher = _random_patcher(model_config, dtype, seed)
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


# ---------------------------------------------------------------------------------------------------------------
# Joint-attention families beyond FLUX/SD3 (issue 6).  Built from the supported_models class directly (their
# unet_config detection needs real checkpoint sizes); the conditioning carries what each model's extra_conds
# expects.  Shapes: ``latent_shape`` is the latent without batch (4D or 5D models).


class FamilyKind(NamedTuple):
    config_class: Any
    unet_config: Dict[str, Any]
    latent_shape: tuple  # (C, H, W) or (C, T, H, W)
    text_tokens: int
    extra_cond: Dict[str, Any]  # as KINDS: "pooled_output": width -> random tensor; other values as given


_HUNYUAN_VIDEO = {
    "image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 24,
    "context_in_dim": CONTEXT_DIM, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
    "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 256, "patch_size": [1, 2, 2], "qkv_bias": True,
    "guidance_embed": True, "byt5": False, "meanflow": False, "use_cond_type_embedding": False, "vision_in_dim": None,
}
BYT5_DIM = 1472  # fixed input width of ComfyUI's ByT5Mapper
VISION_DIM = 16  # tiny SigLIP width for HunyuanVideo 1.5's vision_in

FAMILY_KINDS = {
    "auraflow": FamilyKind(comfy.supported_models.AuraFlow, {
        "cond_seq_dim": CONTEXT_DIM, "max_seq": 64, "dim": 64, "n_layers": 2, "n_double_layers": 1, "n_heads": 2,
        "patch_size": 2, "in_channels": 4, "out_channels": 4}, (4, 16, 16), 40, {}),
    "hunyuan_video": FamilyKind(comfy.supported_models.HunyuanVideo, _HUNYUAN_VIDEO, (16, 3, 8, 8), 30,
                                {"pooled_output": 24, "guidance": 6.0}),
    "hunyuan_video_i2v": FamilyKind(comfy.supported_models.HunyuanVideoI2V, dict(_HUNYUAN_VIDEO, in_channels=33),
                                    (16, 3, 8, 8), 30, {"pooled_output": 24, "guidance": 6.0}),
    "hunyuan_video15": FamilyKind(comfy.supported_models.HunyuanVideo15, dict(
        _HUNYUAN_VIDEO, in_channels=33, vec_in_dim=None, guidance_embed=False, byt5=True,
        use_cond_type_embedding=True, vision_in_dim=VISION_DIM), (16, 2, 8, 8), 30, {"pooled_output": 24}),
    "hunyuan_image21": FamilyKind(comfy.supported_models.HunyuanImage21, dict(
        _HUNYUAN_VIDEO, in_channels=16, vec_in_dim=None, guidance_embed=True, byt5=True, patch_size=[1, 1],
        axes_dim=[16, 16]), (16, 8, 8), 30, {}),
    "hunyuan_video_skyreels": FamilyKind(comfy.supported_models.HunyuanVideoSkyreelsI2V,
                                         dict(_HUNYUAN_VIDEO, in_channels=32), (16, 3, 8, 8), 30,
                                         {"pooled_output": 24, "guidance": 6.0}),
    # SR distilled: latent + (2 x 16 + 2) concat channels
    "hunyuan_video15_sr": FamilyKind(comfy.supported_models.HunyuanVideo15_SR_Distilled, dict(
        _HUNYUAN_VIDEO, in_channels=50, vec_in_dim=None, guidance_embed=False, byt5=True,
        use_cond_type_embedding=True, vision_in_dim=VISION_DIM), (16, 2, 8, 8), 30, {"pooled_output": 24}),
    # refiner: 3D patch 1x1x1 over a one-frame latent, latent + concat image channels, meanflow time_r disabled
    "hunyuan_image21_refiner": FamilyKind(comfy.supported_models.HunyuanImage21Refiner, dict(
        _HUNYUAN_VIDEO, in_channels=32, vec_in_dim=None, guidance_embed=True, byt5=True, patch_size=[1, 1, 1],
        meanflow=True), (16, 1, 8, 8), 30, {}),
    # pixel-space Chroma: 3 channels, patch 4 here (16 in the real model), NeRF MLP head
    "chroma_radiance": FamilyKind(comfy.supported_models.ChromaRadiance, dict(
        _CHROMA, image_model="chroma_radiance", in_channels=3, out_channels=3, patch_size=4, nerf_hidden_size=16,
        nerf_mlp_ratio=2, nerf_depth=1, nerf_max_freqs=4, nerf_tile_size=0, nerf_final_head_type="linear",
        nerf_embedder_dtype=None), (3, 32, 32), 40, {"pooled_output": 24}),
    "qwen_image": FamilyKind(comfy.supported_models.QwenImage, {
        "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2,
        "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": CONTEXT_DIM,
        "axes_dims_rope": (8, 12, 12)}, (16, 1, 16, 16), 34, {}),
    "hidream": FamilyKind(comfy.supported_models.HiDream, {
        "image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 1,
        "num_single_layers": 1, "attention_head_dim": 32, "num_attention_heads": 2,
        "caption_channels": [CONTEXT_DIM, 24], "text_emb_dim": 24, "num_routed_experts": 2,
        "num_activated_experts": 1, "axes_dims_rope": [16, 8, 8], "max_resolution": [32, 32],
        "llama_layers": [0, 1]}, (16, 16, 16), 36, {"pooled_output": 24}),
    "lumina2": FamilyKind(comfy.supported_models.Lumina2, {
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "n_layers": 2,
        "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 16, "ffn_dim_multiplier": 2.0,
        "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": CONTEXT_DIM, "axes_dims": [8, 12, 12],
        "axes_lens": [300, 64, 64], "rope_theta": 10000.0}, (16, 16, 16), 38, {}),
    # Z-Image as newer ComfyUI builds it (pad_tokens_multiple=32: caption and image tokens padded with learned
    # pad tokens); ComfyUI 0.3.75's detection leaves pad_tokens_multiple unset, which "lumina2" covers.
    "z_image": FamilyKind(comfy.supported_models.ZImage, {
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "n_layers": 2,
        "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "multiple_of": 16, "ffn_dim_multiplier": 8.0 / 3.0,
        "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": CONTEXT_DIM, "axes_dims": [32, 48, 48],
        "axes_lens": [300, 64, 64], "rope_theta": 256.0, "z_image_modulation": True, "time_scale": 1000.0,
        "pad_tokens_multiple": 32}, (16, 14, 18), 37, {}),
    "omnigen2": FamilyKind(comfy.supported_models.Omnigen2, {
        "image_model": "omnigen2", "patch_size": 2, "in_channels": 16, "hidden_size": 64, "num_layers": 2,
        "num_refiner_layers": 1, "num_attention_heads": 2, "num_kv_heads": 1, "multiple_of": 16,
        "axes_dim_rope": [8, 12, 12], "axes_lens": [64, 64, 64], "text_feat_dim": CONTEXT_DIM,
        "timestep_scale": 1000.0}, (16, 16, 16), 35, {}),
}


def build_family(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyModel:
    """A tiny random-weight model of one of FAMILY_KINDS, as a ComfyUI ModelPatcher."""
    spec = FAMILY_KINDS[kind]
    base, patcher = _random_patcher(spec.config_class(dict(spec.unet_config)), dtype, seed)
    patch = spec.unet_config.get("patch_size", 2)
    patch = int(patch[-1]) if isinstance(patch, (list, tuple)) else int(patch)
    return TinyModel(kind, patcher, spec.latent_shape[0], spec.text_tokens, 0, patch, dict(spec.extra_cond))


def family_latent(tiny: TinyModel, batch: int = 1, shape: Optional[tuple] = None) -> torch.Tensor:
    return torch.zeros((batch,) + tuple(shape or FAMILY_KINDS[tiny.kind].latent_shape))


class _VisionOutput(NamedTuple):  # what CLIPVisionEncode hands HunyuanVideo 1.5 (only last_hidden_state is read)
    last_hidden_state: torch.Tensor


def family_conditioning(tiny: TinyModel, seed: int, batch: int = 1, text_tokens: Optional[int] = None,
                        llama_tokens: int = 0, byt5_tokens: int = 0, vision_tokens: int = 0, **extra_cond):
    """Random conditioning with the extra inputs each family's extra_conds reads.

    llama_tokens: HiDream's ``conditioning_llama3`` (B, layers, L, 24); byt5_tokens: ``conditioning_byt5small``
    (HunyuanImage 2.1 / HunyuanVideo 1.5); vision_tokens: ``clip_vision_output`` (HunyuanVideo 1.5).
    """
    cond = conditioning(tiny, seed, text_tokens=text_tokens, batch=batch)
    g = torch.Generator().manual_seed(seed + 1000)
    options = cond[0][1]
    if llama_tokens:
        layers = len(FAMILY_KINDS[tiny.kind].unet_config["llama_layers"])
        options["conditioning_llama3"] = torch.randn(batch, layers, llama_tokens, 24, generator=g)
    if byt5_tokens:
        options["conditioning_byt5small"] = torch.randn(batch, byt5_tokens, BYT5_DIM, generator=g)
    if vision_tokens:
        options["clip_vision_output"] = _VisionOutput(torch.randn(batch, vision_tokens, VISION_DIM, generator=g))
    if tiny.kind == "omnigen2" and "attention_mask" not in extra_cond:
        # OmniGen2's extra_conds takes num_tokens from the text encoder's attention mask
        options["attention_mask"] = torch.ones(batch, cond[0][0].shape[1], dtype=torch.long)
    options.update(extra_cond)
    return cond


# Models whose text enters through cross-attention (TACA refuses them), one tiny model per model_base class
# for the error-path tests (never sampled).
_SDXL_UNET = {
    "model_channels": 32, "use_linear_in_transformer": True, "transformer_depth": [0, 1], "context_dim": 32,
    "adm_in_channels": 2816, "use_temporal_attention": False, "in_channels": 4, "out_channels": 4,
    "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth_output": [0, 0, 1, 1],
    "transformer_depth_middle": 1, "use_spatial_transformer": True, "legacy": False, "image_size": 32,
    "use_checkpoint": False, "num_classes": "sequential", "num_head_channels": 32,
}
_WAN = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 16, "in_dim": 16,
        "dim": 64, "ffn_dim": 128, "freq_dim": 32, "text_dim": 32, "out_dim": 16, "num_heads": 2, "num_layers": 1}
CROSS_ATTENTION_KINDS = {
    "sdxl": (comfy.supported_models.SDXL, _SDXL_UNET),
    "wan21": (comfy.supported_models.WAN21_T2V, _WAN),
    "wan21_vace": (comfy.supported_models.WAN21_Vace, dict(_WAN, vace_layers=1, vace_in_dim=96)),
    "wan22": (comfy.supported_models.WAN22_T2V, dict(_WAN, in_dim=48, out_dim=48)),
    "pixart": (comfy.supported_models.PixArtAlpha, {
        "image_model": "pixart_alpha", "input_size": 16, "patch_size": 2, "in_channels": 4, "hidden_size": 64,
        "depth": 1, "num_heads": 2, "caption_channels": 32, "model_max_length": 16, "micro_condition": False}),
    "hunyuan_dit": (comfy.supported_models.HunyuanDiT, {
        "image_model": "hydit", "input_size": 16, "patch_size": 2, "in_channels": 4, "hidden_size": 64, "depth": 2,
        "num_heads": 2, "text_states_dim": 32, "text_states_dim_t5": 32, "text_len": 8, "text_len_t5": 8}),
    "cosmos_predict2": (comfy.supported_models.CosmosT2IPredict2, {
        "image_model": "cosmos_predict2", "max_img_h": 64, "max_img_w": 64, "max_frames": 8, "in_channels": 16,
        "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 64, "num_blocks": 1,
        "num_heads": 2, "crossattn_emb_channels": 32, "pos_emb_cls": "rope3d", "adaln_lora_dim": 16}),
}


def build_cross_attention(kind: str):
    config_class, unet_config = CROSS_ATTENTION_KINDS[kind]
    device = torch.device("cpu")
    base = config_class(dict(unet_config)).get_model({}, device=device)
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)


# A joint-attention model TACA does not support yet (for the generic "not supported" error path): Hunyuan3D 2.0 runs
# joint attention over shape latents and image-encoder tokens (no text).
UNSUPPORTED["hunyuan3d"] = (comfy.supported_models.Hunyuan3Dv2, {
    "image_model": "hunyuan3d2", "in_channels": 16, "context_in_dim": 32, "hidden_size": 64, "num_heads": 2,
    "depth": 1, "depth_single_blocks": 1})
