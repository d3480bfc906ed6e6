"""What TACA did in a sampling run: on which steps it acted and in how many attention calls.

One ``RunReport`` per TACA Patch Model node.  The APPLY_MODEL wrapper records
every model call; an OUTER_SAMPLE wrapper resets the report when a run starts
and, when it ends, logs a summary and sends it to the frontend as the
websocket event ``comfyui-taca.report`` (see ``as_message`` for the fields).
Importing this module does not import ComfyUI.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .settings import TacaSettings

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

    def warning(self) -> Optional[str]:
        if not self.settings.enabled:
            return f"TACA never acted: gamma is {self.settings.gamma}, which turns TACA off."
        if self.attention_calls > 0 or self.model_calls == 0:
            return None
        if self.acted_calls == 0:
            first = self.sample_sigmas[0] if self.sample_sigmas else None
            start = f"the run started at sigma {first:.3f}, " if first is not None else ""
            if first is not None and self.discrete_time:
                start = f"the run started at t/1000 = {self.sample_positions[0]:.3f} (sigma {first:.3f}), "
            return (f"TACA never acted: {start}below threshold_sigma {self.settings.threshold_sigma:g} (img2img or denoise < 1 "
                    "starts below it). Lower threshold_sigma if you want TACA in this run.")
        return ("TACA never acted: no attention call of this model had the joint text+image layout TACA expects, "
                "so nothing was changed.")

    def as_message(self) -> Dict[str, Any]:
        steps = max(len(self.sample_sigmas) - 1, 0)
        return {
            "node_id": self.node_id,
            "gamma": self.settings.gamma,
            "threshold_sigma": self.settings.threshold_sigma,
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
        }

    def summary(self) -> str:
        m = self.as_message()
        if m["warning"]:
            return m["warning"]
        steps = ", ".join(str(s) for s in m["acted_steps"]) or "none"
        return (f"TACA acted on steps {steps} of {m['steps_total']} ({m['time_scale']} >= {m['threshold_sigma']:g}, gamma "
                f"{m['gamma']:g}, {m['mode']}): {m['attention_calls']} joint attention calls in "
                f"{m['model_calls_acted']} of {m['model_calls']} model calls.")

    def publish(self) -> None:
        message = self.as_message()
        if message["warning"]:
            log.warning("[node %s] %s", self.node_id, message["warning"])
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
