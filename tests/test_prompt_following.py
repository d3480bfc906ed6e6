"""The prompt-following benchmark command end to end, at its smallest: the structure of what it writes (not
its numbers), pairing of TACA and LoRA cells with the plain cell, and that a rerun resumes instead of redoing
work."""

import json
import os
import subprocess
import sys

from conftest import REPO

import safetensors.torch
import torch

from devtools import comfy_runtime, train_world_model, world_model

ARGS = ["--resolutions", "256", "--gammas", "1.2", "--thresholds", "0.97", "--modes", "exact",
        "--categories", "color,spatial", "--prompts", "2", "--seeds", "2", "--batch-prompts", "2", "--steps", "2"]


def _bench(out, *extra):
    env = dict(os.environ, TACA_COMFYUI_VERSION=os.path.basename(comfy_runtime.RUNTIME_HOME)[len("comfyui-"):])
    return subprocess.run([sys.executable, os.path.join(REPO, "bench", "prompt_following.py"), "--out", str(out),
                           *ARGS, *extra], capture_output=True, text=True, env=env, timeout=900)


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _some_lora(path):
    """A LoRA of the world model's shape that changes it (B not zero), in the format the LoRA stage writes."""
    base, _ = world_model.new_diffusion_model()
    tensors = train_world_model.new_lora(base, 4, 0)
    g = torch.Generator().manual_seed(1)
    for key, t in tensors.items():
        if key.endswith("lora_B.weight"):
            t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    safetensors.torch.save_file(tensors, str(path))
    return str(path)


def test_benchmark_command_writes_paired_samples_table_and_plot(tmp_path):
    first = _bench(tmp_path / "out", "--lora", _some_lora(tmp_path / "lora.safetensors"))
    tmp_path = tmp_path / "out"
    assert first.returncode == 0, first.stderr[-3000:]
    rows = _rows(tmp_path / "samples.jsonl")
    cells = {"256px plain", "256px gamma 1.2 thr 0.97 exact", "256px plain + LoRA",
             "256px gamma 1.2 thr 0.97 exact + LoRA"}
    assert {r["cell"] for r in rows} == cells
    for cell in cells:  # every cell holds the same (category, prompt, seed) pairs, once each
        keys = [(r["category"], r["prompt"], r["seed"]) for r in rows if r["cell"] == cell]
        assert sorted(keys) == sorted((c, p, s) for c in ("color", "spatial") for p in range(2) for s in range(2))
    for r in rows:
        assert 0.0 <= r["score"] <= 1.0 and isinstance(r["saw"], str)
    probes = _rows(tmp_path / "probe.jsonl")
    assert {(p["cell"], p["category"]) for p in probes} == {(c, k) for c in cells for k in ("color", "spatial")}
    for p in probes:
        assert 0.0 < p["share_plain"] < 1.0 and 0.0 < p["share_taca"] < 1.0 and p["steps"] >= 1
    table = (tmp_path / "table.md").read_text()
    assert "| cell | color | spatial |" in table and "diff" in table and "(n=4)" in table
    assert (tmp_path / "scores.png").stat().st_size > 0
    assert len(list((tmp_path / "sheets").glob("*.png"))) == 8  # each cell and category: its first batch

    # everything is there: nothing is sampled again
    again = _bench(tmp_path, "--lora", str(tmp_path.parent / "lora.safetensors"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_rows(tmp_path / "samples.jsonl")) == len(rows)
    assert "images in" not in again.stdout
