"""TACA cost against plain attention: one process, every variant paired with a baseline sample beside it.

    # every section (about 25 min on 2 cores)
    TACA_COMFYUI_VERSION=0.3.75 .runtime/comfyui-0.3.75/venv/bin/python bench/benchmark.py
    TACA_COMFYUI_VERSION=0.33.0 .runtime/comfyui-0.33.0/venv/bin/python bench/benchmark.py \
        --sections sampling,lora --repeats 5
    TACA_COMFYUI_VERSION=0.33.0 .runtime/comfyui-0.33.0/venv/bin/python bench/benchmark.py \
        --sections attention --cases "image 1024" --repeats 15
    TACA_COMFYUI_VERSION=0.33.0 .runtime/comfyui-0.33.0/venv/bin/python bench/benchmark.py --smoke \
        --cases "SD3-like 24x64 text 154 image 1024 float32 ["    # every section runs; no numbers to read

``TACA_COMFYUI_VERSION`` picks the runtime (``.runtime/comfyui-VERSION``), as for the tests; without it the
newest runtime built is used.  The output's header names the ComfyUI version, its attention backend, its
device and its model patcher class.

Sections
  attention  one attention call at FLUX-like and SD3-like shapes, fp32 / bf16, with and without a mask, on
             ComfyUI's selected attention and on PyTorch SDPA: plain against exact, selective, flex, and the
             bare two-call split ("two calls, no TACA") that exact cannot undercut
  memory     peak memory of one call over plain attention, in units of one K tensor
  sampling   whole 30-step sampling of a small FLUX-like model through ComfyUI's sampler, measured whole and
             composed from per-call costs
  lora       one model call with the TACA LoRA, in a TACA step and in a non-TACA step
  syncs      host reads (host-device synchronisations on a GPU) per model call
  compile    the patched model under ComfyUI's TorchCompileModel (inductor)
  probe      the TACA Attention Probe: one recorded joint attention call, one recorded model call, and its
             wrappers on a call it does not record
  share      the share probe's arithmetic (``taca.probe``) on one FLUX-like joint call, on ComfyUI's selected
             attention and on PyTorch SDPA: a plain call against the call plus a recorded probe (1024 rows,
             gammas 1 and 1.2), and an exact TACA call against the adaptive one (measure, gamma search,
             exact); ``--cases "image 4096"`` adds FLUX's 1024 x 1024 image (minutes on a CPU)

``--smoke`` runs every section at its smallest (one round, 3 sampling steps, one per-call round, a short
pass-through loop): it checks that each section runs on a runtime, its numbers mean nothing.

Each variant alternates with the baseline a few times per round, each keeping its fastest time; ratios are
taken within the pair and summarised by their median and min-max over rounds (see ``interleaved``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from devtools import comfy_runtime  # noqa: E402

sys.path.pop(0)
comfy_runtime.activate(cpu=True)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import comfy.ldm.modules.attention as comfy_attention  # noqa: E402

from devtools import tiny_models as tm  # noqa: E402
from devtools.host_reads import HostReadCounter  # noqa: E402
from taca import attention as taca_attention, probe as taca_probe  # noqa: E402
from taca.attention import JointLayout, assemble_heads_as_tokens  # noqa: E402
from taca import probe_record  # noqa: E402
from taca.hooks import CallContext, JointAttentionOverride  # noqa: E402
from taca.joint_call import layouts_by_length  # noqa: E402
from taca.settings import TacaSettings  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROWS: List[Tuple[str, ...]] = []


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


Timings = Tuple[Dict[str, List[float]], Dict[str, List[float]]]


def interleaved(variants: Dict[str, Callable[[], object]], rounds: int, inner: int = 1) -> Timings:
    """Seconds per call of each variant, each sample taken right beside a sample of the baseline (the first
    variant).

    In every round each other variant is paired with the baseline: the two run alternately ``inner`` times
    each (baseline first in even rounds, second in odd ones) and each keeps its fastest time.  Drift over
    seconds then moves both samples of a pair alike, and a burst of load that slows one call is dropped.
    Returns (samples per variant, the baseline sample paired with each of those samples).
    """
    names = list(variants)
    base, others = names[0], names[1:]
    for fn in variants.values():  # warm-up
        fn()
    sync()

    def timed(name: str) -> float:
        sync()
        start = time.perf_counter()
        variants[name]()
        sync()
        return time.perf_counter() - start

    times: Dict[str, List[float]] = {n: [] for n in names}
    neighbours: Dict[str, List[float]] = {n: [] for n in others}
    for r in range(rounds):
        for name in others[r % len(others):] + others[:r % len(others)]:
            pair = (base, name) if r % 2 == 0 else (name, base)
            samples: Dict[str, List[float]] = {n: [] for n in pair}
            for _ in range(inner):
                for n in pair:
                    samples[n].append(timed(n))
            best = {n: min(v) for n, v in samples.items()}
            times[name].append(best[name])
            times[base].append(best[base])
            neighbours[name].append(best[base])
    return times, neighbours


def report(section: str, case: str, measured: Timings, baseline: str, note: str = "") -> None:
    """Paired ratio to the neighbouring baseline sample (median, min-max) and best-over-best: the fastest
    sample of the variant over the fastest of the baseline, which load that slows some rounds cannot inflate."""
    times, neighbours = measured
    base = times[baseline]
    for name, samples in times.items():
        ratios = [t / b for t, b in zip(samples, neighbours[name])] if name != baseline else [1.0]
        ROWS.append((section, case, name, f"{statistics.median(samples) * 1e3:.2f}",
                     f"{min(samples) * 1e3:.2f}-{max(samples) * 1e3:.2f}",
                     f"{statistics.median(ratios):.3f}x", f"{min(ratios):.3f}-{max(ratios):.3f}",
                     f"{min(samples) / min(base):.3f}x", note))


def print_table() -> None:
    header = ("section", "case", "variant", "median ms", "min-max ms", "paired ratio", "ratio min-max",
              "best/best", "note")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in ROWS:
        print("| " + " | ".join(row) + " |")


# ---------------------------------------------------------------- attention

def attention_inputs(heads, dim, text, image, dtype, skip_reshape, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = text + image
    q, k, v = (torch.randn(1, heads, n, dim, generator=g).to(DEVICE, dtype) for _ in range(3))
    if not skip_reshape:
        q, k, v = (t.transpose(1, 2).reshape(1, n, heads * dim).contiguous() for t in (q, k, v))
    return q, k, v


def taca_override(settings: Optional[TacaSettings], span: JointLayout,
                  probe: Optional[probe_record.ProbeCall] = None) -> JointAttentionOverride:
    """The override of one model call inside TACA's window (``settings`` None: the probe alone, gamma 1)."""
    gamma = 1.0 if settings is None else settings.gamma
    return JointAttentionOverride(CallContext(1.0, 1.0, settings, gamma, layouts_by_length([span]), probe), None)


