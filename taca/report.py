"""What TACA did in a sampling run: on which steps it acted and in how many attention calls.

One ``RunReport`` per TACA Patch Model node (simple or Advanced).  The APPLY_MODEL wrapper records
every model call; an OUTER_SAMPLE wrapper resets the report when a run starts
and, when it ends, logs a summary and sends it to the frontend as the
websocket event ``comfyui-taca.report`` (see ``as_message`` for the fields).

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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .settings import GAMMA_OFF, TacaSettings, format_blocks

log = logging.getLogger("comfyui-taca")

EVENT = "comfyui-taca.report"


def running_server() -> Optional[Any]:
    """ComfyUI's PromptServer instance when a ComfyUI server is running, else None.

    Only a running ComfyUI has imported its ``server`` module.  Importing it from a script instead fails
    part-way and, without cached bytecode, recompiles server.py on every attempt (measured 21 ms per run).
    """
    return getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)


class RunReport:
    def __init__(self, node_id: Optional[str], settings: TacaSettings):
        self.node_id = node_id
        self.settings = settings
        self.reset([])

    def reset(self, sample_sigmas: Any, position_of: Optional[Callable[[float], float]] = None) -> None:
        """A new run over ``sample_sigmas``; ``position_of`` maps a sigma to the threshold's scale (t / 1000)."""
        # Kept as given (a tensor, maybe on the GPU) and read only when the run is over: no sync while sampling.
        self._schedule = sample_sigmas
        self._sample_sigmas: Optional[List[float]] = None
        self._position_of = position_of
        self._sample_positions: Optional[List[float]] = None
        self.model_calls = 0
        self.acted_calls = 0
        self.attention_calls = 0
        self.untouched_attention_calls = 0
        self.acted_sigmas: List[float] = []
        self.model_call_gammas: List[Tuple[float, List[float]]] = []  # (sigma, per joint call) of each acting call

    @property
    def sample_sigmas(self) -> List[float]:
        if self._sample_sigmas is None:
            schedule = self._schedule
            self._sample_sigmas = [float(s) for s in (schedule.tolist() if hasattr(schedule, "tolist") else schedule)]
        return self._sample_sigmas

    @property
    def sample_positions(self) -> List[float]:
        """The run's sigmas on the threshold's scale: equal to them on flow models, t / 1000 on discrete-time ones."""
        if self._sample_positions is None:
            position_of = self._position_of or (lambda sigma: sigma)
            self._sample_positions = [position_of(s) for s in self.sample_sigmas]
        return self._sample_positions

    @property
    def discrete_time(self) -> bool:
        return self.sample_positions != self.sample_sigmas

    def step_of(self, sigma: float) -> Optional[int]:
        for i, s in enumerate(self.sample_sigmas[:-1]):
            if abs(s - sigma) <= 1e-6 * max(1.0, abs(s)):
                return i
        return None

    def record(self, sigma: float, acted: bool, joint_calls: int = 0, other_calls: int = 0,
               gammas: Sequence[float] = ()) -> None:
        """One model call: ``gammas`` are those of its joint calls, in call order (1: a call left alone)."""
        self.model_calls += 1
        if not acted:
            return
        self.model_call_gammas.append((sigma, list(gammas)))
        self.acted_calls += 1
        self.attention_calls += joint_calls
        self.untouched_attention_calls += other_calls
        if joint_calls > 0 and sigma not in self.acted_sigmas:
            self.acted_sigmas.append(sigma)

    @property
    def acted_steps(self) -> List[int]:
        steps = {self.step_of(sigma) for sigma in self.acted_sigmas}
        return sorted(s for s in steps if s is not None)

    @property
    def joint_calls_per_model_call(self) -> Optional[int]:
        """The most joint attention calls one acting model call made (None: TACA acted in none)."""
        counts = [len(gammas) for _, gammas in self.model_call_gammas if gammas]
        return max(counts) if counts else None

    @property
    def acted_blocks(self) -> List[int]:
        """The joint call indices (call order, from 0) that got a gamma other than 1 in some model call."""
        return sorted({i for _, gammas in self.model_call_gammas for i, g in enumerate(gammas) if g != GAMMA_OFF})

    def blocks_beyond(self) -> List[int]:
        """The blocks asked for that this model's model calls did not reach."""
        made = self.joint_calls_per_model_call
        return [] if made is None else [b for b in self.settings.blocks if b >= made]

    def blocks_warning(self) -> Optional[str]:
        beyond = self.blocks_beyond()
        if not beyond:
            return None
        return (f"blocks {format_blocks(beyond)} name joint attention calls this model does not make: it makes "
                f"{self.joint_calls_per_model_call} per model call (0-{self.joint_calls_per_model_call - 1}).")

    def step_gammas(self) -> List[Dict[str, Any]]:
        """Per acting model call: its step, sigma, every joint call's gamma, and min/mean/max over those TACA
        acted on (all None when it acted on none: blocks beyond the model, an adaptive gamma of 1 everywhere)."""
        out = []
        for sigma, gammas in self.model_call_gammas:
            acted = [g for g in gammas if g != GAMMA_OFF]
            out.append({"step": self.step_of(sigma), "sigma": sigma, "gammas": gammas,
                        "min": min(acted) if acted else None, "max": max(acted) if acted else None,
                        "mean": sum(acted) / len(acted) if acted else None})
        return out

    def warning(self) -> Optional[str]:
        if not self.settings.enabled:
            return f"TACA never acted: gamma is {self.settings.gamma}, which turns TACA off."
        if self.model_calls == 0:
            return None
        if self.attention_calls > 0:
            if self.settings.blocks and not self.acted_blocks and self.blocks_beyond() == list(self.settings.blocks):
                return f"TACA never acted: {self.blocks_warning()}"
            return None
        if self.acted_calls == 0:
            first = self.sample_sigmas[0] if self.sample_sigmas else None
            start = f"the run started at sigma {first:.3f}, " if first is not None else ""
            if first is not None and self.discrete_time:
                start = f"the run started at t/1000 = {self.sample_positions[0]:.3f} (sigma {first:.3f}), "
            return (f"TACA never acted: {start}below threshold_sigma {self.settings.sigma_end:g} (img2img or denoise < 1 "
                    "starts below it). Lower threshold_sigma if you want TACA in this run.")
        return ("TACA never acted: no attention call of this model had the joint text+image layout TACA expects, "
                "so nothing was changed.")

    def as_message(self) -> Dict[str, Any]:
        steps = max(len(self.sample_sigmas) - 1, 0)
        message = {
            "node_id": self.node_id,
            "gamma": self.settings.gamma,
            "threshold_sigma": self.settings.sigma_end,
            "mode": self.settings.mode,
            "steps_total": steps,
            "sample_sigmas": self.sample_sigmas,
            # what threshold_sigma is compared with, per sample sigma: the sigma itself, or t / 1000 on
            # discrete-time models (the frontend's schedule plot uses these)
            "sample_positions": self.sample_positions,
            "time_scale": "t/1000" if self.discrete_time else "sigma",
            "acted_steps": self.acted_steps,
            "acted_sigmas": self.acted_sigmas,
            "model_calls": self.model_calls,
            "model_calls_acted": self.acted_calls,
            "attention_calls": self.attention_calls,
            "untouched_attention_calls": self.untouched_attention_calls,
            "warning": self.warning(),
            # the Advanced node's settings (their defaults: the simple node) and what they did
            "sigma_start": self.settings.sigma_start,
            "sigma_end": self.settings.sigma_end,
            "ramp": self.settings.ramp,
            "blocks": format_blocks(self.settings.blocks),
            "target_share": self.settings.target_share,
            "joint_calls_per_model_call": self.joint_calls_per_model_call,
            "acted_blocks": self.acted_blocks,
            "blocks_beyond": self.blocks_beyond(),
            "blocks_warning": self.blocks_warning(),
            "step_gammas": self.step_gammas(),
        }
        message["summary"] = self.summary_of(message)
        return message

    def summary(self) -> str:
        return self.as_message()["summary"]

    @classmethod
    def summary_of(cls, m: Dict[str, Any]) -> str:
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
        return text + cls._advanced_summary(m)

    @staticmethod
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

    def publish(self) -> None:
        message = self.as_message()
        if message["warning"]:
            log.warning("[node %s] %s", self.node_id, message["warning"])
        elif message["blocks_warning"]:
            log.warning("[node %s] %s", self.node_id, self.summary())
        else:
            log.info("[node %s] %s", self.node_id, self.summary())
        server = running_server()
        if server is None:
            return  # no server (scripts, tests): the log line is the report
        try:
            server.send_sync(EVENT, message)
        except Exception as err:  # the report must never fail a finished run
            log.debug("TACA report not sent: %s", err)


class ReportSampleWrapper:
    """OUTER_SAMPLE wrapper: one report per sampling run."""

    def __init__(self, report: RunReport, schedule_position: Optional[Callable[[Any, float], float]] = None):
        self.report = report
        self.schedule_position = schedule_position  # (model_sampling, sigma) -> t / 1000

    def __call__(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        position_of = None
        model_patcher = getattr(executor.class_obj, "model_patcher", None)  # the guider's model
        if self.schedule_position is not None and model_patcher is not None:
            model_sampling = model_patcher.get_model_object("model_sampling")
            position_of = lambda sigma: self.schedule_position(model_sampling, sigma)  # noqa: E731
        self.report.reset(sigmas, position_of)
        out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        self.report.publish()
        return out
