"""Tiny random-weight models, configured the way ComfyUI configures a real checkpoint.

Each kind is described once as a tiny synthetic checkpoint: a diffusion-model state dict with the key names
real checkpoints have (ComfyUI's own format, as the diffusion-model loader sees it after the prefix is
stripped) and the shapes of the tiny model. ComfyUI's model detection
(``comfy.model_detection.detect_unet_config``) reads it and its class matching
(``model_config_from_unet_config``) picks the ``comfy.supported_models`` class, exactly as for a file on
disk; then the tiny sizes that detection takes from constants of the full-size model (head counts, rotary
axes, MLP ratios, ...) replace those constants, and the class's ``get_model`` builds a real
``comfy.model_base`` model, wrapped in a real ``ModelPatcher``, with seeded random weights. A field that a
newer ComfyUI requires and fills in during detection therefore reaches the tiny models too.
"""

from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch

import comfy.model_detection
import comfy.model_patcher
import comfy.supported_models

CONTEXT_DIM = 32  # width of the (random) text-encoder output fed to the models
BYT5_DIM = 1472  # fixed input width of ComfyUI's ByT5Mapper
VISION_DIM = 16  # tiny SigLIP width for HunyuanVideo 1.5's vision_in

Shape = Tuple[int, ...]


class TinyCheckpoint(NamedTuple):
    """A tiny synthetic checkpoint, described by the keys ComfyUI's detection reads."""
    expected: str  # the comfy.supported_models class ComfyUI picks for it
    keys: Dict[str, Shape]  # key -> shape in the tiny model (the tiny model has every one of them)
    sizes: Dict[str, Any] = {}  # tiny values of what detection takes from full-size constants
    # Keys ComfyUI reads at their full-size width to choose the class or a detection branch (Z-Image's dim 3840,
    # HunyuanVideo 1.5's SigLIP width 1152, ...): the detection state dict carries them at that width, and
    # `sizes` gives the tiny model its own.
    wide: Dict[str, Shape] = {}
    # False where no tiny checkpoint can reach the class through matching (the UNets: SD1.5 and SDXL are matched on
    # full-size channel counts and depths): the detected dict goes to the `expected` class directly.
    match: bool = True


class Kind(NamedTuple):
    checkpoint: TinyCheckpoint
    latent_shape: tuple  # latent without batch: (C, H, W) or (C, T, H, W)
    text_tokens: int  # length of the conditioning we feed (before model-internal registers)
    extra_cond: Dict[str, Any]  # "pooled_output": width -> random tensor; other values as given
    # audio latent without batch (C, channels, T), nested with the video latent into one latent (MiniMax H3)
    audio_latent_shape: Optional[tuple] = None

    @property
    def unet_config(self) -> Dict[str, Any]:
        """The unet_config the tiny model is built with (detected, then the tiny sizes)."""
        return dict(_detect(self.checkpoint)[1])


FamilyKind = Kind


class TinyModel(NamedTuple):
    kind: str
    patcher: Any  # comfy.model_patcher.ModelPatcher
    latent_channels: int
    text_tokens: int  # length of the conditioning we feed (before model-internal registers)
    register_tokens: int
    patch: int
    extra_cond: Dict[str, Any]


# --------------------------------------------------------------------------------------------------------------
# Checkpoint descriptions, one function per architecture; block keys are listed so detection can count blocks.


def _blocks(template: str, count: int, shape: Shape) -> Dict[str, Shape]:
    return {template.format(i): shape for i in range(count)}


def _flux(hidden_size: int = 64, num_heads: int = 2, axes_dim: Sequence[int] = (8, 12, 12), depth: int = 2,
          depth_single_blocks: int = 2, mlp_ratio: float = 2.0, guidance: bool = True) -> TinyCheckpoint:
    head = hidden_size // num_heads
    keys = {"img_in.weight": (hidden_size, 16 * 2 * 2), "txt_in.weight": (hidden_size, CONTEXT_DIM),
            "vector_in.in_layer.weight": (hidden_size, 24), "final_layer.linear.weight": (16 * 2 * 2, hidden_size)}
    if guidance:
        keys["guidance_in.in_layer.weight"] = (hidden_size, 256)
    keys.update(_blocks("double_blocks.{}.img_attn.norm.key_norm.scale", depth, (head,)))
    keys.update(_blocks("single_blocks.{}.norm.key_norm.scale", depth_single_blocks, (head,)))
    return TinyCheckpoint("Flux" if guidance else "FluxSchnell", keys,
                          {"num_heads": num_heads, "axes_dim": list(axes_dim), "mlp_ratio": mlp_ratio})


def _flux2() -> TinyCheckpoint:
    keys = {"img_in.weight": (64, 128), "txt_in.weight": (64, CONTEXT_DIM), "guidance_in.in_layer.weight": (64, 256),
            "double_stream_modulation_img.lin.weight": (6 * 64, 64), "final_layer.linear.weight": (128, 64)}
    keys.update(_blocks("double_blocks.{}.img_attn.norm.key_norm.scale", 1, (32,)))
    keys.update(_blocks("single_blocks.{}.norm.key_norm.scale", 2, (32,)))
    return TinyCheckpoint("Flux2", keys, {"num_heads": 2, "axes_dim": [8, 8, 8, 8]})


_CHROMA_SIZES = {"num_heads": 2, "axes_dim": [8, 12, 12], "mlp_ratio": 2.0, "out_dim": 64, "hidden_dim": 64,
                 "n_layers": 1}


def _chroma() -> TinyCheckpoint:
    keys = {"img_in.weight": (64, 64), "txt_in.weight": (64, CONTEXT_DIM), "final_layer.linear.weight": (64, 64),
            "distilled_guidance_layer.norms.0.scale": (64,)}
    keys.update(_blocks("double_blocks.{}.img_attn.norm.key_norm.scale", 1, (32,)))
    keys.update(_blocks("single_blocks.{}.norm.key_norm.scale", 2, (32,)))
    return TinyCheckpoint("Chroma", keys, _CHROMA_SIZES)