def attention_variants(backend, q, k, v, heads, mask, skip_reshape, span) -> Dict[str, Callable[[], object]]:
    def call(mode):
        if mode is None:
            return lambda: backend(q, k, v, heads, mask=mask, skip_reshape=skip_reshape, transformer_options={})

        def run():  # one model call's override, as the model call wrapper makes it
            override = taca_override(TacaSettings(1.2, 0.97, mode), span)
            return backend(q, k, v, heads, mask=mask, skip_reshape=skip_reshape,
                           transformer_options={"optimized_attention_override": override})
        return run

    return {"plain": call(None), "exact": call("exact"), "selective": call("selective"), "flex": call("flex"),
            "two calls, no TACA": split_floor(backend, q, k, v, heads, mask, skip_reshape, span)}


def split_floor(backend, q, k, v, heads, mask, skip_reshape, span) -> Callable[[], object]:
    """The text rows and the visual rows in two backend calls with the same, unscaled keys, written into one
    (B, N, H*D) output: what splitting the rows alone costs this backend, with none of TACA's arithmetic.
    ``exact`` cannot be cheaper than this on a backend that takes one K per call."""
    def run():
        q4, k4, v4 = q, k, v
        if not skip_reshape:
            q4, k4, v4 = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
            k4, v4 = k4.contiguous(), v4.contiguous()
        n = q4.shape[2]
        parts = []
        for a, b in ((span.start, span.stop), (span.stop, n)):
            rows_mask = None if mask is None else mask[..., a:b, :]
            parts.append(([(a, b)], backend(q4[:, :, a:b], k4, v4, heads, mask=rows_mask, skip_reshape=True,
                                            skip_output_reshape=True)))
        return assemble_heads_as_tokens(parts, n)

    return run


