"""The prompt-following benchmark command end to end, at its smallest: the structure of what it writes (not
its numbers), pairing of TACA cells with the plain cell, and that a rerun resumes instead of redoing work."""

import json
import os
import subprocess
import sys

from conftest import REPO

from devtools import comfy_runtime

ARGS = ["--resolutions", "256", "--gammas", "1.2", "--thresholds", "0.97", "--modes", "exact",
        "--categories", "color,spatial", "--prompts", "2", "--seeds", "2", "--batch-prompts", "2", "--steps", "2"]


def _bench(out, *extra):
    env = dict(os.environ, TACA_COMFYUI_VERSION=os.path.basename(comfy_runtime.RUNTIME_HOME)[len("comfyui-"):])
    return subprocess.run([sys.executable, os.path.join(REPO, "bench", "prompt_following.py"), "--out", str(out),
                           *ARGS, *extra], capture_output=True, text=True, env=env, timeout=900)


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_benchmark_command_writes_paired_samples_table_and_plot(tmp_path):
    first = _bench(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = _rows(tmp_path / "samples.jsonl")
    cells = {"256px plain", "256px gamma 1.2 thr 0.97 exact"}
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
    assert len(list((tmp_path / "sheets").glob("*.png"))) == 4  # each cell and category: its first batch

    again = _bench(tmp_path)  # everything is there: nothing is sampled again
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_rows(tmp_path / "samples.jsonl")) == len(rows)
    assert "images in" not in again.stdout