def _chroma_radiance() -> TinyCheckpoint:
    # pixel-space Chroma: 3 channels, patch 4 here (16 in the real model), NeRF MLP head, no img_in
    keys = {"img_in_patch.weight": (64, 3, 4, 4), "txt_in.weight": (64, CONTEXT_DIM),
            "distilled_guidance_layer.norms.0.scale": (64,), "nerf_blocks.0.norm.scale": (16,),
            "nerf_final_layer.linear.weight": (3, 16)}
    keys.update(_blocks("double_blocks.{}.img_attn.norm.key_norm.scale", 1, (32,)))
    keys.update(_blocks("single_blocks.{}.norm.key_norm.scale", 2, (32,)))
    return TinyCheckpoint("ChromaRadiance", keys, dict(
        _CHROMA_SIZES, patch_size=4, nerf_hidden_size=16, nerf_mlp_ratio=2, nerf_depth=1, nerf_max_freqs=4,
        nerf_tile_size=0))


def sd3_checkpoint(depth: int = 2, adm_in_channels: int = 24, context_dim: int = CONTEXT_DIM,
                   pos_embed_max_size: int = 16, x_block_self_attn_layers: Sequence[int] = ()) -> TinyCheckpoint:
    """MMDiT (SD3 / SD3.5): detection reads every size from the shapes (hidden = 64 x depth, heads = depth)."""
    hidden = 64 * depth
    keys = {"x_embedder.proj.weight": (hidden, 16, 2, 2), "final_layer.linear.weight": (16 * 2 * 2, hidden),
            "y_embedder.mlp.0.weight": (hidden, adm_in_channels), "context_embedder.weight": (hidden, context_dim),
            "pos_embed": (1, pos_embed_max_size ** 2, hidden)}
    keys.update(_blocks("joint_blocks.{}.context_block.attn.qkv.weight", depth, (3 * hidden, hidden)))
    if x_block_self_attn_layers:  # SD3.5 Medium: RMS QK norm and image-only self-attention layers
        keys.update(_blocks("joint_blocks.{}.context_block.attn.ln_q.weight", depth, (64,)))
        keys.update({f"joint_blocks.{i}.x_block.attn2.qkv.weight": (3 * hidden, hidden)
                     for i in x_block_self_attn_layers})
    return TinyCheckpoint("SD3", keys)


def _auraflow() -> TinyCheckpoint:
    return TinyCheckpoint("AuraFlow", {
        "positional_encoding": (1, 64, 64), "cond_seq_linear.weight": (64, CONTEXT_DIM),
        "double_layers.0.attn.w1q.weight": (64, 64), "single_layers.0.attn.w1q.weight": (64, 64),
    }, {"cond_seq_dim": CONTEXT_DIM, "dim": 64, "n_heads": 2, "patch_size": 2, "in_channels": 4, "out_channels": 4},
        wide={"cond_seq_linear.weight": (64, 2048)})  # AuraFlow is matched on its 2048-wide T5 input


def _hunyuan(expected: str, in_channels: int = 16, patch: Sequence[int] = (1, 2, 2), vector: bool = True,
             guidance: bool = True, byt5: bool = False, meanflow: bool = False, v15: bool = False,
             wide_in_channels: Optional[int] = None) -> TinyCheckpoint:
    """HunyuanVideo 1.0 / 1.5 and HunyuanImage 2.1 (one ComfyUI architecture, told apart by their keys)."""
    keys = {"img_in.proj.weight": (64, in_channels) + tuple(patch),
            "final_layer.linear.weight": (16 * math.prod(patch), 64),
            "txt_in.input_embedder.weight": (64, CONTEXT_DIM),
            "txt_in.individual_token_refiner.blocks.0.norm1.weight": (64,),
            "double_blocks.0.img_attn.norm.key_norm.scale": (32,), "single_blocks.0.norm.key_norm.scale": (32,)}
    sizes: Dict[str, Any] = {"num_heads": 2, "mlp_ratio": 2.0,
                             "axes_dim": [8, 12, 12] if len(patch) == 3 else [16, 16]}
    wide: Dict[str, Shape] = {}
    if vector:
        keys["vector_in.in_layer.weight"] = (64, 24)
        sizes["vec_in_dim"] = 24  # detection assumes CLIP-L's 768
    if guidance:
        keys["guidance_in.in_layer.weight"] = (64, 256)
    if byt5:
        keys["byt5_in.fc1.weight"] = (2048, BYT5_DIM)
    if meanflow:
        keys["time_r_in.in_layer.weight"] = (64, 256)
    if v15:  # HunyuanVideo 1.5: SigLIP input and condition-type embedding; matched on SigLIP's width 1152
        keys.update({"vision_in.proj.0.weight": (VISION_DIM,), "cond_type_embedding.weight": (3, 64)})
        wide["vision_in.proj.0.weight"] = (1152,)
        sizes["vision_in_dim"] = VISION_DIM
    if wide_in_channels is not None:  # a class matched on its full-size input channels
        wide["img_in.proj.weight"] = (64, wide_in_channels) + tuple(patch)
        sizes["in_channels"] = in_channels
    return TinyCheckpoint(expected, keys, sizes, wide)


def _qwen_image() -> TinyCheckpoint:
    keys = {"txt_norm.weight": (CONTEXT_DIM,), "img_in.weight": (64, 64), "proj_out.weight": (64, 64)}
    keys.update(_blocks("transformer_blocks.{}.attn.norm_q.weight", 2, (32,)))
    return TinyCheckpoint("QwenImage", keys, {
        "patch_size": 2, "out_channels": 16, "attention_head_dim": 32, "num_attention_heads": 2,
        "joint_attention_dim": CONTEXT_DIM, "axes_dims_rope": (8, 12, 12)})


def _hidream() -> TinyCheckpoint:
    # Detection reads only that the checkpoint is HiDream; every size is a full-size constant.
    return TinyCheckpoint("HiDream", {"caption_projection.0.linear.weight": (64, 24)}, {
        "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 32, "num_attention_heads": 2,
        "caption_channels": [CONTEXT_DIM, 24], "text_emb_dim": 24, "num_routed_experts": 2,
        "num_activated_experts": 1, "axes_dims_rope": [16, 8, 8], "max_resolution": [32, 32], "llama_layers": [0, 1]})


def _hidream_o1() -> TinyCheckpoint:
    # Detection reads only that the checkpoint is HiDream-O1; every size is a constant of the full-size model (the
    # Qwen3-VL-8B decoder and vision tower). Grouped-query attention as in the real model (32 heads, 8 K/V heads); the
    # vocabulary keeps its real size, as the chat template's special tokens reach id 151673.
    return TinyCheckpoint("HiDreamO1", {"t_embedder1.mlp.0.weight": (64, 256), "x_embedder.proj1.weight": (16, 3072)}, {
        "text_config_overrides": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                  "rope_dims": [4, 2, 2]},
        "vision_config_overrides": {"hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "depth": 1,
                                    "num_position_embeddings": 64}})


