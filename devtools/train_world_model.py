"""Train the demo's model on the compositional world (``devtools/world_model.py`` describes it).

    python -m devtools.train_world_model all          # data, decoder, diffusion model, package (about an hour)
    python -m devtools.train_world_model dit --steps 4000

Stages (each resumes from its last saved state under ``--work``, so a stopped run goes on where it was):

* ``data``: renders the training scenes (split "train": no held-out combination), encodes them with the VAE's
  fixed encoder, and encodes every distinct prompt (and the empty one) with ComfyUI's CLIP-L.
* ``decoder``: trains the TAESD decoder on 64 px crops (L1).
* ``dit``: trains the MMDiT with the rectified-flow objective SD3 and FLUX use (x_t = (1 - s) x0 + s e, the
  model predicts e - x0), logit-normal sigmas shifted by SD3's 3.0, 10% empty prompts for CFG, an EMA of the
  weights, several resolutions. Writes a loss log (CSV) and its curve.
* ``package``: writes the committed weights (EMA diffusion model + VAE) to ``models/checkpoints``.
* ``lora``: the paper's TACA LoRA recipe (sec. 3.3, eq. 13) on the packaged model: LoRA adapters on every
  attention projection, fine-tuned with TACA active (gamma 1.2, exact), on sigmas of TACA's window only (the
  early steps, where the LoRA acts at sampling time). The model runs through ComfyUI with the pack's own TACA
  Patch Model and LoRA code, so the LoRA is trained exactly as it is applied. Written in PEFT's format (the
  authors' releases) to ``models/loras``, where the TACA LoRA Loader reads it.

Everything is drawn from ``--seed``: the same seed and thread count give the same weights bit for bit.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from . import comfy_runtime

REPO = comfy_runtime.REPO
WORK = os.path.join(REPO, ".runtime", "world_model")
LOG_DIR = os.path.join(REPO, "bench", "world_model")
SHIFT = 3.0  # SD3's sigma shift (ComfyUI's ModelSamplingDiscreteFlow for SD3)
EMPTY_PROMPT_RATE = 0.1
EMA_DECAY = 0.999
# (resolution, batch, share of steps): about the same number of image tokens per step
RESOLUTION_MIX = ((256, 32, 0.8), (368, 16, 0.13), (512, 8, 0.07))
SCENES = {256: 20000, 368: 3000, 512: 1500}


def _paths(work: str) -> Dict[str, str]:
    return {name: os.path.join(work, f"{name}.pt") for name in ("data", "decoder", "dit", "lora")}


def _save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# data


def build_data(work: str, seed: int, scenes: Dict[int, int]) -> dict:
    from taca_eval import world

    from . import world_model as wm

    path = _paths(work)["data"]
    if os.path.isfile(path):
        data = torch.load(path)
        if data["seed"] == seed and data["scenes"] == scenes:
            return data
    t0 = time.time()
    categories = world.CATEGORIES
    by_res, prompts, index = {}, [""], {"": 0}
    weight = bias = None
    for res, count in scenes.items():
        items = [world.make_scene(categories[i % len(categories)], i // len(categories) + res * 100000, "train")
                 for i in range(count)]
        latents = []
        for start in range(0, count, 256):
            images = wm.to_tensor([world.render(s, res) for s in items[start:start + 256]])
            if weight is None:  # the encoder's projection is fitted once, on the first training renders
                weight, bias = wm.fit_projection(images)
            latents.append(wm.encode_fast(images, weight, bias).to(torch.float16))
        for s in items:
            if s.prompt not in index:
                index[s.prompt] = len(prompts)
                prompts.append(s.prompt)
        by_res[res] = {"latents": torch.cat(latents), "prompt": torch.tensor([index[s.prompt] for s in items])}
        print(f"[data] {count} scenes at {res} px ({time.time() - t0:.0f} s)", flush=True)
    clip = wm.load_text_encoder(wm.text_encoder_state(seed))
    cond, pooled = wm.encode_prompts(clip, prompts)
    print(f"[data] {len(prompts)} prompts encoded ({time.time() - t0:.0f} s)", flush=True)
    data = {"seed": seed, "scenes": scenes, "by_res": by_res, "prompts": prompts, "cond": cond.to(torch.float16),
            "pooled": pooled, "weight": weight, "bias": bias}
    os.makedirs(work, exist_ok=True)
    _save(data, path)
    return data


# ---------------------------------------------------------------------------------------------------------------
# decoder


def train_decoder(work: str, seed: int, steps: int, data: dict, batch: int = 16, crop: int = 64) -> dict:
    from taca_eval import world

    from . import world_model as wm

    path = _paths(work)["decoder"]
    torch.manual_seed(seed)
    dec = wm.decoder()
    dec.requires_grad_(True)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-3)
    step, log = 0, []
    if os.path.isfile(path):
        state = torch.load(path)
        dec.load_state_dict(state["decoder"])
        opt.load_state_dict(state["opt"])
        step, log = state["step"], state["log"]
    res = wm.IMAGE_SIZE
    t0 = time.time()
    while step < steps:
        rng = np.random.default_rng([seed, 1, step])
        images = wm.to_tensor([world.render(world.make_scene(world.CATEGORIES[int(rng.integers(4))],
                                                             int(rng.integers(1 << 30)), "train"), res)
                               for _ in range(batch // 4)])
        crops = []
        for img in images:  # four 64 px crops per image, on the 8 px latent grid
            for _ in range(4):
                y, x = (int(v) * 8 for v in rng.integers(0, (res - crop) // 8 + 1, 2))
                crops.append(img[:, y:y + crop, x:x + crop])
        target = torch.stack(crops)
        latent = wm.encode_fast(target, data["weight"], data["bias"])
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 100) * (0.1 if step >= 0.8 * steps else 1.0)
        loss = (dec(latent) - target).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        log.append((step, loss.item()))
        if step % 100 == 0 or step == steps:
            _save({"decoder": dec.state_dict(), "opt": opt.state_dict(), "step": step, "log": log}, path)
            print(f"[decoder] step {step} L1 {np.mean([v for _, v in log[-100:]]):.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    return {"decoder": dec.state_dict(), "log": log}


# ---------------------------------------------------------------------------------------------------------------
# diffusion model


def _shifted_logit_normal(batch: int, g: torch.Generator) -> torch.Tensor:
    sigma = torch.sigmoid(torch.randn(batch, generator=g))
    return SHIFT * sigma / (1 + (SHIFT - 1) * sigma)


def _batch(data: dict, rng: np.random.Generator, res: Optional[int] = None,
           draw_sigma: Callable[[int, torch.Generator], torch.Tensor] = _shifted_logit_normal):
    """(x_t, sigma, cond, pooled, target) of one training batch: at ``res`` (default: drawn from the resolution
    mix), sigmas from ``draw_sigma``, the target being the flow e - x0."""
    from . import world_model as wm

    if res is None:
        u = rng.random()
        for res, batch, share in RESOLUTION_MIX:
            if u < share:
                break
            u -= share
    else:
        batch = next(b for r, b, _ in RESOLUTION_MIX if r == res)
    part = data["by_res"][res]
    idx = rng.integers(0, len(part["prompt"]), batch)
    x0 = part["latents"][idx].float()
    prompt = part["prompt"][idx].clone()
    prompt[torch.from_numpy(rng.random(batch) < EMPTY_PROMPT_RATE)] = 0  # prompt 0 is ""
    cond, pooled = wm.pad_condition(data["cond"][prompt].float(), data["pooled"][prompt])
    g = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
    sigma = draw_sigma(batch, g)
    noise = torch.randn(x0.shape, generator=g)
    s = sigma[:, None, None, None]
    return (1 - s) * x0 + s * noise, sigma, cond, pooled, noise - x0


def learning_rate(step: int, steps: int, peak: float = 5e-4, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_dit(work: str, seed: int, steps: int, data: dict, log_every: int = 10, save_every: int = 100) -> dict:
    from . import world_model as wm

    path = _paths(work)["dit"]
    base, _ = wm.new_diffusion_model(seed)
    dm = base.diffusion_model
    dm.requires_grad_(True)
    dm.train()
    ema = {k: v.detach().clone() for k, v in dm.state_dict().items()}
    opt = torch.optim.AdamW(dm.parameters(), lr=5e-4, weight_decay=0.0, betas=(0.9, 0.99))
    step, log = 0, []
    if os.path.isfile(path):
        state = torch.load(path)
        dm.load_state_dict(state["model"])
        ema = state["ema"]
        opt.load_state_dict(state["opt"])
        step, log = state["step"], state["log"]
    t0, window = time.time() - (log[-1][2] if log else 0.0), []  # seconds count on across a resume
    while step < steps:
        xt, sigma, cond, pooled, target = _batch(data, np.random.default_rng([seed, 2, step]))
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps)
        out = dm(xt, sigma * 1000, context=cond, y=pooled)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dm.parameters(), 1.0)
        opt.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))  # warm-up: the first weights do not linger in the EMA
        with torch.no_grad():
            for k, v in dm.state_dict().items():
                if v.is_floating_point():
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        step += 1
        window.append(loss.item())
        if step % log_every == 0 or step == steps:
            log.append((step, float(np.mean(window)), round(time.time() - t0, 1)))
            window = []
        if step % save_every == 0 or step == steps:
            _save({"model": dm.state_dict(), "ema": ema, "opt": opt.state_dict(), "step": step, "log": log}, path)
            print(f"[dit] step {step}/{steps} loss {log[-1][1]:.4f} ({time.time() - t0:.0f} s)", flush=True)
    return {"model": dm.state_dict(), "ema": ema, "log": log}


def write_log(log: List[tuple], name: str, columns: List[str], folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(log)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    steps, values = [r[0] for r in log], [r[1] for r in log]
    ax.plot(steps, values, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel(columns[1])
    ax.set_yscale("log")
    ax.set_title(name.replace("_", " "))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, f"{name}.png"))
    plt.close(fig)


def package(work: str, seed: int, data: dict, out: str, weights: str = "ema", logs: str = LOG_DIR) -> str:
    import safetensors.torch

    from . import world_model as wm

    dit = torch.load(_paths(work)["dit"])
    dec = torch.load(_paths(work)["decoder"])
    base, _ = wm.new_diffusion_model(seed)
    base.diffusion_model.load_state_dict(dit["ema" if weights == "ema" else "model"])
    state = wm.diffusion_state(base.diffusion_model)
    vae = wm.vae_state(wm.encoder_state(data["weight"], data["bias"]), dec["decoder"])
    state.update({k: v.to(torch.float16).contiguous() for k, v in vae.items()})
    os.makedirs(os.path.dirname(out), exist_ok=True)
    meta = {"comfyui-taca": "compositional-world SD3-shaped model; text encoder: run devtools.world_model",
            "seed": str(seed), "dit_steps": str(dit["step"]), "decoder_steps": str(dec["step"]), "weights": weights}
    safetensors.torch.save_file(state, out, metadata=meta)
    write_log(dit["log"], "dit_loss", ["step", "mse", "seconds"], logs)
    write_log(dec["log"][::10], "decoder_loss", ["step", "l1"], logs)
    return out


# ---------------------------------------------------------------------------------------------------------------
# TACA LoRA


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
LORA_GAMMA, LORA_THRESHOLD = 1.2, 0.97  # TACA while the LoRA trains: the paper's defaults


def new_lora(base_model, rank: int, seed: int) -> Dict[str, torch.Tensor]:
    """A PEFT-format LoRA on every attention projection of ``base_model`` (diffusers names, as the authors'
    releases): lora_A drawn as PEFT draws it, lora_B zero, so training starts from the model itself."""
    import comfy.lora

    modules = dict(base_model.named_modules())
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, target in sorted(comfy.lora.model_lora_keys_unet(base_model, {}).items()):
        if not key.startswith("transformer.") or not key.endswith(tuple("." + t for t in LORA_TARGETS)):
            continue
        weight_key, offset = (target, None) if isinstance(target, str) else target
        module = modules.get(weight_key[:-len(".weight")])
        if module is None:  # the map names every SD3.5 layer (attn2 of MMDiT-X); this model has fewer
            continue
        weight = module.weight
        fan_in, out = weight.shape[1], offset[2] if offset is not None else weight.shape[0]
        bound = 1 / math.sqrt(fan_in)  # PEFT: kaiming_uniform_(a=sqrt(5))
        tensors[f"{key}.lora_A.weight"] = (torch.rand(rank, fan_in, generator=g) * 2 - 1) * bound
        tensors[f"{key}.lora_B.weight"] = torch.zeros(out, rank)
    return tensors


def _taca_window_sigmas(batch: int, g: torch.Generator) -> torch.Tensor:
    return LORA_THRESHOLD + (1 - LORA_THRESHOLD) * torch.rand(batch, generator=g)


def train_lora(work: str, seed: int, steps: int, data: dict, rank: int = 16,
               lr: float = 5e-4) -> Dict[str, torch.Tensor]:
    import comfy.model_management

    from . import world_model as wm

    path = _paths(work)["lora"]
    pack = comfy_runtime.load_pack()
    taca_lora = comfy_runtime.pack_module("taca.lora")
    model, _, _ = wm.load(os.path.join(work, "models"))
    model.model.requires_grad_(False)
    state = torch.load(path) if os.path.isfile(path) else None
    if state:
        tensors, step, log = state["lora"], state["step"], state["log"]
    else:
        tensors, step, log = new_lora(model.model, rank, seed), 0, []
    params = [t.requires_grad_(True) for t in tensors.values()]
    match = taca_lora.match_lora(model.model, tensors, 1.0)
    applied = {id(low.down) for ups in match.updates.values() for low in ups}
    applied |= {id(low.up) for ups in match.updates.values() for low in ups}
    if match.matched_tensors != len(tensors) or applied != {id(p) for p in params}:
        raise RuntimeError(f"the LoRA loader did not take the trained tensors as they are: {match.unmatched}")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if state:
        opt.load_state_dict(state["opt"])
    patched = model.clone()
    taca_lora.install(patched, match, "taca_steps", None, "training")
    patched = pack["TACAPatchModel"].execute(patched, LORA_GAMMA, LORA_THRESHOLD, "exact").result[0]
    comfy.model_management.load_models_gpu([patched])
    options = dict(patched.model_options["transformer_options"], wrappers=patched.wrappers)  # as the sampler does
    t0, window = time.time() - (log[-1][2] if log else 0.0), []
    while step < steps:
        xt, sigma, cond, pooled, target = _batch(data, np.random.default_rng([seed, 3, step]), wm.IMAGE_SIZE,
                                                 _taca_window_sigmas)  # the early steps, where the LoRA acts
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        denoised = patched.model.apply_model(xt, sigma, c_crossattn=cond, y=pooled, transformer_options=options)
        s = sigma[:, None, None, None]
        loss = torch.nn.functional.mse_loss((xt - denoised) / s, target)  # the flow: denoised = x_t - s v
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0 and all(p.grad is None or not p.grad.any() for p in params):
            raise RuntimeError("the LoRA got no gradient: it did not act in the model call")
        opt.step()
        step += 1
        window.append(loss.item())
        if step % 10 == 0 or step == steps:
            log.append((step, float(np.mean(window)), round(time.time() - t0, 1)))
            window = []
        if step % 50 == 0 or step == steps:
            _save({"lora": {k: v.detach() for k, v in tensors.items()}, "opt": opt.state_dict(), "step": step,
                   "log": log}, path)
            print(f"[lora] step {step}/{steps} loss {log[-1][1]:.4f} ({time.time() - t0:.0f} s)", flush=True)
    return {"lora": {k: v.detach().contiguous() for k, v in tensors.items()}, "log": log}


def save_lora(result: Dict, out: str, seed: int, rank: int, logs: str = LOG_DIR) -> str:
    import safetensors.torch

    os.makedirs(os.path.dirname(out), exist_ok=True)
    meta = {"comfyui-taca": "TACA LoRA of the compositional-world model", "seed": str(seed), "rank": str(rank),
            "taca_gamma": str(LORA_GAMMA), "taca_threshold": str(LORA_THRESHOLD), "steps": str(result["log"][-1][0])}
    safetensors.torch.save_file(result["lora"], out, metadata=meta)
    write_log(result["log"], "lora_loss", ["step", "mse", "seconds"], logs)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("data", "decoder", "dit", "package", "all", "lora"))
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3400, help="diffusion-model steps (about an hour here)")
    parser.add_argument("--decoder-steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=WORK)
    parser.add_argument("--out", default=None)
    parser.add_argument("--logs", default=LOG_DIR, help="where the loss logs and curves go")
    parser.add_argument("--weights", choices=("ema", "last"), default="ema",
                        help="package the EMA of the diffusion model's weights or its last weights")
    parser.add_argument("--lora-steps", type=int, default=400)
    parser.add_argument("--lora-rank", type=int, default=16, help="the authors released ranks 16 and 64")
    parser.add_argument("--scene-scale", type=float, default=1.0, help="fraction of the training scenes (smoke runs)")
    args = parser.parse_args(argv)
    comfy_runtime.activate(cpu=True)
    from . import world_model as wm

    seed = wm.SEED if args.seed is None else args.seed
    torch.set_num_threads(args.threads)
    data = build_data(args.work, seed, {res: max(8, round(n * args.scene_scale)) for res, n in SCENES.items()})
    if args.stage in ("decoder", "all"):
        train_decoder(args.work, seed, args.decoder_steps, data)
    if args.stage in ("dit", "all"):
        train_dit(args.work, seed, args.steps, data)
    if args.stage in ("package", "all"):
        print(package(args.work, seed, data, args.out or wm.weights_path(REPO), args.weights, args.logs))
    if args.stage == "lora":
        result = train_lora(args.work, seed, args.lora_steps, data, args.lora_rank)
        print(save_lora(result, args.out or wm.lora_path(REPO), seed, args.lora_rank, args.logs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
