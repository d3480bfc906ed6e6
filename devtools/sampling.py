"""Run ComfyUI's real samplers on a model patcher (tests, benchmark, demo)."""

from __future__ import annotations

from typing import Any, Union

import torch

import comfy.nested_tensor
import comfy.sample
import comfy.samplers
import comfy.utils

from . import tiny_models as tm


def _noise(latent, seed: int):
    g = torch.Generator().manual_seed(seed)
    if getattr(latent, "is_nested", False):  # one noise tensor per stream, as comfy.sample.prepare_noise makes
        return comfy.nested_tensor.NestedTensor([torch.randn(t.shape, generator=g) for t in latent.unbind()])
    return torch.randn(latent.shape, generator=g)


def sample_sigmas(patcher, positive, negative, latent, sigmas, cfg: float = 1.0, seed: int = 0,
                  sampler: Union[str, Any] = "euler"):
    """ComfyUI's sampler ``sampler`` (a KSampler name, or a ``comfy.samplers.Sampler`` such as a node's) over
    ``sigmas``; a nested (audio + video) latent comes back as the sampler's flat pack (B, 1, N)."""
    if isinstance(sampler, str):
        sampler = comfy.samplers.sampler_object(sampler)
    out = comfy.sample.sample_custom(patcher, _noise(latent, seed), cfg, sampler, sigmas, positive, negative, latent,
                                     disable_pbar=True, seed=seed)
    if getattr(out, "is_nested", False):
        out = comfy.utils.pack_latents(out.unbind())[0]
    return out


def one_step(patcher, positive, negative, latent, sigma: float = 1.0, cfg: float = 1.0, seed: int = 0,
             sampler: Union[str, Any] = "euler"):
    """One step from ``sigma`` to 0 through ComfyUI's sampler: returns the (CFG) denoised prediction."""
    return sample_sigmas(patcher, positive, negative, latent, torch.tensor([sigma, 0.0]), cfg, seed, sampler)


def ksample(patcher, tiny, steps=30, cfg=3.0, seed=3, start_step=None, batch=1, height=16, width=16,
            scheduler="simple"):
    """comfy.sample.sample (what KSampler runs) with euler on the tiny model's random conditioning."""
    latent = tm.latent(tiny, height, width, batch=batch)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(patcher, noise, steps, cfg, "euler", scheduler, tm.conditioning(tiny, 1, batch=batch),
                               tm.conditioning(tiny, 2, batch=batch), latent, start_step=start_step,
                               disable_pbar=True, seed=seed)


def schedule(patcher, steps: int = 30, scheduler: str = "simple") -> torch.Tensor:
    model_sampling = patcher.get_model_object("model_sampling")
    return comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps).cpu()