def _lumina2() -> TinyCheckpoint:
    keys = {"cap_embedder.1.weight": (64, CONTEXT_DIM), "noise_refiner.0.attention.k_norm.weight": (32,)}
    keys.update(_blocks("layers.{}.ffn_norm1.weight", 2, (64,)))
    return TinyCheckpoint("Lumina2", keys, {
        "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 16, "ffn_dim_multiplier": 2.0,
        "norm_eps": 1e-5, "axes_dims": [8, 12, 12], "axes_lens": [300, 64, 64], "rope_theta": 10000.0})


def _z_image() -> TinyCheckpoint:
    # Z-Image with its learned pad tokens (pad_tokens_multiple=32 where the ComfyUI version knows them); ComfyUI
    # recognises Z-Image by its 3840-wide caption embedder.
    keys = {"cap_embedder.1.weight": (256, CONTEXT_DIM), "noise_refiner.0.attention.k_norm.weight": (128,),
            "cap_pad_token": (1, 256), "x_pad_token": (1, 256)}
    keys.update(_blocks("layers.{}.ffn_norm1.weight", 2, (256,)))
    return TinyCheckpoint("ZImage", keys, {
        "dim": 256, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "multiple_of": 16, "norm_eps": 1e-5,
        "axes_lens": [300, 64, 64]}, wide={"cap_embedder.1.weight": (3840, CONTEXT_DIM)})


def _omnigen2() -> TinyCheckpoint:
    return TinyCheckpoint("Omnigen2", {"time_caption_embed.timestep_embedder.linear_1.bias": (64,)}, {
        "hidden_size": 64, "num_layers": 2, "num_refiner_layers": 1, "num_attention_heads": 2, "num_kv_heads": 1,
        "multiple_of": 16, "axes_dim_rope": [8, 12, 12], "axes_lens": [64, 64, 64], "text_feat_dim": CONTEXT_DIM})


def _lens(layers: int = 4, depth: int = 2) -> TinyCheckpoint:
    # Microsoft Lens: 128-channel Flux.2 latents (already patchified by the VAE), inner width 64 x heads, the text
    # encoder's hidden states of `layers` layers side by side in the context (each RMS-normed by txt_norm.<i>).
    # Detection reads every size from the shapes (heads = img_in width // 64, the full-size head dim).
    enc = CONTEXT_DIM // layers
    keys = {"img_in.weight": (128, 128), "proj_out.weight": (4 * 32, 128), "txt_in.weight": (128, CONTEXT_DIM)}
    keys.update(_blocks("txt_norm.{}.weight", layers, (enc,)))
    keys.update(_blocks("transformer_blocks.{}.attn.norm_added_q.weight", depth, (64,)))
    keys.update(_blocks("transformer_blocks.{}.img_mlp.w1.weight", depth, (int(128 / 3 * 8), 128)))
    return TinyCheckpoint("Lens", keys)


def _joyimage(depth: int = 2) -> TinyCheckpoint:
    # JoyImage: Conv3d patch embedder (1, 2, 2) over Wan 2.1 latents; ComfyUI fixes the RoPE axes to 16+56+56, so the
    # head dim is 128 (2 heads here), and assumes Qwen3-VL's 4096-wide text features.
    keys = {"img_in.weight": (256, 16, 1, 2, 2), "condition_embedder.time_embedder.linear_1.weight": (256, 256),
            "condition_embedder.text_embedder.linear_1.weight": (256, CONTEXT_DIM),
            "proj_out.weight": (16 * 4, 256)}
    keys.update(_blocks("double_blocks.{}.attn.img_attn_qkv.weight", depth, (3 * 256, 256)))
    keys.update(_blocks("double_blocks.{}.attn.img_attn_q_norm.weight", depth, (128,)))
    return TinyCheckpoint("JoyImage", keys, {"text_dim": CONTEXT_DIM, "mlp_width_ratio": 2.0})


def _cogvideox(expected: str, in_channels: int = 16, patch_t: bool = False, ofs: bool = False,
               layers: int = 2) -> TinyCheckpoint:
    """CogVideoX: detection reads the width from norm1 (6 x dim) and sets 64-wide heads (dim 64: one head here,
    made two heads of 32 by `sizes`); no pos_embedding key means rotary embeddings (5b, 1.5).  ``patch_t``: a
    CogVideoX 1.5 checkpoint, its patch embedder a Linear over 2 x 2 x 2 patches (detection reads patch sizes 2)."""
    dim, time_dim = 64, 32
    proj = (dim, in_channels * 2 * 2 * 2) if patch_t else (dim, in_channels, 2, 2)
    keys = {"patch_embed.proj.weight": proj, "patch_embed.text_proj.weight": (dim, CONTEXT_DIM),
            "time_embedding_linear_1.weight": (time_dim, dim), "proj_out.weight": (16 * 4 * (2 if patch_t else 1), dim)}
    keys.update(_blocks("blocks.{}.norm1.linear.weight", layers, (6 * dim, time_dim)))
    if ofs:  # CogVideoX 1.5 I2V's OFS embedding
        keys["ofs_embedding_linear_1.weight"] = (time_dim, time_dim)  # added to the time embedding
    return TinyCheckpoint(expected, keys, {"num_attention_heads": 2, "attention_head_dim": 32})


def _ideogram4(layers: int = 2) -> TinyCheckpoint:
    # Detection reads the input width (128: 2 x 2 patches of 32 latent channels) and counts the layers; every other
    # size is a constant of the class (unet_extra_config), which the tiny sizes replace.
    keys = {"embed_image_indicator.weight": (2, 64), "input_proj.weight": (64, 128),
            "llm_cond_proj.weight": (64, CONTEXT_DIM), "final_layer.linear.weight": (128, 64)}
    keys.update(_blocks("layers.{}.attention.qkv.weight", layers, (3 * 64, 64)))
    return TinyCheckpoint("Ideogram4", keys, {
        "num_attention_heads": 2, "attention_head_dim": 32, "intermediate_size": 128, "adaln_dim": 32,
        "llm_features_dim": CONTEXT_DIM, "mrope_section": [6, 5, 5]})


