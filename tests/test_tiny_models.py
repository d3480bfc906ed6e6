"""The tiny test models are configured by ComfyUI's own model detection, on whichever ComfyUI runs the tests.

For every kind: ComfyUI's detection and class matching pick the supported_models class a real checkpoint of that
model gets (written out below, not read from devtools/tiny_models.py), the model built from the detected config
has every key of the tiny checkpoint with its shape (after ComfyUI's own state-dict conversion), and the
joint-attention kinds run a step through ComfyUI's sampler.
"""

import pytest
import torch

import comfy.model_detection
import comfy.supported_models
import comfy.utils
from devtools import tiny_models as tm
from devtools.sampling import one_step

EXPECTED = {
    "flux": "Flux", "flux_schnell": "FluxSchnell", "flux2": "Flux2", "chroma": "Chroma", "sd3": "SD3",
    "sd35_medium": "SD3", "auraflow": "AuraFlow", "hunyuan_video": "HunyuanVideo",
    "hunyuan_video_i2v": "HunyuanVideoI2V", "hunyuan_video_skyreels": "HunyuanVideoSkyreelsI2V",
    "hunyuan_video15": "HunyuanVideo15", "hunyuan_video15_sr": "HunyuanVideo15_SR_Distilled",
    "hunyuan_image21": "HunyuanImage21", "hunyuan_image21_refiner": "HunyuanImage21Refiner",
    "chroma_radiance": "ChromaRadiance", "qwen_image": "QwenImage", "hidream": "HiDream", "lumina2": "Lumina2",
    "z_image": "ZImage", "omnigen2": "Omnigen2",
    # classes newer than ComfyUI 0.3.75, one per line
    "lens": "Lens",
    "joyimage": "JoyImage",
    "pixeldit": "PixelDiTT2I",
    "pid": "PiD",
    "minimax_h3": "MiniMaxH3",
    "cogvideox": "CogVideoX_T2V",
    "cogvideox15_i2v": "CogVideoX_I2V",
    "cogvideox_fun_inpaint": "CogVideoX_Inpaint",
    "ideogram4": "Ideogram4",
    "krea2": "Krea2",
    "longcat_image": "LongCatImage",
    "mage_flow": "MageFlow",
    "z_image_pixel": "ZImagePixelSpace",
    "z_image_pixel_omni": "ZImagePixelSpace",
    "boogu": "Boogu",
    "hidream_o1": "HiDreamO1",
    # refused ones
    "sd15": "SD15", "hunyuan3d": "Hunyuan3Dv2", "sdxl": "SDXL", "wan21": "WAN21_T2V", "wan21_vace": "WAN21_Vace",
    "wan22": "WAN22_T2V", "pixart": "PixArtSigma", "hunyuan_dit": "HunyuanDiT", "cosmos_predict2": "CosmosT2IPredict2",
    "ernie_image": "ErnieImage", "seedvr2": "SeedVR2",
}
# ComfyUI matches the UNet classes on full-size channel counts and depths, which no tiny UNet has: their detected
# config goes to the class directly.
NAMED_CLASS = {"sd15", "sdxl"}
EVERY_KIND = sorted(set(tm.KINDS) | set(tm.FAMILY_KINDS) | set(tm.UNSUPPORTED) | set(tm.CROSS_ATTENTION_KINDS))
# the kinds whose model class this ComfyUI has
ALL_KINDS = [kind for kind in EVERY_KIND if tm.available(kind)]


def test_every_kind_is_listed():
    assert set(EVERY_KIND) == set(EXPECTED)


def test_the_newest_comfyui_has_every_kind():
    """Kinds are only left out on older ComfyUI, where their model class does not exist yet."""
    import comfyui_version
    from devtools.comfy_runtime import version_key

    if version_key(comfyui_version.__version__) >= version_key("0.33.0"):
        assert ALL_KINDS == EVERY_KIND
    for kind in set(EVERY_KIND) - set(ALL_KINDS):
        assert not hasattr(comfy.supported_models, EXPECTED[kind])


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_detection_picks_the_class_of_the_real_model(kind):
    ckpt = tm.checkpoint(kind)
    assert ckpt.expected == EXPECTED[kind]
    state_dict = tm.checkpoint_state_dict(ckpt)
    detected = comfy.model_detection.detect_unet_config(state_dict, "")
    assert detected is not None
    if kind in NAMED_CLASS:
        assert not ckpt.match and detected["model_channels"] == 32  # detected as the tiny UNet it is
    else:
        assert ckpt.match
        found = tm.detected_class(ckpt)
        assert found is not None and found.__name__ == EXPECTED[kind]


@pytest.mark.parametrize("kind", ALL_KINDS + ["flux@bench"])
def test_model_has_the_checkpoints_keys(kind):
    name, _, size = kind.partition("@")
    ckpt = tm.checkpoint(name, size or "tiny")
    base, patcher = tm.build_model(ckpt)
    assert type(base.model_config).__name__ == EXPECTED[name]
    assert patcher.model is base
    # the keys as ComfyUI's loader hands them to the model (newer versions rename some norm keys)
    loaded = base.model_config.process_unet_state_dict({k: torch.zeros(s) for k, s in ckpt.keys.items()})
    model_state = base.diffusion_model.state_dict()
    missing = sorted(k for k in loaded if k not in model_state)
    assert not missing, missing
    wrong = {k: (tuple(v.shape), tuple(model_state[k].shape)) for k, v in loaded.items()
             if tuple(model_state[k].shape) != tuple(v.shape)}
    assert not wrong, wrong
    params = [p for p in base.diffusion_model.parameters()]
    assert all(torch.isfinite(p).all() for p in params)


def test_bench_variant_is_flux_sized():
    tiny = tm.build("flux", size="bench")
    config = tiny.patcher.model.model_config.unet_config
    assert (config["hidden_size"], config["num_heads"]) == (512, 4)
    assert config["hidden_size"] // config["num_heads"] == 128


def test_seeded_weights_are_reproducible_and_differ_by_seed():
    a, b, c = (tm.build("flux", seed=s).patcher.model.diffusion_model.state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["img_in.weight"], c["img_in.weight"])


FAMILY_COND = {"hidream": {"llama_tokens": 7}, "pid": {"lq_latent": (16, 4, 4)}}


@pytest.mark.parametrize("kind", [k for k in sorted(tm.KINDS) + sorted(tm.FAMILY_KINDS) if tm.available(k)])
def test_forward_step_runs(kind):
    if kind in tm.KINDS:
        tiny = tm.build(kind)
        size = 8 if kind == "flux2" else 16
        positive, negative = tm.conditioning(tiny, 1), tm.conditioning(tiny, 2)
        latent = tm.latent(tiny, size, size)
    else:
        tiny = tm.build(kind)
        positive = tm.family_conditioning(tiny, 1, **FAMILY_COND.get(kind, {}))
        negative = tm.family_conditioning(tiny, 2, **FAMILY_COND.get(kind, {}))
        latent = tm.family_latent(tiny)
    assert type(tiny.patcher.model.model_config).__name__ == EXPECTED[kind]
    out = one_step(tiny.patcher, positive, negative, latent, cfg=2.0)
    if getattr(latent, "is_nested", False):  # audio + video: one_step hands back the sampler's flat pack
        latent = comfy.utils.pack_latents(latent.unbind())[0]
    # batch and rank of the latent (a latent format may change the channels: HunyuanImage 2.1's refiner)
    assert out.shape[0] == latent.shape[0] and out.ndim == latent.ndim and torch.isfinite(out).all()
    assert out.abs().max() > 0  # the random model did predict something
