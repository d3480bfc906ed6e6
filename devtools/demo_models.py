"""Deterministic tiny random-weight models for the demo, saved where ComfyUI's loader nodes find them.

* ``checkpoints/taca_tiny_sd35m.safetensors``: an SD3.5-Medium-shaped MMDiT (2 joint blocks, both with the
  image-only self-attention, hidden 128), a CLIP-L text encoder (full size: ComfyUI builds CLIP-L from a fixed
  config; random weights, about 250 MB in fp16) and a TAESD-style 16-channel VAE, in one checkpoint that
  ``CheckpointLoaderSimple`` detects as SD3.
* ``loras/taca_tiny_sd35m_lora.safetensors``: a rank-16 diffusers-format attention LoRA for that model, shaped
  like the authors' TACA LoRAs.

Nothing is downloaded; the same seed always writes the same files. A small manifest next to the files
lets a second call skip the work.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Tuple

import torch

CHECKPOINT = "taca_tiny_sd35m.safetensors"
LORA = "taca_tiny_sd35m_lora.safetensors"
VERSION = 3  # bump when the recipe changes
SEED = 20250609


def _mmdit_checkpoint() -> Any:
    """The demo's MMDiT as a tiny SD3.5-Medium checkpoint: 2 joint blocks, hidden 128, CLIP-L + CLIP-G pooled input
    (2048) and T5-width context (4096), a 32 x 32 position table."""
    from . import tiny_models

    return tiny_models.sd3_checkpoint(depth=2, adm_in_channels=2048, context_dim=4096, pos_embed_max_size=32,
                                      x_block_self_attn_layers=(0, 1))


def _mmdit_state(generator: torch.Generator) -> Tuple[Dict[str, torch.Tensor], Any]:
    from . import tiny_models

    base, patcher = tiny_models.build_model(_mmdit_checkpoint(), generator)
    return {"model.diffusion_model." + k: v for k, v in base.diffusion_model.state_dict().items()}, patcher


def _clip_l_state(generator) -> Dict[str, torch.Tensor]:
    import comfy.sd1_clip

    from . import tiny_models

    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    tiny_models.randomize(clip, generator)
    state = {k: v.to(torch.float16) for k, v in clip.state_dict().items() if k.startswith("transformer.")}
    return {"text_encoders.clip_l." + k: v for k, v in state.items()}


def _vae_state(generator) -> Dict[str, torch.Tensor]:
    import comfy.taesd.taesd

    from . import tiny_models

    vae = comfy.taesd.taesd.TAESD(latent_channels=16)
    tiny_models.randomize(vae, generator)
    with torch.no_grad():
        vae.vae_scale.fill_(1.5305)  # SD3's latent scale and shift, as ComfyUI's taesd3 uses
        vae.vae_shift.fill_(0.0609)
        # Random weights saturate every pixel; calibrate the last layer so images stay mid-range with visible
        # structure (output std 0.15 around grey for a unit-normal latent).
        last = vae.taesd_decoder[-1]
        last.bias.zero_()
        probe = 2.0 * torch.randn(1, 16, 32, 32, generator=generator)
        last.weight.mul_(0.15 / max(float(vae.taesd_decoder(probe).std()), 1e-6))
        last.bias.fill_(0.5)
    return {"first_stage_model." + k: v for k, v in vae.state_dict().items()}


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_demo_models(models_dir: str) -> Dict[str, str]:
    """Write the demo models under ``models_dir`` (checkpoints/, loras/) unless they are already there."""
    import safetensors.torch

    from . import lora_files, tiny_models

    paths = {"checkpoint": os.path.join(models_dir, "checkpoints", CHECKPOINT),
             "lora": os.path.join(models_dir, "loras", LORA)}
    manifest_path = os.path.join(models_dir, "taca_demo_manifest.json")
    if os.path.isfile(manifest_path) and all(os.path.isfile(p) for p in paths.values()):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("version") == VERSION and manifest.get("seed") == SEED:
            return paths
    for p in paths.values():
        os.makedirs(os.path.dirname(p), exist_ok=True)
    generator = torch.Generator().manual_seed(SEED)
    unet, patcher = _mmdit_state(generator)
    state = dict(unet)
    state.update(_clip_l_state(generator))
    state.update(_vae_state(generator))
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, paths["checkpoint"],
                                metadata={"comfyui-taca": "tiny random-weight demo model; not a trained model"})
    tiny = tiny_models.TinyModel("sd35_medium", patcher, 16, 77, 0, 2, {})
    lora = lora_files.make_lora(tiny, "diffusers", 16, seed=SEED % 1000)
    safetensors.torch.save_file({k: v.contiguous() for k, v in lora.items()}, paths["lora"])
    with open(manifest_path, "w") as f:
        json.dump({"version": VERSION, "seed": SEED,
                   "sha256": {name: _digest(p) for name, p in paths.items()}}, f, indent=1)
    return paths