def _krea2(layers: int = 2) -> TinyCheckpoint:
    # Detection reads heads and KV heads from the projections at a head size of 128 (kept here: 2 heads, 1 KV head,
    # GQA as in the real 48/12), and the text-fusion stack's layers and width from its projector and norms: 2 layers
    # of 16 features make the 32-wide conditioning we feed. The text-fusion heads are constants.
    keys = {"first.weight": (256, 16 * 2 * 2), "txtfusion.projector.weight": (1, 2),
            "txtfusion.layerwise_blocks.0.prenorm.scale": (16,), "last.linear.weight": (16 * 2 * 2, 256)}
    keys.update(_blocks("blocks.{}.attn.wq.weight", layers, (256, 256)))
    keys.update(_blocks("blocks.{}.attn.wk.weight", layers, (128, 256)))
    return TinyCheckpoint("Krea2", keys, {"txtheads": 2, "txtkvheads": 2})


def _longcat_image() -> TinyCheckpoint:
    # FLUX.1 layout without guidance or pooled-vector input; ComfyUI recognises LongCat-Image by its 3584-wide
    # (Qwen2.5-VL 7B) text input.  Its class does not rename FLUX's "_norm.scale" keys: they are ".weight" here.
    flux = _flux(guidance=False)
    keys = {k.replace("_norm.scale", "_norm.weight"): v for k, v in flux.keys.items() if not k.startswith("vector_in.")}
    return TinyCheckpoint("LongCatImage", keys, dict(flux.sizes, context_in_dim=CONTEXT_DIM),
                          wide={"txt_in.weight": (64, 3584)})


def _mage_flow() -> TinyCheckpoint:
    # Qwen-Image blocks, patch 1 over the 128-channel Flux.2 latent; matched on its 2560-wide text norm and its
    # 128-wide output.
    keys = {"txt_norm.weight": (CONTEXT_DIM,), "img_in.weight": (64, 128), "proj_out.weight": (128, 64)}
    keys.update(_blocks("transformer_blocks.{}.attn.norm_q.weight", 2, (32,)))
    return TinyCheckpoint("MageFlow", keys, {
        "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": CONTEXT_DIM,
        "axes_dims_rope": (8, 12, 12)}, wide={"txt_norm.weight": (2560,)})


def _z_image_pixel(siglip: bool = False) -> TinyCheckpoint:
    # Z-Image with the pixel-space decoder head (dec_net): patch 4 over RGB here; detection reads the patch from
    # x_embedder, the decoder's width, depth and frequencies from its keys.  siglip: with Z-Image Omni's SigLIP
    # embedder (its width read from the checkpoint), used on the reference-image path.
    keys = {"cap_embedder.1.weight": (256, CONTEXT_DIM), "noise_refiner.0.attention.k_norm.weight": (128,),
            "cap_pad_token": (1, 256), "x_pad_token": (1, 256), "x_embedder.weight": (256, 4 * 4 * 3),
            "dec_net.cond_embed.weight": (32, 256), "dec_net.input_embedder.embedder.0.weight": (32, 48 + 4 ** 2),
            "dec_net.res_blocks.0.in_ln.weight": (32,), "dec_net.final_layer.linear.weight": (48, 32)}
    keys.update(_blocks("layers.{}.ffn_norm1.weight", 2, (256,)))
    if siglip:
        keys.update({"siglip_embedder.0.weight": (VISION_DIM,), "siglip_embedder.1.weight": (256, VISION_DIM),
                     "siglip_pad_token": (1, 256)})
    return TinyCheckpoint("ZImagePixelSpace", keys, {
        "dim": 256, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "multiple_of": 16, "norm_eps": 1e-5,
        "axes_lens": [300, 64, 64]}, wide={"cap_embedder.1.weight": (3840, CONTEXT_DIM)})


def _boogu() -> TinyCheckpoint:
    # OmniGen2 with a double-stream stage; detection reads the sizes and depths from the keys, heads and rotary
    # axes are full-size constants.
    keys = {"x_embedder.weight": (64, 16 * 2 * 2), "time_caption_embed.caption_embedder.0.weight": (CONTEXT_DIM,),
            "double_stream_layers.0.img_instruct_attn.processor.img_to_q.weight": (64, 64),
            "double_stream_layers.1.img_instruct_attn.processor.img_to_q.weight": (64, 64),
            "noise_refiner.0.attn.norm_q.weight": (32,)}
    keys.update(_blocks("single_stream_layers.{}.attn.norm_q.weight", 2, (32,)))
    return TinyCheckpoint("Boogu", keys, {
        "num_attention_heads": 2, "num_kv_heads": 1, "multiple_of": 16, "axes_dim_rope": [8, 12, 12],
        "axes_lens": [64, 64, 64]})


def _unet(expected: str, linear: bool, adm: Optional[int] = None) -> TinyCheckpoint:
    """A two-level UNet (channels 32/64, one res block each, attention on the second level, context 32)."""
    proj = (64, 64) if linear else (64, 64, 1, 1)
    keys = {"input_blocks.0.0.weight": (32, 4, 3, 3),
            "input_blocks.1.0.in_layers.0.weight": (32,), "input_blocks.1.0.out_layers.3.weight": (32, 32, 3, 3),
            "input_blocks.2.0.op.weight": (32, 32, 3, 3),
            "input_blocks.3.0.in_layers.0.weight": (32,), "input_blocks.3.0.out_layers.3.weight": (64, 64, 3, 3),
            "middle_block.0.in_layers.0.weight": (64,),
            "output_blocks.0.0.in_layers.0.weight": (128,), "output_blocks.1.0.in_layers.0.weight": (96,),
            "output_blocks.2.0.in_layers.0.weight": (96,), "output_blocks.3.0.in_layers.0.weight": (64,),
            "out.2.weight": (4, 32, 3, 3)}
    for block in ("input_blocks.3.1", "middle_block.1", "output_blocks.0.1", "output_blocks.1.1"):
        keys[block + ".proj_in.weight"] = proj
        keys[block + ".transformer_blocks.0.attn2.to_k.weight"] = (64, CONTEXT_DIM)
    if adm is not None:
        keys["label_emb.0.0.weight"] = (128, adm)
    return TinyCheckpoint(expected, keys, match=False)


