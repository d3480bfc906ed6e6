"""TACA Attention Probe: measures how much attention the image tokens give the text, with and without TACA.

The measurement is the paper's (arXiv 2506.07986, Figure 2): per joint attention call, the share of each image
query's softmax that falls on the text keys, averaged over image queries and heads.  The logic lives in
``taca.probe`` (the arithmetic), ``taca.probe_record`` (a run's measurements) and ``taca.hooks``; the TACA Probe Report shows what it found.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..taca import families, hooks, probe_record
from ..taca import settings as taca_settings

DESCRIPTION = (
    "Measures, without changing anything the model computes, how much of each image token's attention goes to the "
    "text in every joint attention call: with gamma 1 (plain) and with the gamma a TACA Patch Model on this model "
    "uses there, per step and per block, plus a map of the first recorded step over the image. Put it anywhere "
    "between the model loader and the sampler, before or after TACA Patch Model, and read the result with a TACA "
    "Probe Report fed by the sampler's output. Bypass the node to remove it."
)


class TACAAttentionProbe(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TACAAttentionProbe",
            display_name="TACA Attention Probe",
            category="model_patches/taca",
            description=DESCRIPTION,
            inputs=[
                io.Model.Input("model", tooltip=f"A joint-attention (MM-DiT) model: {families.supported_names()}. "
                                                "With or without a TACA Patch Model, before or after this node."),
                io.Combo.Input(
                    "record", options=list(probe_record.RECORD), default="taca_steps",
                    tooltip="taca_steps: the model calls where TACA acts (those of the TACA Patch Model on this model; "
                            f"without one, t/1000 >= {taca_settings.DEFAULT_THRESHOLD_SIGMA}, the first steps). "
                            "all_steps: every model call (slower: each joint attention call is measured)."),
                io.Int.Input(
                    "max_rows", default=probe_record.DEFAULT_MAX_ROWS, min=1, max=probe_record.MAX_ROWS_LIMIT,
                    tooltip="Image query rows measured per attention call, evenly spaced over the image (all of them "
                            "when the image has fewer). The text share is their mean; more rows cost more time. The "
                            "first recorded model call measures every row for the map."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the probe attached; its output is unchanged, bit for bit.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model: io.Model.Type, record: str, max_rows: int) -> io.NodeOutput:
        settings = probe_record.ProbeSettings.from_inputs(record, max_rows)
        family = families.family_for_model(model.model)
        probed = model.clone()
        hooks.install_probe(probed, settings, family)
        return io.NodeOutput(probed)
