"""TACA Patch Model: Temperature-Adjusted Cross-modal Attention for MM-DiT models.

Lv, Pan, Si, Chen, Zuo, Liu, Wong, "TACA: Rethinking Cross-Modal Interaction in
Multimodal Diffusion Transformers", arXiv 2506.07986 (2025).  The node is thin:
the arithmetic lives in ``taca.attention``, the model knowledge in
``taca.families`` and the ComfyUI hooks in ``taca.hooks``.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..taca import attention as taca_attention
from ..taca import families, hooks
from ..taca import settings as taca_settings
from ..taca.settings import TacaSettings

DESCRIPTION = (
    "TACA (Temperature-Adjusted Cross-modal Attention, arXiv 2506.07986): multiplies the attention logits "
    "of image queries attending to text keys by gamma while the sigma is at or above the threshold "
    "(the first denoising steps), so the few text tokens are not drowned by thousands of image tokens. "
    "Improves object count, colour, shape and spatial-relation adherence. Bypass the node to undo it."
)


def model_input() -> io.Model.Input:
    return io.Model.Input("model", tooltip=f"A joint-attention (MM-DiT) model: {families.supported_names()}.")


def gamma_input(extra: str = "") -> io.Float.Input:
    return io.Float.Input(
        "gamma", default=taca_settings.DEFAULT_GAMMA, min=taca_settings.GAMMA_MIN,
        max=taca_settings.GAMMA_MAX, step=0.01,
        tooltip="Temperature gamma_0 applied to image-query x text-key attention logits. "
                f"The paper uses {taca_settings.DEFAULT_GAMMA} (1.15-1.25 all help; 1.3 helps shape but "
                f"hurts colour). {taca_settings.GAMMA_OFF} turns TACA off." + extra,
    )


def mode_input() -> io.Combo.Input:
    return io.Combo.Input(
        "mode", options=list(taca_settings.MODES), default=taca_settings.DEFAULT_MODE,
        tooltip="exact: eq. 10 exactly, through ComfyUI's own attention kernel (two calls during TACA steps). "
                "selective: the paper's fast listing 2, one call, but text->text logits are scaled too. "
                "flex: the paper's listing 1 via torch flex_attention (exact, compiled when possible; slower).",
    )


MODEL_OUTPUT_TOOLTIP = "The model with TACA; the input model is left unchanged."


def patched_model(node: type, model: io.Model.Type, settings: TacaSettings) -> io.NodeOutput:
    """``model`` cloned with TACA installed under ``settings``: what both TACA Patch Model nodes return."""
    family = families.family_for_model(model.model)
    if settings.mode == "flex":
        taca_attention.require_flex()
    patched = model.clone()
    node_id = getattr(getattr(node, "hidden", None), "unique_id", None)
    hooks.install_taca(patched, settings, family, node_id)
    return io.NodeOutput(patched)


class TACAPatchModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TACAPatchModel",
            display_name="TACA Patch Model",
            category="model_patches/taca",
            description=DESCRIPTION,
            inputs=[
                model_input(),
                gamma_input(),
                io.Float.Input(
                    "threshold_sigma", default=taca_settings.DEFAULT_THRESHOLD_SIGMA,
                    min=taca_settings.THRESHOLD_SIGMA_MIN, max=taca_settings.THRESHOLD_SIGMA_MAX, step=0.001,
                    tooltip="TACA acts while t/1000 >= this value (paper eq. 11, t_thresh = 1000 x this). On flow "
                            "models (FLUX, SD3, Qwen-Image, ...) t/1000 is the sigma; on discrete-time models "
                            "(CogVideoX) it is the model's timestep of the sigma over its 1000 training steps. "
                            f"Default {taca_settings.DEFAULT_THRESHOLD_SIGMA} = the first 3 of 30 steps on FLUX and "
                            "SD3.5. 0 = every step.",
                ),
                mode_input(),
            ],
            outputs=[io.Model.Output(tooltip=MODEL_OUTPUT_TOOLTIP)],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model: io.Model.Type, gamma: float, threshold_sigma: float, mode: str) -> io.NodeOutput:
        return patched_model(cls, model, TacaSettings.from_inputs(gamma, threshold_sigma, mode))