def _wan(expected: str, in_dim: int = 16, out_dim: int = 16, vace: bool = False) -> TinyCheckpoint:
    keys = {"patch_embedding.weight": (64, in_dim, 1, 2, 2), "head.modulation": (1, 2, 64),
            "head.head.weight": (out_dim * 4, 64), "blocks.0.ffn.0.weight": (128, 64)}
    if vace:
        keys.update({"vace_patch_embedding.weight": (64, 96, 1, 2, 2), "vace_blocks.0.modulation": (1, 6, 64)})
    return TinyCheckpoint(expected, keys, {"num_heads": 2, "freq_dim": 32, "text_len": 16, "text_dim": CONTEXT_DIM})


def _pixart() -> TinyCheckpoint:
    # PixArt-Sigma (no aspect-ratio embedder; PixArt-Alpha's needs a hidden size divisible by 3)
    return TinyCheckpoint("PixArtSigma", {
        "t_block.1.weight": (6 * 64, 64), "x_embedder.proj.weight": (64, 4, 2, 2), "y_embedder.y_embedding": (16, 32),
        "blocks.0.attn.qkv.weight": (3 * 64, 64),
    }, {"num_heads": 2, "hidden_size": 64, "input_size": 16, "caption_channels": CONTEXT_DIM})


def _hunyuan_dit() -> TinyCheckpoint:
    keys = {"mlp_t5.0.weight": (128, CONTEXT_DIM), "x_embedder.proj.weight": (64, 4, 2, 2),
            "extra_embedder.0.weight": (256, 1024)}
    keys.update(_blocks("blocks.{}.norm1.weight", 2, (64,)))
    return TinyCheckpoint("HunyuanDiT", keys, {
        "input_size": 16, "num_heads": 2, "text_states_dim": CONTEXT_DIM, "text_states_dim_t5": CONTEXT_DIM,
        "text_len": 8, "text_len_t5": 8})


def _cosmos_predict2() -> TinyCheckpoint:
    return TinyCheckpoint("CosmosT2IPredict2", {
        "x_embedder.proj.1.weight": (64, (16 + 1) * 2 * 2), "blocks.0.mlp.layer1.weight": (256, 64),
    }, {"max_img_h": 64, "max_img_w": 64, "max_frames": 8, "num_blocks": 1, "num_heads": 2,
        "crossattn_emb_channels": CONTEXT_DIM, "adaln_lora_dim": 16})


def _hunyuan3d() -> TinyCheckpoint:
    # Hunyuan3D 2.0: joint attention over shape latents and image-encoder tokens (no text)
    return TinyCheckpoint("Hunyuan3Dv2", {
        "latent_in.weight": (64, 16), "cond_in.weight": (64, 32),
        "double_blocks.0.img_attn.norm.key_norm.scale": (32,), "single_blocks.0.norm.key_norm.scale": (32,),
    }, {"num_heads": 2})


_PIXELDIT_SIZES = {"hidden_size": 64, "num_groups": 2, "pixel_hidden_size": 4, "pixel_attn_hidden_size": 32,
                   "pixel_num_groups": 2, "patch_depth": 2, "pixel_depth": 1, "patch_size": 4,
                   "txt_embed_dim": CONTEXT_DIM, "txt_max_length": 48}


def _pixeldit_keys(sizes: Dict[str, Any]) -> Dict[str, Shape]:
    """PixelDiT's backbone keys under the checkpoint's "core." prefix (ComfyUI strips it and splits each pixel
    block's adaLN_modulation.0 into its msa and mlp halves)."""
    hidden, pixel, patch = sizes["hidden_size"], sizes["pixel_hidden_size"], sizes["patch_size"]
    keys = {"core.pixel_embedder.proj.weight": (pixel, 3), "core.s_embedder.proj.weight": (hidden, 3 * patch ** 2),
            "core.y_embedder.proj.weight": (hidden, sizes["txt_embed_dim"]),
            "core.y_pos_embedding": (1, sizes["txt_max_length"], hidden),
            "core.final_layer.linear.weight": (3, pixel)}
    keys.update(_blocks("core.patch_blocks.{}.attn.qkv_y.weight", sizes["patch_depth"], (3 * hidden, hidden)))
    keys.update(_blocks("core.pixel_blocks.{}.adaLN_modulation.0.weight", sizes["pixel_depth"],
                        (6 * pixel * patch ** 2, hidden)))
    return keys


def _pixeldit() -> TinyCheckpoint:
    # Detection reads only that the checkpoint is PixelDiT (core.pixel_embedder); every size is a full-size constant.
    return TinyCheckpoint("PixelDiTT2I", _pixeldit_keys(_PIXELDIT_SIZES), _PIXELDIT_SIZES)


def _pid() -> TinyCheckpoint:
    # PiD v1.5 for 16-channel latents (Flux, Qwen-Image): the PixelDiT backbone plus the LQ projection (root-level
    # lq_proj keys, its pit_head marks v1.5); detection reads the LQ width and input channels and counts the gates.
    # One gate for the 2 tiny blocks (every 2nd block, as the real 7 for 14): detection derives the interval from the
    # full-size 14 blocks, `sizes` gives the tiny one.
    hidden, lq = _PIXELDIT_SIZES["hidden_size"], 16  # lq: the LQ projection's width (lq_hidden_dim)
    keys = _pixeldit_keys(_PIXELDIT_SIZES)
    keys.update({"lq_proj.latent_proj.0.weight": (lq, 16, 3, 3), "lq_proj.latent_proj.3.block.2.weight": (lq, lq, 3, 3),
                 "lq_proj.output_heads.0.weight": (hidden, lq), "lq_proj.pit_head.weight": (hidden, lq),
                 "lq_proj.gate_modules.0.content_proj.weight": (hidden, 2 * hidden),
                 "lq_proj.gate_modules.0.log_alpha": (), "pit_lq_gate.content_proj.weight": (hidden, 2 * hidden)})
    return TinyCheckpoint("PiD", keys, dict(_PIXELDIT_SIZES, lq_num_res_blocks=1, lq_interval=2))


