"""What TACA did in a sampling run, in words: the run report of a TACA Patch Model node.

When a run ends, the node's OUTER_SAMPLE wrapper (``taca.hooks``) turns that run's ``RunRecord`` into a message,
logs its summary and sends it to the frontend as the websocket event ``comfyui-taca.report`` (see ``as_message``
for the fields; ``summary`` is the line the log and the node show).

What the Advanced node's settings did is in the same message: the window and ramp, the blocks asked for
and those acted on, the joint attention calls the model made per model call (and a ``blocks_warning`` naming
blocks beyond them), and the gammas: ``step_gammas`` holds, for every model call TACA acted in, its step,
its sigma and the full list of the gammas its joint calls got, in call order (1: a call left alone), with
their min, mean and max over the calls TACA acted on.  The full list rather than a summary, because an
adaptive gamma differs per call and the lists are small (57 numbers per model call on FLUX.1).
Importing this module does not import ComfyUI.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Dict, Optional

from .run_record import RunRecord
from .settings import TacaSettings, format_blocks

log = logging.getLogger("comfyui-taca")

EVENT = "comfyui-taca.report"


def running_server() -> Optional[Any]:
    """ComfyUI's PromptServer instance when a ComfyUI server is running, else None.

    Only a running ComfyUI has imported its ``server`` module.  Importing it from a script instead fails
    part-way and, without cached bytecode, recompiles server.py on every attempt (measured 21 ms per run).
    """
    return getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)


def blocks_warning(record: RunRecord, settings: TacaSettings) -> Optional[str]:
    beyond = record.blocks_beyond(settings.blocks)
    if not beyond:
        return None
    made = record.joint_calls_per_model_call
    return (f"blocks {format_blocks(beyond)} name joint attention calls this model does not make: it makes "
            f"{made} per model call (0-{made - 1}).")


def warning(record: RunRecord, settings: TacaSettings) -> Optional[str]:
    """Why TACA did nothing in this run, or None."""
    if not settings.enabled:
        return f"TACA never acted: gamma is {settings.gamma}, which turns TACA off."
    if record.model_calls == 0:
        return None
    if record.attention_calls > 0:
        if settings.blocks and not record.acted_blocks and record.blocks_beyond(settings.blocks) == list(settings.blocks):
            return f"TACA never acted: {blocks_warning(record, settings)}"
        return None
    if record.acted_calls == 0:
        first = record.sample_sigmas[0] if record.sample_sigmas else None
        start = f"the run started at sigma {first:.3f}, " if first is not None else ""
        if first is not None and record.discrete_time:
            start = f"the run started at t/1000 = {record.sample_positions[0]:.3f} (sigma {first:.3f}), "
        return (f"TACA never acted: {start}below threshold_sigma {settings.sigma_end:g} (img2img or denoise < 1 "
                "starts below it). Lower threshold_sigma if you want TACA in this run.")
    return ("TACA never acted: no attention call of this model had the joint text+image layout TACA expects, "
            "so nothing was changed.")


def as_message(record: RunRecord, settings: TacaSettings, node_id: Optional[str]) -> Dict[str, Any]:
    """The report event's fields."""
    steps = max(len(record.sample_sigmas) - 1, 0)
    message = {
        "node_id": node_id,
        "gamma": settings.gamma,
        "threshold_sigma": settings.sigma_end,
        "mode": settings.mode,
        "steps_total": steps,
        "sample_sigmas": record.sample_sigmas,
        # what threshold_sigma is compared with, per sample sigma: the sigma itself, or t / 1000 on
        # discrete-time models (the frontend's schedule plot uses these)
        "sample_positions": record.sample_positions,
        "time_scale": "t/1000" if record.discrete_time else "sigma",
        "acted_steps": record.acted_steps,
        "acted_sigmas": record.acted_sigmas,
        "model_calls": record.model_calls,
        "model_calls_acted": record.acted_calls,
        "attention_calls": record.attention_calls,
        "untouched_attention_calls": record.untouched_attention_calls,
        "warning": warning(record, settings),
        # the Advanced node's settings (their defaults: the simple node) and what they did
        "sigma_start": settings.sigma_start,
        "sigma_end": settings.sigma_end,
        "ramp": settings.ramp,
        "blocks": format_blocks(settings.blocks),
        "target_share": settings.target_share,
        "joint_calls_per_model_call": record.joint_calls_per_model_call,
        "acted_blocks": record.acted_blocks,
        "blocks_beyond": record.blocks_beyond(settings.blocks),
        "blocks_warning": blocks_warning(record, settings),
        "step_gammas": record.step_gammas(),
    }
    message["summary"] = summary_of(message)
    return message


def summary_of(m: Dict[str, Any]) -> str:
    """The report in one line of words (the log line, and what the frontend shows under the node)."""
    if m["warning"]:
        return m["warning"]
    steps = ", ".join(str(s) for s in m["acted_steps"]) or "none"
    window = f"{m['time_scale']} >= {m['threshold_sigma']:g}"
    if m["sigma_start"] is not None:  # the Advanced node
        window = f"{m['threshold_sigma']:g} <= {m['time_scale']} <= {m['sigma_start']:g}, ramp {m['ramp']}"
    text = (f"TACA acted on steps {steps} of {m['steps_total']} ({window}, gamma "
            f"{m['gamma']:g}, {m['mode']}): {m['attention_calls']} joint attention calls in "
            f"{m['model_calls_acted']} of {m['model_calls']} model calls.")
    return text + _advanced_summary(m)


def _advanced_summary(m: Dict[str, Any]) -> str:
    """What the Advanced settings did, in words ("" for the simple node's settings)."""
    parts = []
    if m["blocks"]:
        acted = format_blocks(m["acted_blocks"]) or "none"
        parts.append(f"Blocks {m['blocks']}: acted on {acted} of {m['joint_calls_per_model_call']} joint calls "
                     "per model call.")
    if m["blocks_warning"]:
        parts.append(m["blocks_warning"][0].upper() + m["blocks_warning"][1:])
    if m["sigma_start"] is not None and (m["ramp"] != "constant" or m["target_share"] > 0):
        per_step = "; ".join(
            f"{e['step'] if e['step'] is not None else 'sigma %.4g' % e['sigma']}: "
            + ("1" if e["min"] is None else f"{e['min']:.4g}" if e["min"] == e["max"]
               else f"{e['min']:.4g}-{e['max']:.4g} (mean {e['mean']:.4g})")
            for e in m["step_gammas"])
        target = f", adaptive towards share {m['target_share']:g}" if m["target_share"] > 0 else ""
        parts.append(f"Gamma per step{target}: {per_step}.")
    return "".join(" " + p for p in parts)


def publish(message: Dict[str, Any]) -> None:
    """Log the message's summary and send the message to the frontend (when a server is running)."""
    node_id = message["node_id"]
    if message["warning"] or message["blocks_warning"]:
        log.warning("[node %s] %s", node_id, message["summary"])
    else:
        log.info("[node %s] %s", node_id, message["summary"])
    server = running_server()
    if server is None:
        return  # no server (scripts, tests): the log line is the report
    try:
        server.send_sync(EVENT, message)
    except Exception as err:  # the report must never fail a finished run
        log.debug("TACA report not sent: %s", err)
