"""The demo's trained model: a small SD3-shaped MMDiT that follows prompts of the compositional world
(``taca_eval.world``), with a TAESD-format VAE and a frozen random CLIP-L, in one checkpoint that
``CheckpointLoaderSimple`` detects as SD3 on every ComfyUI the pack supports.

* **Text encoder**: ComfyUI's CLIP-L (ComfyUI builds it from a fixed config), weights drawn from ``SEED`` and
  never trained; the residual branches are scaled down so each output token stays close to its own word and
  position. 77 text tokens, as SD3 gives with CLIP-L only. Regenerated from the seed, never committed.
* **VAE**: ComfyUI's TAESD with 16 latent channels. Its encoder is fixed and exact: a 2x2 average, two
  space-to-depth steps, then a linear projection of each 8x8 block's 4x4 grid of colours onto the
  ``LATENT_CHANNELS`` principal directions of world renders, whitened. Its decoder is trained (``train_world_model.py``).
  ``encode_fast`` computes the same encoder with three tensor ops, for training data.
* **Diffusion model**: ComfyUI's ``MMDiT`` (detection: hidden = 64 x depth, heads = depth), patch size 2, so a
  256 px image is 256 image tokens against 77 text tokens (3.3x); 368 px is 529 (6.9x), 512 px 1024 (13x).
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

SEED = 20251207
IMAGE_SIZE = 256  # training resolution (px)
RESOLUTIONS = (256, 368, 512)  # 1x, about 2x and 4x the image tokens
DEPTH = 3  # MMDiT depth: hidden 192, 3 heads of 64, 3 joint blocks
PATCH = 2  # ComfyUI's MMDiT crops its position table for patch size 2 only
POS_EMBED_MAX = 32  # the position table covers 512 px
LATENT_CHANNELS = 16
VAE_SCALE, VAE_SHIFT = 1.5305, 0.0609  # SD3's latent format: the model then sees the encoder's raw output
CHECKPOINT = "taca_world_sd3.safetensors"
WEIGHTS = "taca_world_sd3_weights.safetensors"  # the committed part: diffusion model and VAE (no text encoder)
LORA = "taca_world_sd3_taca_lora.safetensors"  # the paper's TACA LoRA recipe on this model (PEFT format)
TEXT_PREFIX = "text_encoders.clip_l."
RESIDUAL_SCALE = 0.2  # CLIP-L residual branches, scaled so tokens keep their identity


# ---------------------------------------------------------------------------------------------------------------
# Text encoder


def text_encoder_state(seed: int = SEED) -> Dict[str, torch.Tensor]:
    """CLIP-L weights (fp16) under the checkpoint's text-encoder prefix, drawn from the seed."""
    import comfy.sd1_clip

    from . import tiny_models

    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    tiny_models.randomize(clip, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for name, p in clip.named_parameters():
            if name.endswith(("out_proj.weight", "fc2.weight")):
                p.mul_(RESIDUAL_SCALE)
            elif "position_embedding" in name:
                p.mul_(0.5)
    return {TEXT_PREFIX + k: v.to(torch.float16).contiguous() for k, v in clip.state_dict().items()
            if k.startswith("transformer.")}


def load_text_encoder(state: Dict[str, torch.Tensor]):
    """ComfyUI's CLIP object for SD3 with CLIP-L only, as the checkpoint loader builds it."""
    import comfy.sd

    plain = {k[len(TEXT_PREFIX) + len("transformer."):]: v for k, v in state.items()}
    return comfy.sd.load_text_encoder_state_dicts([plain], clip_type=comfy.sd.CLIPType.SD3)


def encode_prompts(clip, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cond [N, 77, 768], pooled [N, 768]) through ComfyUI's encoding; SD3 pads cond to 4096 and pooled to
    2048 with zeros, which ``pad_condition`` restores."""
    conds, pooled = [], []
    for prompt in prompts:
        c, p = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
        conds.append(c[0, :, :768].float())
        pooled.append(p[0, :768].float())
    return torch.stack(conds), torch.stack(pooled)


def pad_condition(cond: torch.Tensor, pooled: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return F.pad(cond, (0, 4096 - cond.shape[-1])), F.pad(pooled, (0, 2048 - pooled.shape[-1]))


# ---------------------------------------------------------------------------------------------------------------
# VAE: the fixed encoder


def block_features(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> [B, 48, H/8, W/8]: each 8x8 block as its 4x4 grid of 2x2-average colours,
    channel = colour * 16 + row * 4 + column (pixel_unshuffle's order)."""
    return F.pixel_unshuffle(F.avg_pool2d(images, 2), 4)


def fit_projection(images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight [16, 48], bias [16]) projecting block features onto their principal directions, each scaled to
    unit variance. Whitened, so the shape and texture directions (small variance in the image) are not
    drowned by the sampling noise long after the colour directions have formed."""
    feats = block_features(images).permute(0, 2, 3, 1).reshape(-1, 48).double()
    mean = feats.mean(0)
    _, s, vh = torch.linalg.svd(feats - mean, full_matrices=False)
    std = s[:LATENT_CHANNELS] / math.sqrt(feats.shape[0] - 1)
    basis = vh[:LATENT_CHANNELS] / std[:, None]
    # principal directions have arbitrary sign; fix it so the fit is reproducible across BLAS builds
    basis = basis * torch.sign(basis.sum(1, keepdim=True) + 1e-12)
    return basis.float(), (-(basis @ mean)).float()


def encode_fast(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The VAE encoder's raw latent (what the model sees) of [B, 3, H, W] images in [0, 1]."""
    return torch.einsum("bchw,oc->bohw", block_features(images), weight) + bias[None, :, None, None]


def encoder_state(weight: torch.Tensor, bias: torch.Tensor) -> Dict[str, torch.Tensor]:
    """TAESD encoder weights computing ``encode_fast``: convs as copies, averages and space-to-depth steps,
    every residual block zero (its ReLU passes the non-negative activations through)."""
    import comfy.taesd.taesd

    enc = comfy.taesd.taesd.Encoder(LATENT_CHANNELS)
    state = {k: torch.zeros_like(v) for k, v in enc.state_dict().items()}
    w0 = state["0.weight"]  # conv(3, 64): copy RGB
    for c in range(3):
        w0[c, c, 1, 1] = 1.0
    # stride-2 convs: output i reads inputs 2i-1, 2i, 2i+1 at kernel taps 0, 1, 2
    w = state["2.weight"]  # 2x2 average
    for c in range(3):
        w[c, c, 1:3, 1:3] = 0.25
    w = state["6.weight"]  # space-to-depth: 3 -> 12 channels, c * 4 + dy * 2 + dx
    for c in range(3):
        for dy in range(2):
            for dx in range(2):
                w[c * 4 + dy * 2 + dx, c, 1 + dy, 1 + dx] = 1.0
    w = state["10.weight"]  # space-to-depth again: 12 -> 48 channels in pixel_unshuffle's order
    for c in range(3):
        for dy1 in range(2):
            for dx1 in range(2):
                for dy2 in range(2):
                    for dx2 in range(2):
                        row, col = 2 * dy2 + dy1, 2 * dx2 + dx1
                        w[c * 16 + row * 4 + col, c * 4 + dy1 * 2 + dx1, 1 + dy2, 1 + dx2] = 1.0
    state["14.weight"][:, :48, 1, 1] = weight
    state["14.bias"] = bias.clone()
    return state


def decoder() -> torch.nn.Module:
    import comfy.taesd.taesd

    dec = comfy.taesd.taesd.Decoder(LATENT_CHANNELS)
    for m in dec.modules():  # ComfyUI's ops skip initialisation; the decoder is trained from PyTorch's default
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    return dec


def vae_state(encoder: Dict[str, torch.Tensor], decoder_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    state = {f"first_stage_model.taesd_encoder.{k}": v for k, v in encoder.items()}
    state.update({f"first_stage_model.taesd_decoder.{k}": v for k, v in decoder_state.items()})
    state["first_stage_model.vae_scale"] = torch.tensor(VAE_SCALE)
    state["first_stage_model.vae_shift"] = torch.tensor(VAE_SHIFT)
    return state


# ---------------------------------------------------------------------------------------------------------------
# Diffusion model


def mmdit_checkpoint():
    """The MMDiT as detection sees it: patch 1, CLIP-L-only SD3 conditioning widths, a 32 x 32 position table."""
    from . import tiny_models

    hidden = 64 * DEPTH
    keys = {"x_embedder.proj.weight": (hidden, LATENT_CHANNELS, PATCH, PATCH),
            "final_layer.linear.weight": (LATENT_CHANNELS * PATCH * PATCH, hidden),
            "y_embedder.mlp.0.weight": (hidden, 2048), "context_embedder.weight": (hidden, 4096),
            "pos_embed": (1, POS_EMBED_MAX ** 2, hidden)}
    keys.update({f"joint_blocks.{i}.context_block.attn.qkv.weight": (3 * hidden, hidden) for i in range(DEPTH)})
    return tiny_models.TinyCheckpoint("SD3", keys)


def sincos_table(hidden: int, size: int) -> torch.Tensor:
    """2D sine-cosine positions [1, size * size, hidden] (MAE / SD3 layout: half the channels per axis)."""
    quarter = hidden // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")

    def axis(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([axis(xs), axis(ys)], dim=1)[None].float()


def new_diffusion_model(seed: int = SEED):
    """(BaseModel, ModelPatcher) of the untrained MMDiT: seeded weights, adaLN-Zero modulation and output, and
    the fixed sine-cosine position table."""
    from . import tiny_models

    base, patcher = tiny_models.build_model(mmdit_checkpoint(), torch.Generator().manual_seed(seed))
    dm = base.diffusion_model
    with torch.no_grad():
        for name, module in dm.named_modules():
            if name.endswith("adaLN_modulation") or name == "final_layer.linear":
                last = module[-1] if isinstance(module, torch.nn.Sequential) else module
                last.weight.zero_()
                last.bias.zero_()
        dm.pos_embed.copy_(sincos_table(dm.pos_embed.shape[-1], POS_EMBED_MAX))
    return base, patcher


def diffusion_state(dm: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {"model.diffusion_model." + k: v.detach().float().contiguous() for k, v in dm.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# Files


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def weights_path(repo: str = REPO) -> str:
    return os.path.join(repo, "models", "checkpoints", WEIGHTS)


def lora_path(repo: str = REPO) -> str:
    return os.path.join(repo, "models", "loras", LORA)


def ensure_checkpoint(models_dir: str) -> str:
    """The full checkpoint under ``models_dir/checkpoints``, assembled from the committed weights if needed."""
    return assemble_checkpoint(weights_path(), os.path.join(models_dir, "checkpoints", CHECKPOINT))


def load(models_dir: str):
    """(MODEL, CLIP, VAE) of the checkpoint through ComfyUI's stock CheckpointLoaderSimple, its folder added to
    ComfyUI's checkpoint paths."""
    import folder_paths
    import nodes

    checkpoint = ensure_checkpoint(models_dir)
    folder_paths.add_model_folder_path("checkpoints", os.path.dirname(checkpoint))
    return nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(checkpoint))


def assemble_checkpoint(weights_file: str, out_path: str, seed: int = SEED) -> str:
    """Write the full checkpoint (committed weights + the text encoder drawn from the seed) unless it is there
    and newer than the weights."""
    import safetensors.torch

    if os.path.isfile(out_path) and os.path.getmtime(out_path) >= os.path.getmtime(weights_file):
        return out_path
    state = safetensors.torch.load_file(weights_file)
    state.update(text_encoder_state(seed))
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    tmp = out_path + ".tmp"
    safetensors.torch.save_file(state, tmp, metadata={"comfyui-taca": "compositional-world SD3-shaped model"})
    os.replace(tmp, out_path)
    return out_path


def to_tensor(images: List[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