def _minimax_h3(hidden: int = 64, head_dim: int = 32, depth: int = 2) -> TinyCheckpoint:
    """MiniMax H3 (single-stream audio+video DiT): detection reads every size from the shapes.

    Video latents keep their 24 channels (patch 1x2x2: 96 inputs per token) and audio latents their 32; the
    text is refined by a token refiner (here 1 block) before it enters the joint sequence.
    """
    keys = {"video_patch_proj.weight": (hidden, 24 * 4), "audio_patch_proj.weight": (hidden, 32),
            "condition_proj.weight": (hidden, CONTEXT_DIM), "final_layer.video_out.weight": (24 * 4, hidden),
            "final_layer.audio_out.weight": (32, hidden), "time_embedder.proj_in.weight": (hidden, 32),
            "time_embedder.proj_out.weight": (32, hidden), "rope.inv_freq": (4,),
            "token_refiner.blocks.0.attn.qkv_proj.weight": (3 * hidden, hidden)}
    keys.update(_blocks("blocks.{}.attn.qkv_proj.weight", depth, (3 * hidden, hidden)))
    keys.update(_blocks("blocks.{}.attn.q_norm.weight", depth, (head_dim,)))
    keys.update(_blocks("blocks.{}.mlp.fc1.weight", depth, (2 * 2 * hidden, hidden)))
    return TinyCheckpoint("MiniMaxH3", keys)
def _ernie_image() -> TinyCheckpoint:
    # ERNIE-Image: detection reads only that the checkpoint is ERNIE-Image; every size is a full-size constant.
    return TinyCheckpoint("ErnieImage", {"layers.0.mlp.linear_fc2.weight": (64, 128)}, {
        "hidden_size": 64, "num_attention_heads": 2, "num_layers": 1, "ffn_hidden_size": 128,
        "text_in_dim": CONTEXT_DIM, "rope_axes_dim": (8, 12, 12)})


def _seedvr2() -> TinyCheckpoint:
    # SeedVR2 3B, recognised by its 32nd block (so the tiny model keeps 32 blocks) and its stored text embeddings.
    return TinyCheckpoint("SeedVR2", {
        "blocks.31.mlp.all.proj_in_gate.weight": (256, 64), "positive_conditioning": (58, 5120),
        "negative_conditioning": (64, 5120),
    }, {"vid_dim": 64, "heads": 2, "head_dim": 32, "rope_dim": 16})


# --------------------------------------------------------------------------------------------------------------
# The kinds.

KINDS = {
    "flux": Kind(_flux(), (16, 16, 16), 256, {"pooled_output": 24, "guidance": 3.5}),
    "flux_schnell": Kind(_flux(guidance=False), (16, 16, 16), 256, {"pooled_output": 24}),
    "flux2": Kind(_flux2(), (128, 8, 8), 512, {"pooled_output": 24, "guidance": 4.0}),
    "chroma": Kind(_chroma(), (16, 16, 16), 40, {"pooled_output": 24}),
    "sd3": Kind(sd3_checkpoint(), (16, 16, 16), 154, {"pooled_output": 24}),
    "sd35_medium": Kind(sd3_checkpoint(x_block_self_attn_layers=(0, 1)), (16, 16, 16), 154, {"pooled_output": 24}),
}

# Larger variants for the benchmark: FLUX-like head dim 128, attention about a third of the work.
BENCH_CONFIGS = {
    "flux": {"hidden_size": 512, "num_heads": 4, "axes_dim": [16, 56, 56], "depth": 1, "depth_single_blocks": 2,
             "mlp_ratio": 4.0},
}
BENCH_LATENT = {"flux": (32, 32)}  # 256 image tokens next to 256 text tokens
_BENCH_CHECKPOINTS = {"flux": _flux(**BENCH_CONFIGS["flux"])}

# Joint-attention families beyond FLUX/SD3; the conditioning carries what each model's extra_conds expects.
FAMILY_KINDS = {
    "auraflow": Kind(_auraflow(), (4, 16, 16), 40, {}),
    "hunyuan_video": Kind(_hunyuan("HunyuanVideo"), (16, 3, 8, 8), 30, {"pooled_output": 24, "guidance": 6.0}),
    # 33 input channels: latent + concat image + mask
    "hunyuan_video_i2v": Kind(_hunyuan("HunyuanVideoI2V", in_channels=33), (16, 3, 8, 8), 30,
                              {"pooled_output": 24, "guidance": 6.0}),
    "hunyuan_video15": Kind(_hunyuan("HunyuanVideo15", in_channels=33, vector=False, guidance=False, byt5=True,
                                     v15=True), (16, 2, 8, 8), 30, {"pooled_output": 24}),
    "hunyuan_image21": Kind(_hunyuan("HunyuanImage21", patch=(1, 1), vector=False, byt5=True), (16, 8, 8), 30, {}),
    "hunyuan_video_skyreels": Kind(_hunyuan("HunyuanVideoSkyreelsI2V", in_channels=32), (16, 3, 8, 8), 30,
                                   {"pooled_output": 24, "guidance": 6.0}),
    # SR distilled: latent + (2 x 16 + 2) concat channels here (98 in the real model, which ComfyUI matches on)
    "hunyuan_video15_sr": Kind(_hunyuan("HunyuanVideo15_SR_Distilled", in_channels=50, vector=False, guidance=False,
                                        byt5=True, v15=True, wide_in_channels=98), (16, 2, 8, 8), 30,
                               {"pooled_output": 24}),
    # refiner: 3D patch 1x1x1 over a one-frame latent, latent + concat image channels, meanflow time_r input
    "hunyuan_image21_refiner": Kind(_hunyuan("HunyuanImage21Refiner", in_channels=32, patch=(1, 1, 1), vector=False,
                                             byt5=True, meanflow=True), (16, 1, 8, 8), 30, {}),
    "chroma_radiance": Kind(_chroma_radiance(), (3, 32, 32), 40, {"pooled_output": 24}),
    "qwen_image": Kind(_qwen_image(), (16, 1, 16, 16), 34, {}),
    "hidream": Kind(_hidream(), (16, 16, 16), 36, {"pooled_output": 24}),
    "lumina2": Kind(_lumina2(), (16, 16, 16), 38, {}),
    # HiDream-O1: pixel space (no VAE), cut in 32 x 32 patches: 128 x 96 pixels = 4 x 3 image tokens; the conditioning
    # holds token ids (24 prompt tokens in the chat template), which the model embeds itself
    "hidream_o1": Kind(_hidream_o1(), (3, 128, 96), 24, {}),
    "z_image": Kind(_z_image(), (16, 14, 18), 37, {}),
    "omnigen2": Kind(_omnigen2(), (16, 16, 16), 35, {}),
    "lens": Kind(_lens(), (128, 8, 8), 40, {}),
    "joyimage": Kind(_joyimage(), (16, 1, 16, 16), 40, {}),
    # pixel space: 3 channels, patch 4 here (16 in the real model)
    "pixeldit": Kind(_pixeldit(), (3, 32, 32), 40, {}),
    # PiD decodes a 4x4 latent (attached by family_conditioning's lq_latent) to a 32x32 image
    "pid": Kind(_pid(), (3, 32, 32), 40, {}),
    # video (24 channels, 2 latent frames of 8 x 8) nested with stereo audio (32 channels, 8 latent frames),
    # as EmptyMiniMaxH3LatentAV makes them
    "minimax_h3": Kind(_minimax_h3(), (24, 2, 8, 8), 24, {}, audio_latent_shape=(32, 2, 8)),
    # CogVideoX 1.0 T2V (5b: rotary embeddings, frames not patched)
    "cogvideox": Kind(_cogvideox("CogVideoX_T2V"), (16, 3, 8, 8), 26, {}),
    # CogVideoX 1.5 I2V: latent + 16 concat image channels, 2 x 2 x 2 patches, OFS embedding
    "cogvideox15_i2v": Kind(_cogvideox("CogVideoX_I2V", in_channels=32, patch_t=True, ofs=True), (16, 3, 8, 10), 26,
                            {}),
    # CogVideoX-Fun 1.5 inpainting (VOID): latent + 32 concat channels (mask and masked video latents)
    "cogvideox_fun_inpaint": Kind(_cogvideox("CogVideoX_Inpaint", in_channels=48, patch_t=True), (16, 2, 8, 8), 26,
                                  {}),
    # Ideogram 4: 128-channel latents at 1/16 scale, one token per latent position
    "ideogram4": Kind(_ideogram4(), (128, 8, 8), 40, {}),
    # Krea 2: Wan 2.1 latents (16 channels, one frame)
    "krea2": Kind(_krea2(), (16, 1, 16, 16), 40, {}),
    "longcat_image": Kind(_longcat_image(), (16, 16, 16), 48, {}),
    "mage_flow": Kind(_mage_flow(), (128, 8, 8), 34, {}),
    # pixel space: RGB, 8 x 10 patches of 4 x 4 pixels
    "z_image_pixel": Kind(_z_image_pixel(), (3, 32, 40), 40, {}),
    "z_image_pixel_omni": Kind(_z_image_pixel(siglip=True), (3, 32, 40), 40, {}),
    "boogu": Kind(_boogu(), (16, 16, 16), 35, {}),
}

