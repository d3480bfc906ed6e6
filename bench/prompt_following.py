"""What TACA does to prompt following, measured as the paper measures it (T2I-CompBench's categories), on the
compositional world's trained model (``devtools/world_model.py``) and its held-out prompts.

    TACA_COMFYUI_VERSION=0.33.0 .runtime/comfyui-0.33.0/venv/bin/python bench/prompt_following.py
    ... bench/prompt_following.py --modes exact --thresholds 0.97 --resolutions 256   # the gamma sweep only
    ... bench/prompt_following.py --report-only     # the table and plot from the samples so far

Every image goes through ComfyUI itself: the stock checkpoint loader, CLIP Text Encode, Empty SD3 Latent Image,
TACA Patch Model, TACA LoRA Loader, KSampler and VAE Decode, called in this process. With a TACA LoRA (by default
the one ``devtools/train_world_model.py lora`` wrote) two cells more, as the paper's Table 4: the LoRA alone and
TACA + LoRA. Each cell (plain, or one TACA setting at one
resolution) samples the same (prompt, seed) pairs, so every TACA cell is paired with the plain cell of its
resolution; the checker (``taca_eval.checker``) scores each image. One TACA Attention Probe run per cell and
category gives the image-to-text attention share beside the scores.

Samples are appended to ``samples.jsonl`` as they are made: a stopped run resumes where it was, and
``table.md`` / ``scores.png`` are rewritten from everything measured so far after each cell. ``sheets/``
holds each cell's first batch of images per category, to look at.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.append(REPO)  # last: ComfyUI's own `nodes` must win over the pack's `nodes/` once ComfyUI is activated
from devtools import comfy_runtime  # noqa: E402
DEFAULT_OUT = os.path.join(HERE, "prompt_following")
GAMMAS = (1.15, 1.2, 1.25, 1.3)
THRESHOLDS = (0.97, 0.9, 0.8)  # the default (the paper's t = 970) and two later ends of the window
MODES = ("exact", "selective")


class Cell(NamedTuple):
    resolution: int
    gamma: float  # 1.0 = plain
    threshold: float
    mode: str
    lora: bool = False  # the TACA LoRA (TACA LoRA Loader, active on TACA's steps), as the paper's Table 4

    @property
    def key(self) -> str:
        base = (f"{self.resolution}px plain" if self.gamma == 1.0
                else f"{self.resolution}px gamma {self.gamma:g} thr {self.threshold:g} {self.mode}")
        return base + " + LoRA" if self.lora else base


def plan(resolutions: Iterable[int], gammas: Sequence[float], thresholds: Sequence[float],
         modes: Sequence[str], lora: bool = False) -> List[Cell]:
    """The cells in the order they are run, most telling first: at each resolution plain, the gammas at the
    first threshold in the first mode (with ``lora``, after gamma 1.2: the LoRA alone and TACA + LoRA), then
    in the other modes, then the other thresholds at gamma 1.2 (or the first gamma)."""
    cells: List[Cell] = []
    central = 1.2 if 1.2 in gammas or not gammas else gammas[0]
    for res in resolutions:
        cells.append(Cell(res, 1.0, 0.0, "plain"))
        for mode in modes:
            for gamma in sorted(gammas, key=lambda g: (g != central, g)):
                cells.append(Cell(res, gamma, thresholds[0], mode))
                if lora and gamma == central and mode == modes[0]:
                    cells += [Cell(res, 1.0, 0.0, "plain", True), Cell(res, gamma, thresholds[0], mode, True)]
        for mode in modes if gammas else ():
            for thr in thresholds[1:]:
                cells.append(Cell(res, central, thr, mode))
    return cells


class Engine:
    """The trained model loaded through ComfyUI's stock nodes, and the pack's nodes, in this process."""

    def __init__(self, models_dir: str, lora: Optional[str] = None):
        import torch

        comfy_runtime.activate(cpu=True)
        self.pack = comfy_runtime.load_pack()
        import comfy.utils
        import nodes

        from devtools import world_model

        self.nodes = nodes
        comfy.utils.PROGRESS_BAR_ENABLED = False
        self.model, self.clip, self.vae = world_model.load(models_dir)
        self.lora = None
        if lora:
            import folder_paths

            folder_paths.add_model_folder_path("loras", os.path.dirname(os.path.abspath(lora)))
            self.lora = os.path.basename(lora)
        with torch.inference_mode():
            self.negative = self.encode([""])

    def encode(self, prompts: List[str]):
        """One conditioning holding the prompts as a batch (sample i of a batch uses prompt i mod len)."""
        import torch

        conds = [self.nodes.CLIPTextEncode().encode(self.clip, p)[0][0] for p in prompts]
        cond = torch.cat([c[0] for c in conds])
        pooled = torch.cat([c[1]["pooled_output"] for c in conds])
        return [[cond, {"pooled_output": pooled}]]

    def patched(self, cell: Cell, probe: bool = False):
        model = self.model
        if cell.gamma != 1.0:
            model = self.pack["TACAPatchModel"].execute(model, cell.gamma, cell.threshold, cell.mode).result[0]
        if cell.lora:
            model = self.pack["TACALoraLoader"].execute(model, self.lora, 1.0, "taca_steps").result[0]
        if probe:
            model = self.pack["TACAAttentionProbe"].execute(model, "taca_steps", 64).result[0]
        return model

    def sample(self, model, prompts: List[str], seeds: int, seed: int, resolution: int, steps: int, cfg: float):
        """uint8 images [len(prompts) * seeds, H, W, 3]: image i is prompt i mod len(prompts), seed i // len."""
        import torch
        from comfy_extras.nodes_sd3 import EmptySD3LatentImage

        with torch.inference_mode():  # as ComfyUI's executor runs nodes
            empty = EmptySD3LatentImage.execute(resolution, resolution, len(prompts) * seeds).result[0]
            out = self.nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", self.encode(prompts),
                                             self.negative, empty)[0]
            images = self.nodes.VAEDecode().decode(self.vae, out)[0]
        return (images.clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def read_rows(path: str) -> List[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run(args) -> None:
    from taca_eval import checker, world

    os.makedirs(args.out, exist_ok=True)
    samples_path = os.path.join(args.out, "samples.jsonl")
    done = {(r["cell"], r["category"], r["prompt"], r["seed"]) for r in read_rows(samples_path)}
    engine = Engine(args.models, args.lora)
    scenes = {c: [world.make_scene(c, i, args.split) for i in range(args.prompts)] for c in args.categories}
    cells = plan(args.resolutions, args.gammas, args.thresholds, args.modes, bool(args.lora))
    for cell in cells:
        t0, made = time.time(), 0
        model = engine.patched(cell)
        for category in args.categories:
            for start in range(0, args.prompts, args.batch_prompts):
                group = list(range(start, min(start + args.batch_prompts, args.prompts)))
                todo = [(cell.key, category, i, s) for s in range(args.seeds) for i in group]
                if all(k in done for k in todo):
                    continue
                prompts = [scenes[category][i].prompt for i in group]
                images = engine.sample(model, prompts, args.seeds, args.seed + start,
                                       cell.resolution, args.steps, args.cfg)
                if start == 0:
                    save_sheet(images, len(group), os.path.join(args.out, "sheets", f"{cell.key} {category}.png"))
                with open(samples_path, "a") as f:
                    for n, image in enumerate(images):
                        i, s = group[n % len(group)], n // len(group)
                        result = checker.score_all(scenes[category][i], image)
                        row = {"cell": cell.key, "resolution": cell.resolution, "gamma": cell.gamma,
                               "threshold": cell.threshold, "mode": cell.mode, "lora": cell.lora,
                               "category": category, "prompt": i, "seed": s,
                               "objects": len(scenes[category][i].objects), "score": result["score"],
                               "saw": result["seen"]}
                        f.write(json.dumps(row) + "\n")
                        done.add((cell.key, category, i, s))
                        made += 1
        probe_cell(engine, cell, scenes, args)
        if made:
            print(f"[bench] {cell.key}: {made} images in {time.time() - t0:.0f} s", flush=True)
            report(args.out)


def save_sheet(images: np.ndarray, columns: int, path: str, side: int = 128) -> None:
    """The first batch of a cell and category as one picture: a column per prompt, a row per seed (the
    sheets of two cells line up pair by pair)."""
    from PIL import Image

    rows = len(images) // columns
    sheet = Image.new("RGB", (columns * side, rows * side), "white")
    for n, image in enumerate(images):
        sheet.paste(Image.fromarray(image).resize((side, side)), ((n % columns) * side, (n // columns) * side))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sheet.save(path)


def probe_cell(engine: Engine, cell: Cell, scenes, args) -> None:
    """The image-to-text share of one probed run per category (its first prompts, one seed)."""
    from devtools import demo

    path = os.path.join(args.out, "probe.jsonl")
    if any(r["cell"] == cell.key for r in read_rows(path)):
        return
    hooks = comfy_runtime.pack_module("taca.hooks")
    rows = []
    for category in args.categories:
        prompts = [s.prompt for s in scenes[category][:args.batch_prompts]]
        model = engine.patched(cell, probe=True)
        engine.sample(model, prompts, 1, args.seed, cell.resolution, args.steps, args.cfg)
        data = hooks.last_probe_run(model).as_json()
        plain, taca = demo.mean_shares(data)
        rows.append({"cell": cell.key, "category": category, "share_plain": plain, "share_taca": taca,
                     "steps": len(data["steps"])})
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def report(out: str) -> str:
    """Rewrite table.md and scores.png from samples.jsonl and probe.jsonl; returns the table."""
    from taca_eval import stats, world

    rows = read_rows(os.path.join(out, "samples.jsonl"))
    shares = {(r["cell"], r["category"]): r for r in read_rows(os.path.join(out, "probe.jsonl"))}
    by_cell: Dict[str, Dict[str, List[dict]]] = {}
    meta: Dict[str, dict] = {}
    for r in rows:
        by_cell.setdefault(r["cell"], {}).setdefault(r["category"], []).append(r)
        meta[r["cell"]] = r
    categories = [c for c in world.CATEGORIES if any(c in v for v in by_cell.values())]
    lines = ["| cell | " + " | ".join(categories) + " |", "|---|" + "---|" * len(categories)]
    estimates = {}
    for key, per_category in by_cell.items():
        m = meta[key]
        plain_key = f"{m['resolution']}px plain"
        cells = []
        for c in categories:
            values = stats.summarize(per_category.get(c, []))
            est = stats.cluster_mean(values)
            text = f"{est.text()} (n={est.n})"
            if key != plain_key and c in by_cell.get(plain_key, {}):
                diff = stats.paired_difference(values, stats.summarize(by_cell[plain_key][c]))
                estimates[(key, c)] = (est, diff)
                text += f"<br>diff {diff.text(signed=True)}"
            else:
                estimates[(key, c)] = (est, None)
            share = shares.get((key, c))
            if share:  # the image-to-text attention share in the steps TACA acts on (plain: gamma 1)
                text += f"<br>share {share['share_plain' if m['gamma'] == 1.0 else 'share_taca']:.3f}"
            cells.append(text)
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n" + _breakdown(by_cell)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    _plot(out, by_cell, meta, categories, estimates)
    return table


def _breakdown(by_cell) -> str:
    """The plain model per category and number of objects in the scene (single-object colour and shape are
    what it must get right first)."""
    from taca_eval import stats

    lines = ["", "| plain model | objects | score |", "|---|---|---|"]
    for key in sorted(k for k in by_cell if k.endswith("plain")):
        for category, rows in by_cell[key].items():
            for n in sorted({r.get("objects", 0) for r in rows}):
                est = stats.cluster_mean(stats.summarize([r for r in rows if r.get("objects", 0) == n]))
                lines.append(f"| {key} {category} | {n} | {est.text()} (n={est.n}) |")
    return "\n".join(lines) + "\n"


def _plot(out, by_cell, meta, categories, estimates) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(categories), figsize=(3.2 * len(categories), 3.0), dpi=100, squeeze=False)
    for ax, c in zip(axes[0], categories):
        for (res, mode, thr, lora), style in _series(meta):
            def in_series(m):  # a TACA cell of this series, or the plain cell (with or without the LoRA) it starts at
                return (m["resolution"] == res and m.get("lora", False) == lora
                        and (m["gamma"] == 1.0 or (m["mode"] == mode and m["threshold"] == thr)))

            points = sorted((meta[k]["gamma"], estimates[(k, c)][0]) for k in by_cell
                            if (k, c) in estimates and in_series(meta[k]))
            if len(points) < 2:
                continue
            xs = [p[0] for p in points]
            ys = [p[1].mean for p in points]
            err = [[p[1].mean - p[1].low for p in points], [p[1].high - p[1].mean for p in points]]
            label = f"{res}px {mode} thr {thr:g}" + (" + LoRA" if lora else "")
            ax.errorbar(xs, ys, yerr=err, label=label, capsize=2, **style)
        ax.set_title(c)
        ax.set_xlabel("gamma (1 = plain)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score (95% interval)")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "scores.png"))
    plt.close(fig)


def _series(meta):
    seen = sorted({(m["resolution"], m["mode"], m["threshold"], m.get("lora", False)) for m in meta.values()
                   if m["gamma"] != 1.0})
    styles = ["-o", "--s", ":^", "-.v", "-d", "--x"]
    return [(s, {"fmt": styles[i % len(styles)]}) for i, s in enumerate(seen)]


def main(argv: Optional[List[str]] = None) -> int:
    from devtools import world_model
    from taca_eval import world

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--models", default=os.path.join(comfy_runtime.RUNTIME_HOME, "world_models"),
                        help="where the full checkpoint (with its text encoder) is assembled")
    floats = lambda s: [float(v) for v in s.split(",") if v]  # noqa: E731
    parser.add_argument("--gammas", type=floats, default=list(GAMMAS), help='"" for the plain model alone')
    parser.add_argument("--thresholds", type=floats, default=list(THRESHOLDS),
                        help="threshold_sigma values; the first is used for the gamma sweep")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    parser.add_argument("--resolutions", type=lambda s: [int(v) for v in s.split(",")],
                        default=list(world_model.RESOLUTIONS))
    parser.add_argument("--categories", type=lambda s: s.split(","), default=list(world.CATEGORIES))
    parser.add_argument("--split", default="heldout", choices=("heldout", "train"))
    parser.add_argument("--prompts", type=int, default=50, help="prompts per category")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    parser.add_argument("--batch-prompts", type=int, default=10, help="prompts sampled together")
    parser.add_argument("--steps", type=int, default=20,
                        help="sampling steps (20: TACA at the default threshold acts on the first 2, the paper's first 10%%)")
    parser.add_argument("--cfg", type=float, default=4.5)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--lora", default=world_model.lora_path() if os.path.isfile(world_model.lora_path()) else "",
                        help="a TACA LoRA file: adds the cells LoRA alone and TACA + LoRA ('' for none)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.report_only:
        run(args)
    print(report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
