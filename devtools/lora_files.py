"""LoRA files generated for the tests, shaped like the TACA authors' LoRAs (attention layers, rank 16 / 64).

Layer names come from ComfyUI's own diffusers <-> model maps (comfy.utils.flux_to_diffusers,
mmdit_to_diffusers), so the files look like what trainers (ai-toolkit, PEFT, kohya) write.
"""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

import torch

import comfy.utils

FORMATS = ("diffusers", "peft", "kohya", "comfy")

_ATTENTION = {
    "flux": re.compile(r"^(transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                       r"to_add_out)|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_out))\.weight$"),
    "sd3": re.compile(r"^transformer_blocks\.\d+\.(attn|attn2)\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
                      r"add_v_proj|to_add_out)\.weight$"),
}


def _family(tiny) -> str:
    return "flux" if tiny.kind.startswith("flux") else "sd3"


def attention_targets(tiny) -> List[Tuple[str, str, int, int]]:
    """(diffusers name, model weight key, out, in) for every attention projection of the tiny model."""
    base = tiny.patcher.model
    config = base.model_config.unet_config
    mapping = (comfy.utils.flux_to_diffusers if _family(tiny) == "flux" else comfy.utils.mmdit_to_diffusers)(
        config, output_prefix="diffusion_model.")
    state = base.state_dict()
    out = []
    for name, target in sorted(mapping.items()):
        if not _ATTENTION[_family(tiny)].match(name):
            continue
        key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
        if key not in state:
            continue
        rows = offset[2] if offset is not None else state[key].shape[0]
        out.append((name[:-len(".weight")], key, rows, state[key].shape[1]))
    return out


def make_lora(tiny, fmt: str, rank: int = 16, seed: int = 0, alpha=None) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def pair(rows, cols):
        down = torch.randn(rank, cols, generator=g) / cols ** 0.5
        up = torch.randn(rows, rank, generator=g) * (0.5 / rank ** 0.5)
        return down, up

    sd: Dict[str, torch.Tensor] = {}
    targets = attention_targets(tiny)
    if fmt in ("diffusers", "peft"):
        prefix = "transformer." if fmt == "diffusers" else "base_model.model."
        for name, _, rows, cols in targets:
            down, up = pair(rows, cols)
            sd[f"{prefix}{name}.lora_A.weight"] = down
            sd[f"{prefix}{name}.lora_B.weight"] = up
        return sd
    # kohya and ComfyUI-native name the model's own (fused) layers, with an alpha.
    state = tiny.patcher.model.state_dict()
    modules = sorted({key for _, key, _, _ in targets})
    for key in modules:
        rows, cols = state[key].shape
        down, up = pair(rows, cols)
        path = key[len("diffusion_model."):-len(".weight")]
        base = f"lora_unet_{path.replace('.', '_')}" if fmt == "kohya" else f"diffusion_model.{path}"
        sd[f"{base}.lora_down.weight"] = down
        sd[f"{base}.lora_up.weight"] = up
        sd[f"{base}.alpha"] = torch.tensor(float(rank / 2 if alpha is None else alpha))
    return sd


def target_weight_keys(tiny) -> List[str]:
    return sorted({key for _, key, _, _ in attention_targets(tiny)})