# Models TACA refuses, built for the error-path tests (never sampled).
UNSUPPORTED = {
    "sd15": _unet("SD15", linear=False),
    # a joint-attention model TACA does not support (the generic "not supported" error path)
    "hunyuan3d": _hunyuan3d(),
    # joint text+image attention that TACA's attention override cannot reach
    "ernie_image": _ernie_image(),
    "seedvr2": _seedvr2(),
}
# Models whose text enters through cross-attention, one tiny model per model_base class.
CROSS_ATTENTION_KINDS = {
    "sdxl": _unet("SDXL", linear=True, adm=2816),
    "wan21": _wan("WAN21_T2V"),
    "wan21_vace": _wan("WAN21_Vace", vace=True),
    "wan22": _wan("WAN22_T2V", in_dim=48, out_dim=48),
    "pixart": _pixart(),
    "hunyuan_dit": _hunyuan_dit(),
    "cosmos_predict2": _cosmos_predict2(),
}


def checkpoint(kind: str, size: str = "tiny") -> TinyCheckpoint:
    """The tiny checkpoint description of any kind (KINDS, FAMILY_KINDS, UNSUPPORTED, CROSS_ATTENTION_KINDS)."""
    if size == "bench":
        return _BENCH_CHECKPOINTS[kind]
    for table in (KINDS, FAMILY_KINDS):
        if kind in table:
            return table[kind].checkpoint
    return {**UNSUPPORTED, **CROSS_ATTENTION_KINDS}[kind]


def available(kind: str) -> bool:
    """Whether this ComfyUI has the model class of ``kind`` (many classes are newer than the oldest ComfyUI tested)."""
    return hasattr(comfy.supported_models, checkpoint(kind).expected)


def checkpoint_state_dict(ckpt: TinyCheckpoint, prefix: str = "") -> Dict[str, torch.Tensor]:
    """The synthetic state dict detection reads (zeros: detection reads shapes and key names)."""
    return {prefix + key: torch.zeros(shape) for key, shape in {**ckpt.keys, **ckpt.wide}.items()}


def detected_class(ckpt: TinyCheckpoint) -> Optional[type]:
    """The comfy.supported_models class ComfyUI's detection and class matching pick for the checkpoint."""
    state_dict = checkpoint_state_dict(ckpt)
    unet_config = comfy.model_detection.detect_unet_config(state_dict, "")
    if unet_config is None:
        return None
    found = comfy.model_detection.model_config_from_unet_config(unet_config, state_dict)
    return None if found is None else type(found)


_DETECTED: Dict[int, Tuple[TinyCheckpoint, type, Dict[str, Any]]] = {}


def _detect(ckpt: TinyCheckpoint) -> Tuple[type, Dict[str, Any]]:
    """(supported_models class, unet_config of the tiny model), detected once per description."""
    cached = _DETECTED.get(id(ckpt))
    if cached is not None and cached[0] is ckpt:
        return cached[1], dict(cached[2])
    detected = comfy.model_detection.detect_unet_config(checkpoint_state_dict(ckpt), "")
    if detected is None:
        raise RuntimeError(f"ComfyUI's detection does not recognise the tiny {ckpt.expected} checkpoint")
    config_class = detected_class(ckpt) if ckpt.match else getattr(comfy.supported_models, ckpt.expected)
    if config_class is None or config_class.__name__ != ckpt.expected:
        found = None if config_class is None else config_class.__name__
        raise RuntimeError(f"ComfyUI picks {found} for the tiny {ckpt.expected} checkpoint: {detected}")
    unet_config = dict(detected, **ckpt.sizes)
    _DETECTED[id(ckpt)] = (ckpt, config_class, unet_config)
    return config_class, dict(unet_config)