# (label, heads, head dim, text tokens, image tokens or None for the default, dtype, mask, modes)
ATTENTION_CASES = [
    ("FLUX-like", 24, 128, 512, None, torch.float32, False, ("exact", "selective", "flex")),
    ("FLUX-like", 24, 128, 512, None, torch.float32, True, ("exact", "selective", "flex")),
    ("FLUX-like", 24, 128, 512, None, torch.bfloat16, False, ("exact", "selective", "flex")),
    ("FLUX-like", 24, 128, 512, None, torch.bfloat16, True, ("exact", "selective")),
    ("FLUX-like", 24, 128, 512, 4096, torch.float32, False, ("exact", "selective")),
    ("SD3-like", 24, 64, 154, None, torch.float32, False, ("exact", "selective", "flex")),
    ("SD3-like", 24, 64, 154, None, torch.float32, True, ("exact", "selective")),
    ("SD3-like", 24, 64, 154, None, torch.bfloat16, False, ("exact", "selective")),
]


def bench_attention(rounds: int, only: str = "") -> None:
    """Every case on ComfyUI's selected attention (what a ComfyUI user on this machine runs) and on PyTorch SDPA
    (ComfyUI's choice on most GPUs, and with --use-pytorch-cross-attention)."""
    default_image = 4096 if DEVICE.type == "cuda" else 1024
    backends = [("comfy:" + comfy_attention.optimized_attention.__name__, comfy_attention.optimized_attention)]
    if comfy_attention.optimized_attention is not comfy_attention.attention_pytorch:
        backends.append(("pytorch-sdpa", comfy_attention.attention_pytorch))
    for label, heads, dim, text, image, dtype, with_mask, modes in ATTENTION_CASES:
        image = image or default_image
        skip_reshape = label.startswith("FLUX")  # FLUX passes (B, H, N, D); SD3 passes (B, N, H*D)
        q, k, v = attention_inputs(heads, dim, text, image, dtype, skip_reshape)
        n = text + image
        mask = None
        if with_mask:  # an additive key-padding style mask, as a padded-text model would use
            mask = torch.zeros(1, 1, n, n, device=DEVICE, dtype=dtype)
            mask[..., text - 16:text] = -10000.0
        span = JointLayout.text_first(text, n)
        for backend_name, backend in backends:
            case = (f"{label} {heads}x{dim} text {text} image {image} {str(dtype)[6:]}"
                    f"{' +mask' if with_mask else ''} [{backend_name}]")
            if only and only not in case:
                continue
            every = attention_variants(backend, q, k, v, heads, mask, skip_reshape, span)
            variants = {"plain": every["plain"]}
            note = ""
            for mode in modes:
                if mode == "flex":
                    start = time.perf_counter()
                    every["flex"]()  # the first call compiles (then cached for this shape)
                    sync()
                    note = f"flex first call (compile) {time.perf_counter() - start:.1f}s"
                variants[mode] = every[mode]
            variants["two calls, no TACA"] = every["two calls, no TACA"]
            inner = 2 if n > 3000 else 3
            report("attention", case, interleaved(variants, rounds, inner=inner), "plain", note)


# ---------------------------------------------------------------- memory

