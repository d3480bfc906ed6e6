"""TACA cost against plain attention: one process, variants interleaved, paired ratios.

    .runtime/venv/bin/python bench/benchmark.py                 # every section
    .runtime/venv/bin/python bench/benchmark.py --sections sampling,lora --repeats 5

Sections
  attention  one attention call at FLUX-like and SD3-like shapes, fp32 / bf16, with and without a mask:
             plain (ComfyUI's selected backend, and PyTorch SDPA) against exact, selective, flex
  memory     peak memory of one call over plain attention, in units of one K tensor
  sampling   whole 30-step sampling of a small FLUX-like model through ComfyUI's sampler
  lora       one model call with the TACA LoRA, in a TACA step and in a non-TACA step
  syncs      host reads (host-device synchronisations on a GPU) per model call
  compile    the patched model under ComfyUI's TorchCompileModel (inductor)

Each variant is timed once per round, rounds rotate the order so machine noise hits all alike;
ratios are taken within a round (paired) and summarised by their median and min-max.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import weakref
from typing import Callable, Dict, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from devtools import comfy_runtime  # noqa: E402

sys.path.pop(0)
comfy_runtime.activate(cpu=True)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import comfy.ldm.modules.attention as comfy_attention  # noqa: E402

from devtools import tiny_models as tm  # noqa: E402
from devtools.host_reads import HostReadCounter  # noqa: E402
from taca.attention import TextSpan  # noqa: E402
from taca.patch import TacaAttentionOverride, TacaSettings  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROWS: List[Tuple[str, ...]] = []


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def interleaved(variants: Dict[str, Callable[[], object]], rounds: int, inner: int = 1) -> Dict[str, List[float]]:
    """Seconds per call of each variant, one sample per round, variant order rotated every round."""
    names = list(variants)
    for fn in variants.values():  # warm-up
        fn()
    sync()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync()
            start = time.perf_counter()
            for _ in range(inner):
                variants[name]()
            sync()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def report(section: str, case: str, times: Dict[str, List[float]], baseline: str, note: str = "") -> None:
    """Paired ratio per round (median, min-max) and best-over-best: the fastest round of the variant over the
    fastest of the baseline, which background load that slows some rounds cannot inflate."""
    base = times[baseline]
    for name, samples in times.items():
        ratios = [t / b for t, b in zip(samples, base)]
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


def attention_variants(backend, q, k, v, heads, mask, skip_reshape, span) -> Dict[str, Callable[[], object]]:
    def call(mode):
        override = None if mode is None else TacaAttentionOverride(TacaSettings(1.2, 0.97, mode), [span], None)
        options = {} if override is None else {"optimized_attention_override": override}
        return lambda: backend(q, k, v, heads, mask=mask, skip_reshape=skip_reshape, transformer_options=options)

    return {"plain": call(None), "exact": call("exact"), "selective": call("selective"), "flex": call("flex")}


# (label, heads, head dim, text tokens, image tokens or None for the default, dtype, mask, modes, backends)
ATTENTION_CASES = [
    ("FLUX-like", 24, 128, 512, None, torch.float32, False, ("exact", "selective", "flex"), ("pytorch", "comfy")),
    ("FLUX-like", 24, 128, 512, None, torch.float32, True, ("exact", "selective", "flex"), ("pytorch",)),
    ("FLUX-like", 24, 128, 512, None, torch.bfloat16, False, ("exact", "selective", "flex"), ("pytorch",)),
    ("FLUX-like", 24, 128, 512, None, torch.bfloat16, True, ("exact", "selective"), ("pytorch",)),
    ("FLUX-like", 24, 128, 512, 4096, torch.float32, False, ("exact", "selective"), ("pytorch",)),
    ("SD3-like", 24, 64, 154, None, torch.float32, False, ("exact", "selective", "flex"), ("pytorch",)),
    ("SD3-like", 24, 64, 154, None, torch.float32, True, ("exact", "selective"), ("pytorch",)),
    ("SD3-like", 24, 64, 154, None, torch.bfloat16, False, ("exact", "selective"), ("pytorch",)),
]


def bench_attention(rounds: int) -> None:
    default_image = 4096 if DEVICE.type == "cuda" else 1024
    backends = {"pytorch": ("pytorch-sdpa", comfy_attention.attention_pytorch),
                "comfy": ("comfy:" + comfy_attention.optimized_attention.__name__, comfy_attention.optimized_attention)}
    for label, heads, dim, text, image, dtype, with_mask, modes, backend_keys in ATTENTION_CASES:
        image = image or default_image
        skip_reshape = label.startswith("FLUX")  # FLUX passes (B, H, N, D); SD3 passes (B, N, H*D)
        q, k, v = attention_inputs(heads, dim, text, image, dtype, skip_reshape)
        n = text + image
        mask = None
        if with_mask:  # an additive key-padding style mask, as a padded-text model would use
            mask = torch.zeros(1, 1, n, n, device=DEVICE, dtype=dtype)
            mask[..., text - 16:text] = -10000.0
        span = TextSpan.text_first(text, n)
        for key in backend_keys:
            backend_name, backend = backends[key]
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
            case = (f"{label} {heads}x{dim} text {text} image {image} {str(dtype)[6:]}"
                    f"{' +mask' if with_mask else ''} [{backend_name}]")
            inner = 1 if n > 3000 else 2
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
        span = TextSpan.text_first(text, text + image)
        peaks = {}
        variants = attention_variants(comfy_attention.attention_pytorch, q, k, v, heads, None, True, span)
        variants.pop("flex")  # a compiled higher-order op: invisible to dispatch-level tracking
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


def patched(nodes, model, mode="exact"):
    return nodes["TACAPatchModel"].execute(model=model, gamma=1.2, threshold_sigma=0.97, mode=mode).result[0]


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


def bench_sampling(nodes, rounds: int, steps: int = 30) -> None:
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
    times = interleaved(fns, rounds)
    report("sampling", f"small FLUX-like model, {steps} steps euler/simple, threshold 0.97 (3 TACA steps)", times,
           "unpatched")


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

def bench_compile(nodes, rounds: int, steps: int = 30) -> None:
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
    report("compile", f"small FLUX-like model, {steps} steps, TorchCompileModel inductor", interleaved(fns, rounds),
           "compiled unpatched", "first run incl. compile: " + ", ".join(f"{k} {v:.0f}s" for k, v in compile_s.items()))


# ---------------------------------------------------------------- main

def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="attention,memory,sampling,lora,syncs,compile")
    parser.add_argument("--repeats", type=int, default=7, help="rounds per measurement")
    args = parser.parse_args(argv or None)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    torch.manual_seed(0)
    nodes = comfy_runtime.load_pack()
    print(f"# comfyui-taca benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, device {DEVICE}"
          + (f" ({torch.cuda.get_device_name()})" if DEVICE.type == "cuda" else "")
          + f", torch threads {torch.get_num_threads()}, rounds {args.repeats}")
    runs = {
        "attention": lambda: bench_attention(args.repeats),
        "memory": bench_memory,
        "sampling": lambda: bench_sampling(nodes, max(3, args.repeats // 2)),
        "lora": lambda: bench_lora(nodes, args.repeats),
        "syncs": lambda: bench_syncs(nodes),
        "compile": lambda: bench_compile(nodes, max(3, args.repeats // 2)),
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
