"""The pack's ComfyUI nodes (V3 API)."""

from __future__ import annotations

from typing import List, Type

from comfy_api.latest import ComfyExtension, io

from .taca_attention_probe import TACAAttentionProbe
from .taca_lora_loader import TACALoraLoader
from .taca_patch_model import TACAPatchModel
from .taca_patch_model_advanced import TACAPatchModelAdvanced
from .taca_probe_report import TACAProbeReport


class TacaExtension(ComfyExtension):
    async def get_node_list(self) -> List[Type[io.ComfyNode]]:
        return [TACAPatchModel, TACAPatchModelAdvanced, TACALoraLoader, TACAAttentionProbe, TACAProbeReport]


async def comfy_entrypoint() -> TacaExtension:
    return TacaExtension()