class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created by ops inside the block (inputs not counted)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def _release(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {a.untyped_storage().data_ptr() for a in list(args) + list(kwargs.values())
                  if isinstance(a, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                nbytes = t.untyped_storage().nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._release, nbytes)
        return out


def bench_memory() -> None:
    heads, dim, text, image = 24, 128, 512, (4096 if DEVICE.type == "cuda" else 1024)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = attention_inputs(heads, dim, text, image, dtype, True)
        k_bytes = k.numel() * k.element_size()
        span = JointLayout.text_first(text, text + image)
        peaks = {}
        variants = attention_variants(comfy_attention.attention_pytorch, q, k, v, heads, None, True, span)
        variants.pop("flex")  # a compiled higher-order op: invisible to dispatch-level tracking
        variants.pop("two calls, no TACA")
        for name, fn in variants.items():
            fn()
            with LiveBytes() as tracker:
                out = fn()
                del out
            peaks[name] = tracker.peak
        for name, peak in peaks.items():
            ROWS.append(("memory", f"FLUX-like text {text} image {image} {str(dtype)[6:]} [pytorch-sdpa]", name,
                         f"{peak / 2**20:.1f} MiB", "", f"{(peak - peaks['plain']) / k_bytes:+.2f} K", "", "",
                         "peak of tensors made inside the call, over plain, in K-tensor units"))


# ---------------------------------------------------------------- models

def bench_model(kind="flux"):
    return tm.build(kind, size="bench")


def one_call(patcher, tiny, sigma):
    from devtools.sampling import one_step

    pos, neg, latent = tm.conditioning(tiny, 1), tm.conditioning(tiny, 2), tm.latent(tiny, *tm.BENCH_LATENT[tiny.kind])
    return lambda: one_step(patcher, pos, neg, latent, sigma=sigma, cfg=1.0)


THRESHOLD = 0.97  # the node's default threshold_sigma


def patched(nodes, model, mode="exact"):
    return nodes["TACAPatchModel"].execute(model=model, gamma=1.2, threshold_sigma=THRESHOLD, mode=mode).result[0]


def with_lora(nodes, model, name, active):
    return nodes["TACALoraLoader"].execute(model=model, lora_name=name, strength=1.0, active_during=active).result[0]


def bench_lora_file(tiny) -> str:
    """A rank-64 attention LoRA for the bench model, written to a temporary loras folder."""
    import tempfile

    import folder_paths
    import safetensors.torch

    from devtools import lora_files

    folder = tempfile.mkdtemp(prefix="taca_bench_loras_")
    folder_paths.add_model_folder_path("loras", folder)
    tensors = lora_files.make_lora(tiny, "diffusers", 64)
    hidden = tiny.patcher.model.diffusion_model.hidden_size
    name = f"bench_{tiny.kind}_{hidden}.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, name))
    return name


WORKS_EVERY_STEP = {"exact + LoRA all_steps"}


def taca_step_count(patcher, steps: int) -> int:
    from devtools.sampling import schedule

    return int((schedule(patcher, steps)[:-1] >= THRESHOLD).sum())


def per_call_deltas(variants, tiny, sigma: float, rounds: int) -> Dict[str, float]:
    """Paired median seconds each variant adds to one model call at ``sigma`` (the first variant is the
    baseline).  A one-call measurement is a one-step run: the difference holds that run's setup once."""
    calls, next_to = interleaved({name: one_call(m, tiny, sigma) for name, m in variants.items()}, rounds, inner=2)
    return {name: statistics.median([t - b for t, b in zip(calls[name], next_to[name])]) for name in next_to}


def composed_row(section: str, case: str, name: str, run_time: float, steps: int, taca_steps: int,
                 taca_call: float, other_call: float, note: str) -> None:
    """A whole run composed from per-call costs: (taca_steps * taca_call + other steps * other_call) / run."""
    added = taca_steps * taca_call + (steps - taca_steps) * other_call
    ROWS.append((section, case + ", composed from per-call costs", name, f"{(run_time + added) * 1e3:.2f}", "",
                 f"{1 + added / run_time:.4f}x", "", "",
                 f"TACA step {taca_call * 1e3:+.2f} ms per call (incl. one run's setup: an upper bound); {note}; "
                 f"baseline run {run_time * 1e3:.0f} ms"))


def bench_sampling(nodes, rounds: int, steps: int = 30, call_rounds: int = 15, passthrough_calls: int = 20000) -> None:
    """Whole 30-step runs, measured directly, and composed from per-call costs.

    A whole run takes seconds, and this kind of machine drifts by several percent over seconds, so the direct
    paired ratio of whole runs cannot resolve 1%.  One model call takes ~0.1 s; its paired difference to the
    unpatched model, measured in a TACA step and in a non-TACA step over many interleaved rounds, composes the
    run: (taca_steps * d_taca + other_steps * d_other) / unpatched run time.  Each one-call measurement is a
    one-step run, so its difference also holds the per-run cost once: the composition counts that per step,
    an upper bound.
    """
    from devtools.sampling import ksample

    tiny = bench_model()
    lora = bench_lora_file(tiny)
    exact = patched(nodes, tiny.patcher)
    variants = {
        "unpatched": tiny.patcher,
        "exact": exact,
        "selective": patched(nodes, tiny.patcher, "selective"),
        "flex": patched(nodes, tiny.patcher, "flex"),
        "exact + LoRA taca_steps": with_lora(nodes, exact, lora, "taca_steps"),
        "exact + LoRA all_steps": with_lora(nodes, exact, lora, "all_steps"),
    }
    h, w = tm.BENCH_LATENT[tiny.kind]
    fns = {name: (lambda m=m: ksample(m, tiny, steps=steps, cfg=1.0, height=h, width=w)) for name, m in variants.items()}
    runs = interleaved(fns, rounds)
    taca_steps = taca_step_count(tiny.patcher, steps)
    case = f"small FLUX-like model, {steps} steps euler/simple, threshold {THRESHOLD} ({taca_steps} TACA steps)"
    report("sampling", case + ", whole runs", runs, "unpatched")

    call_rounds = max(call_rounds, 2 * rounds)
    passthrough = {name: wrapper_passthrough_seconds(m, passthrough_calls) for name, m in variants.items()}
    deltas = {sigma: per_call_deltas(variants, tiny, sigma, call_rounds) for sigma in (1.0, 0.5)}
    run_time = statistics.median(runs[0]["unpatched"])
    for name in deltas[1.0]:
        if name in WORKS_EVERY_STEP:  # the LoRA acts in every step: its other steps are measured whole
            other = deltas[0.5][name]
            note = f"other steps {other * 1e3:+.2f} ms per call (measured whole)"
        else:  # only the wrappers run in the other steps: their pass-through cost, measured alone
            other = passthrough[name] - passthrough["unpatched"]
            note = (f"other steps {other * 1e6:+.1f} us per call (the APPLY_MODEL wrappers passing through; "
                    f"measured whole: {deltas[0.5][name] * 1e3:+.2f} ms, within noise)")
        composed_row("sampling", case, name, run_time, steps, taca_steps, deltas[1.0][name], other,
                     f"paired medians of {call_rounds} rounds; {note}")


def wrapper_passthrough_seconds(patcher, calls: int = 20000) -> float:
    """Seconds per model call that the patcher's APPLY_MODEL wrappers cost in a step where they only pass
    through (sigma below every threshold), with a model that does nothing.  On a step that short, noise is
    microseconds instead of milliseconds."""
    from comfy.patcher_extension import WrappersMP

    wrappers = [w for ws in patcher.wrappers.get(WrappersMP.APPLY_MODEL, {}).values() for w in ws]

    class Executor:
        """What ComfyUI hands a wrapper: the next step, and the base model as ``class_obj``."""

        class_obj = patcher.model

        def __init__(self, step):
            self.step = step

        def __call__(self, *args, **kwargs):
            return self.step(*args, **kwargs)

    def chain(i):
        if i == len(wrappers):
            return Executor(lambda x, t, c_concat, c_crossattn, control, options, **kw: x)
        nxt = chain(i + 1)
        return Executor(lambda x, t, c_concat, c_crossattn, control, options, **kw: wrappers[i](
            nxt, x, t, c_concat, c_crossattn, control, options, **kw))

    call = chain(0)
    x, t = torch.zeros(1, 1), torch.tensor([0.01])
    options = dict(patcher.model_options.get("transformer_options", {}))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls // 5):
            call(x, t, None, None, None, options)
        best = min(best, (time.perf_counter() - start) / (calls // 5))
    return best


def bench_lora(nodes, rounds: int) -> None:
    tiny = bench_model()
    lora = bench_lora_file(tiny)
    exact = patched(nodes, tiny.patcher)
    taca_lora = with_lora(nodes, exact, lora, "taca_steps")
    for sigma, label in ((1.0, "TACA step (sigma 1.0)"), (0.5, "non-TACA step (sigma 0.5)")):
        times = interleaved({"TACA exact": one_call(exact, tiny, sigma),
                             "TACA exact + LoRA taca_steps": one_call(taca_lora, tiny, sigma),
                             "unpatched": one_call(tiny.patcher, tiny, sigma)}, rounds, inner=2)
        report("lora", f"one model call, {label}, rank-64 attention LoRA", times, "TACA exact")


# ---------------------------------------------------------------- syncs

def bench_syncs(nodes) -> None:
    """Host reads per model call (slope over 2- and 6-step runs, cond+uncond batched) and per run."""
    from devtools.sampling import ksample

    tiny = tm.build("flux")
    name = bench_lora_file(tiny)
    for threshold, label in ((0.0, "every step a TACA step"), (0.999, "TACA only on step 0")):
        exact = nodes["TACAPatchModel"].execute(model=tiny.patcher, gamma=1.2, threshold_sigma=threshold,
                                                mode="exact").result[0]
        models = {"unpatched": tiny.patcher, "exact": exact,
                  "exact + LoRA taca_steps": with_lora(nodes, exact, name, "taca_steps")}
        reads = {}
        for variant, model in models.items():
            for steps in (2, 6):
                ksample(model, tiny, steps=steps)
                with HostReadCounter() as counter:
                    ksample(model, tiny, steps=steps)
                reads[variant, steps] = counter.reads
        for variant in models:
            per_call = (reads[variant, 6] - reads[variant, 2]) / 4
            base_call = (reads["unpatched", 6] - reads["unpatched", 2]) / 4
            per_run = reads[variant, 2] - 2 * per_call
            base_run = reads["unpatched", 2] - 2 * base_call
            ROWS.append(("syncs", f"tiny FLUX, {label}", variant, f"{per_call:g} per call, {per_run:g} per run", "",
                         f"{per_call - base_call:+g} per call", "", f"{per_run - base_run:+g} per run",
                         "tensor->host reads (each a sync on a GPU); the per-run read is the schedule, after sampling"))


# ---------------------------------------------------------------- compile

def bench_compile(nodes, rounds: int, steps: int = 30, call_rounds: int = 15, passthrough_calls: int = 20000) -> None:
    """Whole sampling with ComfyUI's TorchCompileModel (inductor) on the unpatched and the patched model."""
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    from devtools.sampling import ksample

    tiny = bench_model()
    h, w = tm.BENCH_LATENT[tiny.kind]
    variants = {"compiled unpatched": TorchCompileModel.execute(model=tiny.patcher, backend="inductor").result[0],
                "compiled exact": TorchCompileModel.execute(model=patched(nodes, tiny.patcher),
                                                            backend="inductor").result[0]}
    compile_s = {}
    for name, model in variants.items():  # compile outside the timed rounds (TACA and plain graphs)
        start = time.perf_counter()
        ksample(model, tiny, steps=steps, cfg=1.0, height=h, width=w)
        compile_s[name] = time.perf_counter() - start
    fns = {name: (lambda m=m: ksample(m, tiny, steps=steps, cfg=1.0, height=h, width=w)) for name, m in variants.items()}
    case = f"small FLUX-like model, {steps} steps, TorchCompileModel inductor"
    runs = interleaved(fns, rounds)
    report("compile", case + ", whole runs", runs, "compiled unpatched",
           "first run incl. compile: " + ", ".join(f"{k} {v:.0f}s" for k, v in compile_s.items()))

    # Composed as in the sampling section: the TACA-step cost per compiled model call, plus the TACA wrapper's
    # pass-through (measured on the eager patched model: the compile wrapper would try to compile a no-op).
    taca_call = per_call_deltas(variants, tiny, 1.0, max(call_rounds, 2 * rounds))["compiled exact"]
    other = (wrapper_passthrough_seconds(patched(nodes, tiny.patcher), passthrough_calls)
             - wrapper_passthrough_seconds(tiny.patcher, passthrough_calls))
    composed_row("compile", case, "compiled exact", statistics.median(runs[0]["compiled unpatched"]), steps,
                 taca_step_count(tiny.patcher, steps), taca_call, other, f"other steps {other * 1e6:+.1f} us per call")


# ---------------------------------------------------------------- probe

def probed(nodes, model, record="taca_steps"):
    return nodes["TACAAttentionProbe"].execute(model=model, record=record,
                                               max_rows=probe_record.DEFAULT_MAX_ROWS).result[0]


def probe_attention_variants(backend, q, k, v, heads, skip_reshape, span) -> Dict[str, Callable[[], object]]:
    """One joint attention call, plain and recorded by the probe (alone, with its first-step map, and beside TACA)."""
    side = int(round((span.length - span.text_tokens) ** 0.5))

    def call(with_map: bool = False, taca: bool = False, max_rows: int = probe_record.DEFAULT_MAX_ROWS):
        def run():  # one recorded model call: its sink and override, as the model call wrapper makes them
            sink = probe_record.ProbeCall(0, 1.0, (0,), (1, 16, side, side), max_rows, with_map)
            override = taca_override(TacaSettings(1.2, 0.97, "exact") if taca else None, span, sink)
            return backend(q, k, v, heads, skip_reshape=skip_reshape,
                           transformer_options={"optimized_attention_override": override})
        return run

    def exact():
        override = taca_override(TacaSettings(1.2, 0.97, "exact"), span)
        return backend(q, k, v, heads, skip_reshape=skip_reshape,
                       transformer_options={"optimized_attention_override": override})

    return {"plain": lambda: backend(q, k, v, heads, skip_reshape=skip_reshape, transformer_options={}),
            "probe": call(),
            "probe, first step (with map)": call(with_map=True),
            "probe, max_rows 256": call(max_rows=256),
            "exact": exact,
            "exact + probe": call(taca=True)}


def bench_probe(nodes, rounds: int, call_rounds: int = 15, passthrough_calls: int = 20000) -> None:
    """What the TACA Attention Probe costs: one joint attention call at a FLUX-like shape recorded, one model call
    of the bench model recorded, and its wrappers on a call it does not record; nothing when it is not attached."""
    backend = comfy_attention.optimized_attention
    heads, dim, text, image = 24, 128, 512, 1024
    q, k, v = attention_inputs(heads, dim, text, image, torch.float32, True)
    span = JointLayout.text_first(text, text + image)
    case = f"FLUX-like {heads}x{dim} text {text} image {image} float32, one joint attention call"
    report("probe", case, interleaved(probe_attention_variants(backend, q, k, v, heads, True, span), rounds, inner=2),
           "plain", "probe: the text share at gamma 1 and TACA's over 1024 evenly spaced image rows, float64")

    tiny = bench_model()
    exact = patched(nodes, tiny.patcher)
    variants = {"unpatched": tiny.patcher, "probe": probed(nodes, tiny.patcher), "exact": exact,
                "exact + probe": probed(nodes, exact)}
    deltas = per_call_deltas(variants, tiny, 1.0, max(call_rounds, 2 * rounds))
    unpatched_call = one_call(tiny.patcher, tiny, 1.0)
    run = float("inf")
    for _ in range(max(3, rounds)):
        start = time.perf_counter()
        unpatched_call()
        run = min(run, time.perf_counter() - start)
    for name, delta in deltas.items():
        ROWS.append(("probe", "small FLUX-like model, one model call in a recorded step (sigma 1.0)", name,
                     f"{(run + delta) * 1e3:.2f}", "", f"{1 + delta / run:.3f}x", "", "",
                     f"paired median difference to unpatched {delta * 1e3:+.2f} ms; each one-step run is a first "
                     "recorded step, so the map is measured too"))
    passthrough = {name: wrapper_passthrough_seconds(m, passthrough_calls) for name, m in variants.items()}
    from comfy.patcher_extension import WrappersMP

    for name in ("exact", "probe", "exact + probe"):
        keys = sorted(variants[name].wrappers.get(WrappersMP.APPLY_MODEL, {}))
        ROWS.append(("probe", "APPLY_MODEL wrappers on a call the probe does not record (taca_steps, sigma 0.01)", name,
                     "", "", "", "", "", f"{(passthrough[name] - passthrough['unpatched']) * 1e6:+.1f} us per model "
                     f"call over unpatched; wrappers: {', '.join(keys) or 'none'}"))


# ---------------------------------------------------------------- share

# (label, heads, head dim, text tokens, image tokens, dtype, on a CPU only when --cases names it)
SHARE_CASES = [
    ("FLUX-like", 24, 128, 512, 1024, torch.float32, False),
    ("FLUX-like", 24, 128, 512, 1024, torch.bfloat16, False),
    ("FLUX-like", 24, 128, 512, 4096, torch.float32, True),
]


def share_variants(backend, q, k, v, heads, span, gamma: float = 1.2,
                   record_rows: int = 1024) -> Tuple[Dict[str, Callable[[], object]], Dict[str, Callable[[], object]]]:
    """({plain, plain + recorded probe}, {exact, adaptive per row count}) on one joint call in FLUX's layout.

    The recorded probe is what the TACA Attention Probe adds to a call: ``ShareProbe.measure`` over ``record_rows``
    image rows and the shares at gamma 1 and TACA's.  The adaptive call measures, searches [1, gamma] for the
    gamma whose share is halfway between the shares at 1 and at gamma (a crossing to find, the search's
    usual case) and runs eq. 10 at it; exact runs eq. 10 at gamma, both through ``exact_attention_parts``
    with the caller's K borrowed, as the patch does for a model's own K.
    """
    def plain():
        return backend(q, k, v, heads, skip_reshape=True)

    def recorded():
        out = plain()
        taca_probe.ShareProbe.measure(q, k, span, None, None, record_rows).mean_share([1.0, gamma])
        return out

    def attend(q_, k_, v_, mask):
        return backend(q_, k_, v_, heads, mask=mask, skip_reshape=True, skip_output_reshape=True)

    def exact(at: float = gamma):
        policy = taca_attention.KeyPolicy.BORROWED
        inputs = taca_attention.AttentionInputs(attend, q, k, v, None, span, at, 2, policy)
        return assemble_heads_as_tokens(taca_attention.exact_attention_parts(inputs), span.length)

    def adaptive(rows: int):
        ends = taca_probe.ShareProbe.measure(q, k, span, None, None, rows).mean_share([1.0, gamma])
        target = float(ends.mean())

        def run():
            probe = taca_probe.ShareProbe.measure(q, k, span, None, None, rows)
            return exact(taca_probe.search_gamma(probe, target, gamma).gamma)
        return run

    adaptive_rows = sorted({getattr(taca_probe, "ADAPTIVE_ROWS", 1024), 1024})
    return ({"plain": plain, f"plain + probe ({record_rows} rows)": recorded},
            dict({"exact": exact}, **{f"adaptive ({rows} rows)": adaptive(rows) for rows in adaptive_rows}))


def bench_share(rounds: int, only: str = "") -> None:
    """The share probe's cost per joint call, on ComfyUI's selected attention and on PyTorch SDPA; targets: a
    recorded call at most 1.3x plain, an adaptive one at most 1.2x exact."""
    backends = [("comfy:" + comfy_attention.optimized_attention.__name__, comfy_attention.optimized_attention)]
    if comfy_attention.optimized_attention is not comfy_attention.attention_pytorch:
        backends.append(("pytorch-sdpa", comfy_attention.attention_pytorch))
    for label, heads, dim, text, image, dtype, opt_in in SHARE_CASES:
        q, k, v = attention_inputs(heads, dim, text, image, dtype, True)
        span = JointLayout.text_first(text, text + image)
        for backend_name, backend in backends:
            case = f"{label} {heads}x{dim} text {text} image {image} {str(dtype)[6:]} [{backend_name}]"
            if (only and only not in case) or (opt_in and DEVICE.type == "cpu" and not only):
                continue
            recorded, adaptive = share_variants(backend, q, k, v, heads, span)
            inner = 1 if image > 2048 and DEVICE.type == "cpu" else 2
            report("share", case, interleaved(recorded, rounds, inner), "plain",
                   "probe: shares at gamma 1 and 1.2; target at most 1.3x")
            report("share", case, interleaved(adaptive, rounds, inner), "exact",
                   f"gamma searched in [1, 1.2]; ADAPTIVE_ROWS {getattr(taca_probe, 'ADAPTIVE_ROWS', None)}; "
                   "target at most 1.2x")


# ---------------------------------------------------------------- main

def runtime_line() -> str:
    """Which ComfyUI, attention backend, device and model patcher the numbers come from."""
    import comfy.model_management
    import comfy.model_patcher
    import comfyui_version

    attention = comfy_attention.optimized_attention.__name__
    patcher = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher).__name__
    return (f"ComfyUI {comfyui_version.__version__} ({comfy_runtime.COMFYUI}), attention {attention}, "
            f"ComfyUI device {comfy.model_management.get_torch_device()}, model patcher {patcher}")


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="attention,memory,sampling,lora,syncs,compile,probe,share")
    parser.add_argument("--repeats", type=int, default=7, help="rounds per measurement")
    parser.add_argument("--cases", default="", help="only the attention cases whose label contains this text")
    parser.add_argument("--smoke", action="store_true",
                        help="every section at its smallest, to check that it runs (one round, 3 sampling steps)")
    args = parser.parse_args(argv or None)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    rounds = 1 if args.smoke else args.repeats
    whole_rounds = 1 if args.smoke else max(3, args.repeats // 2)  # whole runs take seconds each
    steps, call_rounds, passthrough_calls = (3, 1, 200) if args.smoke else (30, 15, 20000)
    torch.manual_seed(0)
    nodes = comfy_runtime.load_pack()
    print(f"# comfyui-taca benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, device {DEVICE}"
          + (f" ({torch.cuda.get_device_name()})" if DEVICE.type == "cuda" else "")
          + f", torch threads {torch.get_num_threads()}, rounds {rounds}" + (", SMOKE RUN" if args.smoke else ""))
    print(f"# {runtime_line()}")
    runs = {
        "attention": lambda: bench_attention(rounds, args.cases),
        "memory": bench_memory,
        "sampling": lambda: bench_sampling(nodes, whole_rounds, steps, call_rounds, passthrough_calls),
        "lora": lambda: bench_lora(nodes, rounds),
        "syncs": lambda: bench_syncs(nodes),
        "compile": lambda: bench_compile(nodes, whole_rounds, steps, call_rounds, passthrough_calls),
        "probe": lambda: bench_probe(nodes, rounds, call_rounds, passthrough_calls),
        "share": lambda: bench_share(rounds, args.cases),
    }
    with torch.inference_mode(False), torch.no_grad():
        for section in sections:
            start = time.perf_counter()
            try:
                runs[section]()
            except Exception as err:  # keep the other sections' results
                ROWS.append((section, "FAILED", type(err).__name__, str(err)[:200], "", "", "", "", ""))
            print(f"# section {section}: {time.perf_counter() - start:.0f}s", flush=True)
    print_table()


if __name__ == "__main__":
    main(sys.argv[1:])
