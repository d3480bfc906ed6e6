"""The compositional world's trained model: its checkpoint loads through ComfyUI's stock loader and samples
through the real sampler; its VAE encoder is the documented fixed encoder; the checker reads the images it
round-trips; the training script reproduces its first steps bit for bit from the seed, and its TACA LoRA stage
writes a LoRA the pack's loader applies."""

import os

import numpy as np
import pytest
import torch

from devtools import comfy_runtime, train_world_model, world_model
from taca_eval import checker, world

MODELS = os.path.join(comfy_runtime.RUNTIME_HOME, "world_models")


@pytest.fixture(scope="module")
def loaded():
    return world_model.load(MODELS)


def test_checkpoint_is_detected_as_sd3_with_clip_l_and_taesd(loaded):
    import comfy.supported_models
    import comfy.taesd.taesd

    model, clip, vae = loaded
    assert type(model.model.model_config) is comfy.supported_models.SD3
    assert model.model.diffusion_model.x_embedder.proj.weight.shape[0] == 64 * world_model.DEPTH
    assert isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD)
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a red star"), return_pooled=True)
    assert cond.shape == (1, 77, 4096) and pooled.shape == (1, 2048)


def test_samples_through_the_stock_nodes(loaded):
    import nodes
    from comfy_extras.nodes_sd3 import EmptySD3LatentImage

    model, clip, vae = loaded
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        positive = nodes.CLIPTextEncode().encode(clip, "a red circle")[0]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = EmptySD3LatentImage.execute(world_model.IMAGE_SIZE, world_model.IMAGE_SIZE, 1).result[0]
        out = nodes.common_ksampler(model, 7, 4, 4.5, "euler", "simple", positive, negative, latent)[0]
        image = nodes.VAEDecode().decode(vae, out)[0]
    assert out["samples"].shape == (1, 16, world_model.IMAGE_SIZE // 8, world_model.IMAGE_SIZE // 8)
    assert image.shape == (1, world_model.IMAGE_SIZE, world_model.IMAGE_SIZE, 3)
    assert torch.isfinite(image).all() and float(image.std()) > 0.01


def test_vae_encoder_is_the_fixed_block_encoder(loaded):
    """ComfyUI's VAE Encode of renders equals the documented encoder (2x2 average, space-to-depth, projection)
    computed independently here in float64."""
    import safetensors.torch

    _, _, vae = loaded
    scenes = [world.make_scene("spatial", i, "heldout") for i in range(2)]
    images = np.stack([world.render(s, world_model.IMAGE_SIZE) for s in scenes]).astype(np.float64) / 255
    with torch.inference_mode():
        latent = vae.encode(torch.from_numpy(images).float())
    state = safetensors.torch.load_file(world_model.weights_path())
    final = state["first_stage_model.taesd_encoder.14.weight"][:, :48, 1, 1].double()
    bias = state["first_stage_model.taesd_encoder.14.bias"].double()
    n, h, w = images.shape[0], images.shape[1] // 8, images.shape[2] // 8
    blocks = images.reshape(n, h, 4, 2, w, 4, 2, 3).mean(axis=(3, 6))  # 4x4 grid of 2x2 means per 8x8 block
    feats = torch.from_numpy(blocks.transpose(0, 1, 3, 5, 2, 4).reshape(n, h, w, 48))  # colour, row, column
    expected = feats @ final.T + bias
    expected = expected.permute(0, 3, 1, 2) / world_model.VAE_SCALE + world_model.VAE_SHIFT
    torch.testing.assert_close(latent.double(), expected, atol=2e-3, rtol=1e-3)


def test_checker_reads_the_vae_round_trip(loaded, capsys):
    """The checker's accuracy on images that went through the model's VAE (encode, decode): printed, and a
    deliberately wrong label must score 0."""
    _, _, vae = loaded

    def round_trip(image):
        pixels = torch.from_numpy(image[None].astype(np.float32) / 255)
        with torch.inference_mode():
            back = vae.decode(vae.encode(pixels))[0]
        return (back.clamp(0, 1).numpy() * 255).round().astype(np.uint8)

    result = checker.validate(6, world_model.IMAGE_SIZE, transform=round_trip)
    with capsys.disabled():
        print("\nchecker on VAE round trips (own prompt = 1, wrong prompt = 0):",
              {c: (r["correct"], r["rejected"]) for c, r in result.items()})
    for category, r in result.items():
        assert r["rejected"] == 1.0 and r["correct"] >= 0.8, (category, r)


def _train(work, seed):
    train_world_model.main(["dit", "--work", str(work), "--seed", str(seed), "--scene-scale", "0.0005",
                            "--steps", "3", "--threads", "1", "--out", str(work / "w.safetensors")])
    return torch.load(work / "dit.pt")


def test_training_first_steps_reproduce_bit_for_bit(tmp_path):
    first = _train(tmp_path / "a", 11)
    again = _train(tmp_path / "b", 11)
    other = _train(tmp_path / "c", 12)
    assert first["step"] == again["step"] == 3
    assert [row[1] for row in first["log"]] == [row[1] for row in again["log"]]
    for key, value in first["model"].items():
        assert torch.equal(value, again["model"][key]), key
    assert any(not torch.equal(v, other["model"][k]) for k, v in first["model"].items())


def test_taca_lora_recipe_trains_a_lora_the_loader_applies(tmp_path, loaded):
    """The LoRA stage (the paper's recipe): two steps with TACA active move the LoRA off its zero start, on every
    attention projection, and the TACA LoRA Loader's matching takes every tensor of the file it writes."""
    import safetensors.torch

    from taca import lora as taca_lora

    out = tmp_path / "lora.safetensors"
    train_world_model.main(["lora", "--work", str(tmp_path / "w"), "--scene-scale", "0.0005", "--lora-steps", "2",
                            "--lora-rank", "4", "--threads", "1", "--out", str(out), "--logs", str(tmp_path)])
    tensors = safetensors.torch.load_file(out)
    assert (tmp_path / "lora_loss.csv").is_file()
    still_zero = {k for k, t in tensors.items() if k.endswith("lora_B.weight") and t.abs().max() == 0}
    # SD3's last block discards its text outputs, so its text queries get no gradient
    assert still_zero <= {f"transformer.transformer_blocks.{world_model.DEPTH - 1}.attn.add_q_proj.lora_B.weight"}
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {4}
    match = taca_lora.match_lora(loaded[0].model, tensors, 1.0)
    assert match.matched_tensors == len(tensors), match.unmatched
    projections = {name for name, m in loaded[0].model.named_modules() if name.endswith((".attn.qkv", ".attn.proj"))}
    assert set(match.updates) == projections
