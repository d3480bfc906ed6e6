"""TACA Probe Report: the TACA Attention Probe's measurements of the last sampling run, as a plot and as JSON."""

from __future__ import annotations

import json

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..taca import hooks, probe_plot

DESCRIPTION = (
    "Shows what a TACA Attention Probe measured in the last sampling run of its model: the image-to-text "
    "attention share per step, plain (gamma 1) and with TACA's gamma, over the blocks, and the first recorded "
    "step's share per image token. Connect the probed model and the sampler's output latent (so the report runs "
    "after sampling). Outputs the plot as an image and the numbers as JSON."
)


def no_probe_error() -> ValueError:
    return ValueError("TACA Probe Report: this model has no TACA Attention Probe. Put a TACA Attention Probe node "
                      "on the model the sampler uses and connect that node's MODEL output here (and the sampler's "
                      "LATENT output to latent).")


def plot_tensor(data: dict) -> torch.Tensor:
    """The plot as a ComfyUI IMAGE: (1, H, W, 3) float in [0, 1]."""
    picture = np.asarray(probe_plot.draw(data), dtype=np.float32) / 255.0
    return torch.from_numpy(picture)[None]


class TACAProbeReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TACAProbeReport",
            display_name="TACA Probe Report",
            category="model_patches/taca",
            description=DESCRIPTION,
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of a TACA Attention Probe (or a model made from it)."),
                io.Latent.Input("latent", tooltip="The sampler's output: it makes the report run after sampling. "
                                                  "Its values are not read."),
            ],
            outputs=[
                io.Image.Output(display_name="plot", tooltip="Text share per step (plain vs TACA) and the first "
                                                             "step's map over the image, with its colour scale."),
                io.String.Output(display_name="json", tooltip='The measurements: {"version": 1, "steps": [{"sigma", '
                                 '"calls": [{"index", "gamma", "share_plain", "share_taca"}]}], "heatmap": '
                                 '{"height", "width", "values"}} (per batch entry; values row by row).'),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model: io.Model.Type, latent: dict) -> io.NodeOutput:
        run = hooks.last_probe_run(model)
        if run is None:
            raise no_probe_error()
        data = run.as_json()
        text = json.dumps(data)
        image = plot_tensor(data)
        return io.NodeOutput(image, text, ui=ui.PreviewImage(image, cls=cls))