def randomize(module: torch.nn.Module, seed: Union[int, torch.Generator]) -> None:
    """Seeded weights with unit-scale activations (ComfyUI creates parameters uninitialised)."""
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
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


def build_model(ckpt: TinyCheckpoint, seed: Union[int, torch.Generator] = 0, dtype: torch.dtype = torch.float32):
    """(BaseModel, ModelPatcher) of a tiny checkpoint on the CPU, with seeded random weights."""
    config_class, unet_config = _detect(ckpt)
    model_config = config_class(unet_config)
    # A class that keeps its full-size constants in unet_extra_config (Ideogram 4) writes them over the tiny sizes
    # when it is made; the tiny sizes are put back.
    model_config.unet_config.update(ckpt.sizes)
    model_config.set_inference_dtype(dtype, None)
    device = torch.device("cpu")
    base = model_config.get_model({}, device=device)
    randomize(base.diffusion_model, seed)
    base.eval()
    return base, comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)


def _patch_of(unet_config: Dict[str, Any]) -> int:
    patch = unet_config.get("patch_size", 2)
    return int(patch[-1]) if isinstance(patch, (list, tuple)) else int(patch)


def _tiny(kind: str, spec: Kind, ckpt: TinyCheckpoint, seed: int, dtype: torch.dtype) -> TinyModel:
    base, patcher = build_model(ckpt, seed, dtype)
    registers = int(getattr(base.diffusion_model, "register_length", 0) or 0)
    return TinyModel(kind, patcher, spec.latent_shape[0], spec.text_tokens, registers,
                     _patch_of(base.model_config.unet_config), dict(spec.extra_cond))


def kind_spec(kind: str) -> Kind:
    """The Kind of a buildable kind: one of KINDS (FLUX/SD3) or FAMILY_KINDS (the other joint-attention families)."""
    return KINDS[kind] if kind in KINDS else FAMILY_KINDS[kind]


def build(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32, size: str = "tiny") -> TinyModel:
    """A tiny random-weight model of one of KINDS or FAMILY_KINDS (size "bench": the benchmark's larger variant)."""
    return _tiny(kind, kind_spec(kind), checkpoint(kind, size), seed, dtype)


def build_unsupported(kind: str):
    """ModelPatcher of one of UNSUPPORTED (for the error paths; never sampled)."""
    return build_model(UNSUPPORTED[kind])[1]


def build_cross_attention(kind: str):
    """ModelPatcher of one of CROSS_ATTENTION_KINDS (for the error paths; never sampled)."""
    return build_model(CROSS_ATTENTION_KINDS[kind])[1]


# --------------------------------------------------------------------------------------------------------------
# Inputs.


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


def family_latent(tiny: TinyModel, batch: int = 1, shape: Optional[tuple] = None) -> Any:
    """An empty latent of ``shape`` (without batch; default: the kind's own latent shape).

    Kinds with an audio latent get ComfyUI's NestedTensor of the video and audio latents.
    """
    video = torch.zeros((batch,) + tuple(shape or kind_spec(tiny.kind).latent_shape))
    audio_shape = kind_spec(tiny.kind).audio_latent_shape
    if audio_shape is None:
        return video
    import comfy.nested_tensor

    return comfy.nested_tensor.NestedTensor((video, torch.zeros((batch,) + tuple(audio_shape))))


# Qwen's vocabulary: the ids from here on are special tokens (chat template, vision markers, HiDream-O1's <|tms|>).
QWEN_SPECIAL_IDS_FROM = 151643


def hidream_o1_input_ids(words: int, generator: torch.Generator) -> torch.Tensor:
    """(1, words + 10) token ids as ComfyUI's HiDream-O1 tokenizer writes them: ``words`` random ordinary ids in its
    chat template <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n<|boi|><|tms|>."""
    from comfy.text_encoders import hidream_o1 as te  # ComfyUI versions without HiDream-O1 never get here

    prompt = torch.randint(0, QWEN_SPECIAL_IDS_FROM, (words,), generator=generator).tolist()
    ids = ([te.IM_START_ID, te.USER_ID, te.NEWLINE_ID] + prompt + [te.IM_END_ID, te.NEWLINE_ID, te.IM_START_ID,
                                                                    te.ASSISTANT_ID, te.NEWLINE_ID, te.BOI_TOKEN_ID,
                                                                    te.TMS_TOKEN_ID])
    return torch.tensor([ids], dtype=torch.long)


class _VisionOutput(NamedTuple):  # what CLIPVisionEncode hands HunyuanVideo 1.5 (only last_hidden_state is read)
    last_hidden_state: torch.Tensor


def family_conditioning(tiny: TinyModel, seed: int, batch: int = 1, text_tokens: Optional[int] = None,
                        llama_tokens: int = 0, byt5_tokens: int = 0, vision_tokens: int = 0,
                        lq_latent: Optional[Shape] = None, degrade_sigma: float = 0.0, **extra_cond):
    """Random conditioning with the extra inputs each family's extra_conds reads.

    llama_tokens: HiDream's ``conditioning_llama3`` (B, layers, L, 24); byt5_tokens: ``conditioning_byt5small``
    (HunyuanImage 2.1 / HunyuanVideo 1.5); vision_tokens: ``clip_vision_output`` (HunyuanVideo 1.5);
    lq_latent: the (C, H, W) shape of the latent PiD decodes, attached with ``degrade_sigma`` as PiDConditioning
    attaches them (one latent, the same in every conditioning, whatever the seed).
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
    if lq_latent is not None:
        options["lq_latent"] = torch.randn((1,) + tuple(lq_latent), generator=torch.Generator().manual_seed(11))
        options["degrade_sigma"] = torch.tensor([float(degrade_sigma)])
    if tiny.kind == "hidream_o1":
        # The token ids go to the model (text_input_ids); the context is the text encoder's stand-in, the ids as floats.
        ids = hidream_o1_input_ids(text_tokens or tiny.text_tokens, g)
        options["text_input_ids"] = ids
        cond[0][0] = ids.unsqueeze(-1).float().expand(batch, -1, -1).contiguous()
    if tiny.kind in ("omnigen2", "boogu") and "attention_mask" not in extra_cond:
        # OmniGen2's (and Boogu's) extra_conds takes num_tokens from the text encoder's attention mask
        options["attention_mask"] = torch.ones(batch, cond[0][0].shape[1], dtype=torch.long)
    options.update(extra_cond)
    return cond
