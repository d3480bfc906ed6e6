"""TACA Patch Model (Advanced): TACA with a sigma window, a ramp of gamma, a choice of joint attention calls and
an adaptive gamma.

Same arithmetic and modes as TACA Patch Model (``nodes.taca_patch_model``, whose inputs and install it shares);
the schedule is ``taca.settings.TacaSettings``' last four fields, applied per joint call by ``taca.hooks``.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..taca import probe as taca_probe
from ..taca import settings as taca_settings
from ..taca.families import joint_calls_summary
from ..taca.settings import TacaSettings
from .taca_patch_model import MODEL_OUTPUT_TOOLTIP, gamma_input, mode_input, model_input, patched_model

DESCRIPTION = (
    "TACA (arXiv 2506.07986) with its schedule in your hands: the sigma window it acts in, a ramp of gamma over "
    "that window, which joint attention calls (blocks) it acts on, and an adaptive gamma that brings each call's "
    "image-to-text attention share to a target. At its defaults it is exactly TACA Patch Model. "
    "Bypass the node to undo it."
)

# Joint attention calls per model call of the real models, from taca.families.JOINT_CALLS (their published configs;
# the help page has the table).
BLOCK_COUNTS = joint_calls_summary()
SCALE_NOTE = ("t/1000: the sigma on flow models (FLUX, SD3, Qwen-Image, ...), the model's timestep over its 1000 "
              "training steps on discrete-time ones (CogVideoX)")


class TACAPatchModelAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TACAPatchModelAdvanced",
            display_name="TACA Patch Model (Advanced)",
            category="model_patches/taca",
            description=DESCRIPTION,
            inputs=[
                model_input(),
                gamma_input(" With a ramp: the gamma at sigma_start. With target_share: the largest gamma allowed."),
                io.Float.Input(
                    "sigma_start", default=taca_settings.DEFAULT_SIGMA_START,
                    min=taca_settings.THRESHOLD_SIGMA_MIN, max=taca_settings.THRESHOLD_SIGMA_MAX, step=0.001,
                    tooltip="The window's upper end: TACA acts while sigma_end <= t/1000 <= sigma_start "
                            f"({SCALE_NOTE}). 1 = from the first step.",
                ),
                io.Float.Input(
                    "sigma_end", default=taca_settings.DEFAULT_THRESHOLD_SIGMA,
                    min=taca_settings.THRESHOLD_SIGMA_MIN, max=taca_settings.THRESHOLD_SIGMA_MAX, step=0.001,
                    tooltip="The window's lower end, TACA Patch Model's threshold_sigma (paper eq. 11: t_thresh = "
                            f"1000 x this). Default {taca_settings.DEFAULT_THRESHOLD_SIGMA} = the first 3 of 30 steps "
                            "on FLUX and SD3.5. 0 = to the last step. Must not be above sigma_start.",
                ),
                io.Combo.Input(
                    "ramp", options=list(taca_settings.RAMPS), default=taca_settings.DEFAULT_RAMP,
                    tooltip="constant: gamma over the whole window. linear / cosine: gamma at sigma_start falling to "
                            "1 at sigma_end, along a straight line or a half cosine (flat at both ends).",
                ),
                io.String.Input(
                    "blocks", default="", multiline=False,
                    tooltip="Which joint attention calls of each model call get TACA, by index in call order from 0, "
                            "like \"0-9,15\"; empty = all. Joint calls per model call: "
                            f"{BLOCK_COUNTS} (the help page lists them). The run report says how many the model made "
                            "and warns about indices beyond them.",
                ),
                io.Float.Input(
                    "target_share", default=taca_settings.TARGET_SHARE_OFF, min=taca_settings.TARGET_SHARE_OFF,
                    max=taca_settings.TARGET_SHARE_MAX, step=0.01,
                    tooltip="Adaptive gamma (0 = off). Per joint call, the gamma in [1, gamma] that brings the mean "
                            "share of attention image tokens give the text closest to this share (0.3 = 30%); 1 where "
                            "the share is already above it. Measured on up to "
                            f"{taca_probe.ADAPTIVE_ROWS} evenly spaced image tokens per call, at a cost.",
                ),
                mode_input(),
            ],
            outputs=[io.Model.Output(tooltip=MODEL_OUTPUT_TOOLTIP)],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model: io.Model.Type, gamma: float, sigma_start: float, sigma_end: float, ramp: str,
                blocks: str, target_share: float, mode: str) -> io.NodeOutput:
        settings = TacaSettings.from_advanced_inputs(gamma, sigma_start, sigma_end, ramp, blocks, target_share, mode)
        return patched_model(cls, model, settings)
