"""The README's demo command and the shared workflows (without a browser; see test_browser.py for the frontend)."""

import json
import os
import socket

import pytest
from PIL import Image

from conftest import REPO
from devtools import demo, workflows
from devtools.comfy_server import free_port, port_in_use


def test_committed_workflows_are_what_the_generator_writes():
    for name in workflows.WORKFLOWS:
        with open(os.path.join(REPO, "workflows", name + ".json")) as f:
            assert f.read() == workflows.render(name), f"workflows/{name}.json is stale: run python -m devtools.workflows"


def test_workflows_use_the_standard_file_names_and_the_papers_prompts():
    text = {name: json.dumps(workflows.WORKFLOWS[name]()) for name in workflows.WORKFLOWS}
    for f in ("flux1-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors", "ldiex/TACA"):
        assert f in text["flux1_dev_taca_compare"]
    assert "sd3.5_medium.safetensors" in text["sd35_medium_taca_compare"]
    assert "a squirrel to the left of the man" in text["flux1_dev_taca_compare"]
    assert "a blue sun and a yellow sea" in text["sd35_medium_taca_compare"]
    sweep = workflows.WORKFLOWS["taca_gamma_sweep"]()
    gammas = [n["widgets_values"][0] for n in sweep["nodes"] if n["type"] == "TACAPatchModel"]
    assert gammas == [1.0, 1.15, 1.2, 1.25, 1.3]


def test_world_demo_compares_each_category_with_the_checkers_verdicts(tmp_path):
    """The README's demo command: the trained world model, one held-out prompt per category, without and with
    TACA, the checker's verdict under each image, the probe's report, and a timing line of TACA alone."""
    from taca_eval import world

    port = free_port()
    out = tmp_path / "out"
    assert demo.main(["--port", str(port), "--out", str(out)]) == 0
    image = Image.open(out / "taca_compare.png")
    assert image.width > 4 * 256 and 2 * 256 < image.height < 3 * 256  # a column per prompt, two rows
    report = (out / "report.md").read_text()
    scenes = workflows.world_demo_scenes()
    assert [s.category for s in scenes] == list(world.CATEGORIES)
    for scene in scenes:  # one table row per prompt with a score and what the checker saw, for both images
        row = next(line for line in report.splitlines() if f"| {scene.prompt} |" in line)
        assert row.count("(saw ") == 2
    assert "acted on steps 0, 1, 2 of 30" in report  # SD3's shift 3: sigma >= 0.97 on the first 3 of 30
    timing = next(line for line in report.splitlines() if "Sampling wall time" in line)
    assert "with TACA " in timing and "LoRA" not in timing and "probe" not in timing
    probe = json.loads((out / "taca_probe.json").read_text())
    plain, scaled = demo.mean_shares(probe)  # which way TACA moves the share depends on the model's logits
    assert 0 < plain < 1 and 0 < scaled < 1 and scaled != plain
    assert not port_in_use(port)


def test_tiny_demo_runs_and_writes_the_comparison_and_the_report(tmp_path):
    port = free_port()
    out = tmp_path / "out"
    assert demo.main(["--tiny", "--port", str(port), "--out", str(out)]) == 0
    image = Image.open(out / "taca_compare.png")
    width = (image.width - 16) // 3
    panels = [image.crop((i * (width + 8), 28, i * (width + 8) + width, image.height)) for i in range(3)]
    assert panels[0].tobytes() != panels[1].tobytes()  # with and without TACA differ
    report = (out / "report.md").read_text()
    assert "acted on steps 0, 1, 2 of 30" in report
    # 2 joint blocks -> 2 joint attention calls per model call; 2 image-only attentions untouched.
    assert "6 joint attention calls changed in 3 of 30 model calls; 6 other attention calls" in report
    # The probe on the TACA branch: its report's plot and numbers beside the comparison.
    probe = json.loads((out / "taca_probe.json").read_text())
    assert probe["version"] == 1 and len(probe["steps"]) == 3  # the steps TACA acted on
    plain, scaled = demo.mean_shares(probe)
    assert scaled > plain > 0  # on TACA's steps the image tokens give the text more of their attention
    for step in probe["steps"]:
        assert [c["gamma"] for c in step["calls"]] == [1.2, 1.2]
    plot = Image.open(out / "taca_probe.png")
    assert plot.size == (960, 400) and len(plot.convert("RGB").getcolors(1 << 20) or []) > 50
    assert "TACA Attention Probe: on the 3 recorded steps" in report
    assert not port_in_use(port)  # the server is gone


def test_demo_refuses_a_port_in_use_with_a_clear_message(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert demo.main(["--port", str(port), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"port {port}" in err and "already in use" in err and "--port" in err


def touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


def test_real_models_folder_picks_the_matching_workflow_and_lora(tmp_path):
    models = str(tmp_path)
    with pytest.raises(demo.DemoError) as err:
        demo.choose_workflow(models)
    assert "flux1-dev.safetensors" in str(err.value) and "sd3.5_medium.safetensors" in str(err.value)
    for f in ("checkpoints/sd3.5_medium.safetensors", "clip/clip_l.safetensors", "clip/clip_g.safetensors",
              "clip/t5xxl_fp16.safetensors", "loras/TACA/taca_sd3.5_medium_r64.safetensors",
              "loras/taca_flux_r16.safetensors"):
        touch(os.path.join(models, f))
    name, workflow, _, notes = demo.choose_workflow(models)
    assert name == "sd35_medium_taca_compare"
    lora = next(n for n in workflow["nodes"] if n["type"] == "TACALoraLoader")
    assert lora["widgets_values"][0] == os.path.join("TACA", "taca_sd3.5_medium_r64.safetensors") and lora["mode"] == 0
    for f in ("diffusion_models/flux1-dev.safetensors", "vae/ae.safetensors", "text_encoders/clip_l.safetensors",
              "text_encoders/t5xxl_fp16.safetensors"):
        touch(os.path.join(models, f))
    name, workflow, _, _ = demo.choose_workflow(models)
    assert name == "flux1_dev_taca_compare"
    lora = next(n for n in workflow["nodes"] if n["type"] == "TACALoraLoader")
    assert lora["widgets_values"][0] == "taca_flux_r16.safetensors"
