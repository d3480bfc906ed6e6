"""TACA LoRA Loader: the authors' TACA LoRAs (arXiv 2506.07986, sec. 3.3), active only while TACA acts."""

from __future__ import annotations

import logging

import folder_paths
from comfy_api.latest import io

from ..taca import lora as taca_lora
from ..taca import settings as taca_settings

log = logging.getLogger("comfyui-taca")

DESCRIPTION = (
    "Loads a TACA LoRA (trained by the TACA authors with TACA active, to remove the artifacts amplified "
    "cross-attention can cause) and applies it beside each layer at run time, only on the steps where TACA acts, "
    "as the official pipelines do. Base weights are never modified. Use it with a TACA Patch Model node, before or after."
)


class TACALoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TACALoraLoader",
            display_name="TACA LoRA Loader",
            category="model_patches/taca",
            description=DESCRIPTION,
            inputs=[
                io.Model.Input("model", tooltip="The model the LoRA was trained for (FLUX.1-dev or SD3.5-Medium for the authors' LoRAs)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA file from the loras folder (safetensors preferred)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="How strongly the LoRA is applied; 1.0 is what it was trained for."),
                io.Combo.Input("active_during", options=list(taca_lora.ACTIVE_DURING), default="taca_steps",
                               tooltip="taca_steps: only on the model calls where TACA acts (the same threshold as the "
                                       "TACA Patch Model on this model; "
                                       f"{taca_settings.DEFAULT_THRESHOLD_SIGMA} if there is none), as the authors use it. "
                                       "all_steps: an ordinary always-on LoRA."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the LoRA; the input model is left unchanged.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model: io.Model.Type, lora_name: str, strength: float, active_during: str) -> io.NodeOutput:
        if active_during not in taca_lora.ACTIVE_DURING:
            raise ValueError(f"TACA LoRA Loader: unknown active_during {active_during!r}; choose taca_steps or all_steps.")
        if strength == 0:
            return io.NodeOutput(model)
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        tensors = taca_lora.load_lora_file(path)
        model_name = type(model.model).__name__
        match = taca_lora.match_lora(model.model, tensors, float(strength))
        if match.matched_tensors == 0:
            raise taca_lora.no_match_error(tensors, lora_name, model_name)
        info, warning = taca_lora.summarize(match, lora_name, model_name)
        log.info(info)
        if warning:
            log.warning(warning)
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        taca_lora.notify_node(node_id, info if warning is None else info + "\n" + warning)
        patched = model.clone()
        taca_lora.install(patched, match, active_during, node_id, lora_name)
        return io.NodeOutput(patched)
