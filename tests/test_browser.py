"""The pack in the real ComfyUI frontend: a headless Chromium (Playwright) against a real `main.py --cpu`.

One server and one page for the module. The shared workflows are loaded with the frontend's own
``app.loadGraphData`` and converted with its ``app.graphToPrompt``; the tiny demo is run from the page
with ``app.queuePrompt`` (what the Run button does); the schedule plot and the run feedback are read
back from what the extension drew, including the pixels of the graph canvas.

Needs /usr/bin/chromium (scripts/setup_runtime.sh installs it); TACA_SKIP_BROWSER=1 skips the module.
Screenshots go to .artifacts/browser/.
"""

from __future__ import annotations

import glob
import io
import json
import os
import time
import urllib.request

import pytest
from PIL import Image, ImageChops, ImageStat

import browser_helpers as bh
from comfy_server import ComfyServer
from conftest import REPO
from devtools import comfy_runtime

if os.environ.get("TACA_SKIP_BROWSER") == "1":
    pytest.skip("TACA_SKIP_BROWSER=1", allow_module_level=True)

from devtools import thumbnails  # noqa: E402  (browser launch and page set-up, shared)
from devtools import workflows as wfs  # noqa: E402

WORKFLOW_FILES = sorted(glob.glob(os.path.join(REPO, "workflows", "*.json")))
WORKFLOW_NAMES = [os.path.splitext(os.path.basename(p))[0] for p in WORKFLOW_FILES]
TINY = "tiny_taca_demo"
MODEL_FILE_INPUTS = {"ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "clip_name3", "vae_name",
                     "lora_name"}
ARTIFACTS = os.path.join(REPO, ".artifacts", "browser")
MODELS = os.path.join(comfy_runtime.RUNTIME_HOME, "test_models")
# extension colours (js/taca.js COLORS)
ACTIVE, INACTIVE, WARNING = "#f0a73a", "#5f7391", "#ff7a59"


def load_json(name):
    with open(os.path.join(REPO, "workflows", name + ".json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from devtools.demo_models import ensure_demo_models

    ensure_demo_models(MODELS)  # cached beside the runtime (git-ignored), reused by later runs
    workdir = str(tmp_path_factory.mktemp("comfy_browser"))
    config = os.path.join(workdir, "extra_model_paths.yaml")
    with open(config, "w") as f:
        f.write(f"tiny:\n    base_path: {MODELS}\n    checkpoints: checkpoints\n    loras: loras\n")
    srv = ComfyServer(workdir, ("--extra-model-paths-config", config)).start()
    status, _ = srv.post("/settings", dict(thumbnails.FRONTEND_SETTINGS))
    assert status == 200
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(thumbnails.CHROMIUM):
        pytest.fail(f"{thumbnails.CHROMIUM} is missing: run scripts/setup_runtime.sh (it installs Debian chromium), "
                    "or set TACA_SKIP_BROWSER=1")
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    b = thumbnails.launch_browser(pw)
    yield b
    b.close()
    pw.stop()


@pytest.fixture(scope="module")
def page(server, browser):
    pg = thumbnails.open_frontend(browser, server.url)
    pg.taca_errors = []  # console errors / uncaught exceptions coming from this pack's extension

    def on_console(msg):
        if msg.type in ("error", "warning") and ("comfyui-taca" in msg.text or "taca.js" in msg.text):
            pg.taca_errors.append(f"console.{msg.type}: {msg.text}")

    def on_error(err):
        text = f"{err.message}\n{getattr(err, 'stack', '') or ''}"
        if "comfyui-taca" in text or "taca.js" in text:
            pg.taca_errors.append("uncaught: " + text)

    pg.on("console", on_console)
    pg.on("pageerror", on_error)
    pg.evaluate(bh.RECORDER_JS)
    yield pg
    pg.context.close()


@pytest.fixture
def clean_page(page):
    """The page; fails the test if the extension logged an error or threw during it."""
    before = len(page.taca_errors)
    yield page
    assert page.taca_errors[before:] == []


def load(page, name_or_workflow):
    workflow = load_json(name_or_workflow) if isinstance(name_or_workflow, str) else name_or_workflow
    thumbnails.load_workflow(page, workflow)
    return workflow


def focus_taca(page, node_id=None):
    return page.evaluate(bh.FOCUS_TACA_JS, node_id)


def drawn(page, node_id, after=None, timeout=15_000, condition="true"):
    """What the extension last drew for the node, once a draw newer than ``after`` satisfies ``condition``."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            f"""([id, after]) => {{ const n = app.graph.getNodeById(id); const plot = n && n.tacaPlot;
                if (!plot || (after != null && plot.drawCount <= after)) {{ app.canvas.setDirty(true, true); return false; }}
                const feedback = n.tacaFeedback; return {condition}; }}""", arg=[node_id, after], timeout=timeout)
    except PlaywrightTimeout:
        last = page.evaluate("(id) => { const n = app.graph.getNodeById(id); return n && { label: n.tacaPlot?.label, "
                             "drawCount: n.tacaPlot?.drawCount, feedback: n.tacaFeedback ?? null }; }", node_id)
        pytest.fail(f"node {node_id}: no draw with {condition} (after draw {after}) in {timeout} ms; last drawn: {last}")
    return page.evaluate(bh.DRAWN_JS, node_id)


def set_number_widget(page, node_id, name, value):
    """Types a value into a number widget the way a user does: click its middle, type, Enter."""
    xy = page.evaluate("""([id, name]) => {
        const node = app.graph.getNodeById(id);
        const w = node.widgets.find((x) => x.name === name);
        const rect = app.canvas.canvas.getBoundingClientRect();
        const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] / 2,
                                                               node.pos[1] + w.y + LiteGraph.NODE_WIDGET_HEIGHT / 2]);
        return [rect.left + cx, rect.top + cy];
    }""", [node_id, name])
    page.mouse.click(xy[0], xy[1])
    box = page.locator(".graphdialog input").last
    box.wait_for(state="visible", timeout=5_000)
    box.fill(str(value))
    box.press("Enter")
    page.wait_for_function("([id, name, v]) => Math.abs(app.graph.getNodeById(id).widgets.find((x) => x.name === name)"
                           ".value - v) < 1e-9", arg=[node_id, name, value], timeout=5_000)


def nominal_comfy_sigmas():
    """ComfyUI's own `simple` schedule, 30 steps, on an SD3 flow model (shift 3.0)."""
    import comfy.model_sampling
    import comfy.samplers
    import comfy.supported_models

    class Sampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    sampling = Sampling(comfy.supported_models.SD3({}))
    return comfy.samplers.calculate_sigmas(sampling, "simple", 30).tolist()


def queue_from_page(page, server, timeout=150):
    """app.queuePrompt(0, 1), as the Run button; returns (queue response, history entry)."""
    n_before = page.evaluate("() => window.__taca.queued.length")
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    page.wait_for_function("(n) => window.__taca.queued.length > n", arg=n_before, timeout=30_000)
    response = page.evaluate("() => window.__taca.queued[window.__taca.queued.length - 1]")
    assert response.get("node_errors") == {} and "prompt_id" in response, response
    pid = response["prompt_id"]
    page.wait_for_function("(pid) => window.__taca.events.some((e) => ['execution_success', 'execution_error', "
                           "'execution_interrupted'].includes(e.type) && e.detail.prompt_id === pid)",
                           arg=pid, timeout=timeout * 1000)
    return response, server.wait_for(pid, timeout=30)


def save_artifact(page, name):
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, name)
    page.screenshot(path=path)
    return path


# ------------------------------------------------------------------------------------------ the extension

def test_extension_is_served_and_registered(server, clean_page):
    assert "/extensions/comfyui-taca/taca.js" in server.get("/extensions")
    names = clean_page.evaluate("() => app.extensions.map((e) => e.name)")
    assert "comfyui-taca.schedule" in names


def test_node_help_pages_are_served_with_every_input(server, object_info):
    for node in ("TACAPatchModel", "TACALoraLoader"):
        info = object_info[node]
        # the frontend finds a custom node's help under /extensions/<pack>/docs/ from its python_module
        assert info["python_module"].split(".")[:2] == ["custom_nodes", "comfyui-taca"]
        with urllib.request.urlopen(f"{server.url}/extensions/comfyui-taca/docs/{node}.md", timeout=30) as r:
            text = r.read().decode()
        for section in ("required", "optional"):
            for name in info["input"].get(section, {}):
                assert f"`{name}`" in text, (node, name)
        assert "](taca_demo_compare.png)" in text
    for mode in ("exact", "selective", "flex"):
        assert f"**{mode}**" in open(os.path.join(REPO, "js", "docs", "TACAPatchModel.md")).read()
    with urllib.request.urlopen(f"{server.url}/extensions/comfyui-taca/docs/taca_demo_compare.png", timeout=30) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "image/png"


def test_workflow_templates_list_the_workflows_with_thumbnails(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates.get("comfyui-taca", [])) == sorted(WORKFLOW_NAMES)
    assert set(WORKFLOW_NAMES) == {"tiny_taca_demo", "flux1_dev_taca_compare", "sd35_medium_taca_compare",
                                   "taca_gamma_sweep"}
    for name in WORKFLOW_NAMES:
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/comfyui-taca/{name}.json", timeout=30) as r:
            assert json.loads(r.read()) == load_json(name)
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/comfyui-taca/{name}.jpg", timeout=30) as r:
            assert r.headers["Content-Type"] == "image/jpeg"
            image = Image.open(io.BytesIO(r.read()))
            assert image.format == "JPEG" and image.size == thumbnails.THUMB_SIZE


# ------------------------------------------------------------------------------------------ workflows

@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_workflow_loads_and_converts_like_the_devtools_converter(name, server, object_info, clean_page):
    page = clean_page
    workflow = load(page, name)
    state = page.evaluate("""() => ({
        registered: Object.keys(LiteGraph.registered_node_types),
        nodes: app.graph.nodes.map((n) => ({ id: n.id, type: n.type, errors: !!n.has_errors })),
    })""")
    missing = sorted({n["type"] for n in workflow["nodes"]} - set(state["registered"]))
    assert missing == []
    assert sorted(n["id"] for n in state["nodes"]) == sorted(n["id"] for n in workflow["nodes"])
    assert [n for n in state["nodes"] if n["errors"]] == []

    # every TACA node's schedule plot is drawn, and no other node of the workflow covers it
    for taca_id in [n["id"] for n in workflow["nodes"] if n["type"] == "TACAPatchModel"]:
        focus_taca(page, taca_id)
        d = drawn(page, taca_id)
        assert len(d["plot"]["bars"]) == 30
        assert page.evaluate(bh.OVERLAPS_JS, taca_id) == []

    output = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert output == wfs.ui_to_api(workflow, object_info)

    if name == TINY:
        return  # validated (and run) from the page in test_tiny_demo_runs_from_the_browser
    status, body = server.post("/prompt", {"prompt": output})
    assert status == 400, body
    errors = [(node_id, e) for node_id, ne in body["node_errors"].items() for e in ne["errors"]]
    assert errors, body
    for node_id, e in errors:
        assert e["type"] == "value_not_in_list", (node_id, e)
        assert e["extra_info"]["input_name"] in MODEL_FILE_INPUTS, (node_id, e)
        assert output[node_id]["class_type"] in ("CheckpointLoaderSimple", "UNETLoader", "DualCLIPLoader",
                                                  "TripleCLIPLoader", "VAELoader", "TACALoraLoader"), (node_id, e)


# ------------------------------------------------------------------------------------------ schedule plot

def test_plot_uses_the_nominal_schedule_before_any_run(clean_page):
    page = clean_page
    load(page, TINY)
    node_id = focus_taca(page)
    d = drawn(page, node_id)
    plot = d["plot"]
    assert plot["source"] == "nominal"
    assert plot["sigmas"] == pytest.approx(nominal_comfy_sigmas(), abs=1e-6)
    assert plot["active"] == [i < 3 for i in range(30)]
    assert plot["heights"] == [1.2] * 3 + [1] * 27
    assert "gamma 1.2 on steps 0-2 of 30" in plot["label"] and "nominal 30-step schedule" in plot["label"]
    assert d["feedback"] is None  # no run yet: no feedback lines

    image = bh.screenshot(page)
    for bar in plot["bars"]:
        expected = bh.hex_rgb(ACTIVE if bar["active"] else INACTIVE)
        assert bh.close(bh.pixel(image, bar["centre"]), expected, 3), bar
    # bar heights on the canvas: gamma for the TACA steps, 1 for the others
    active, inactive = plot["bars"][0], plot["bars"][10]
    h_active = bh.column_run(image, active["centre"][0], active["top"][1] - 3, active["bottom"][1] + 3,
                             bh.hex_rgb(ACTIVE))
    h_inactive = bh.column_run(image, inactive["centre"][0], active["top"][1] - 3, inactive["bottom"][1] + 3,
                               bh.hex_rgb(INACTIVE))
    assert h_active / h_inactive == pytest.approx(1.2, abs=0.08)


def test_plot_follows_the_threshold_and_gamma_widgets(clean_page):
    page = clean_page
    load(page, TINY)
    node_id = focus_taca(page)
    before = drawn(page, node_id)
    assert sum(before["plot"]["active"]) == 3

    set_number_widget(page, node_id, "threshold_sigma", 0.9)
    after = drawn(page, node_id, after=before["drawCount"], condition="plot.threshold === 0.9")
    expected = [s >= 0.9 for s in nominal_comfy_sigmas()[:-1]]
    assert sum(expected) == 8
    assert after["plot"]["active"] == expected
    assert sum(after["plot"]["active"]) > sum(before["plot"]["active"])
    assert "gamma 1.2 on steps 0-7 of 30" in after["plot"]["label"]

    set_number_widget(page, node_id, "gamma", 1.5)
    g = drawn(page, node_id, after=after["drawCount"], condition="plot.gamma === 1.5")
    assert g["plot"]["heights"] == [1.5] * 8 + [1] * 22
    bars = g["plot"]["bars"]
    assert bars[0]["h"] / bars[20]["h"] == pytest.approx(1.5, rel=0.02)
    image = bh.screenshot(page)
    h_active = bh.column_run(image, bars[7]["centre"][0], bars[7]["top"][1] - 3, bars[7]["bottom"][1] + 3,
                             bh.hex_rgb(ACTIVE))
    h_inactive = bh.column_run(image, bars[8]["centre"][0], bars[7]["top"][1] - 3, bars[8]["bottom"][1] + 3,
                               bh.hex_rgb(INACTIVE))
    assert h_active / h_inactive == pytest.approx(1.5, abs=0.08)
    assert bh.close(bh.pixel(image, bars[7]["centre"]), bh.hex_rgb(ACTIVE), 3)
    assert bh.close(bh.pixel(image, bars[8]["centre"]), bh.hex_rgb(INACTIVE), 3)

    # the plot is not saved: the node still serialises its three widget values, and the prompt has no extra input
    saved = page.evaluate("(id) => app.graph.serialize().nodes.find((n) => n.id === id).widgets_values", node_id)
    assert saved == [1.5, 0.9, "exact"]


def test_no_taca_node_and_removed_node_are_harmless(clean_page):
    page = clean_page
    page.evaluate("async () => { await app.loadGraphData(); app.canvas.draw(true, true); }")  # the default graph
    result = page.evaluate("""async () => {
        const { api } = await import('/scripts/api.js');
        const before = app.graph.nodes.map((n) => [n.id, n.widgets?.length ?? 0]);
        const id = String(app.graph.nodes[0].id);
        api.dispatchCustomEvent('comfyui-taca.report', { node_id: id, sample_sigmas: [1, 0], acted_steps: [0] });
        api.dispatchCustomEvent('comfyui-taca.report', { node_id: '9999', sample_sigmas: [1, 0] });
        app.canvas.draw(true, true);
        return { before, after: app.graph.nodes.map((n) => [n.id, n.widgets?.length ?? 0]),
                 reports: app.graph.nodes.filter((n) => n.tacaReport).length };
    }""")
    assert result["before"] == result["after"] and result["reports"] == 0

    load(page, TINY)
    node_id = focus_taca(page)
    result = page.evaluate("""async (id) => {
        const { api } = await import('/scripts/api.js');
        const node = app.graph.getNodeById(id);
        app.graph.remove(node);
        api.dispatchCustomEvent('comfyui-taca.report', { node_id: String(id), steps_total: 30, sample_sigmas: [1, 0],
                                                         acted_steps: [0], attention_calls: 1, warning: null });
        app.canvas.draw(true, true);
        const prompt = await app.graphToPrompt();
        return { present: !!app.graph.getNodeById(id), nodes: Object.keys(prompt.output).length };
    }""", node_id)
    assert result == {"present": False, "nodes": 11}  # 13 nodes - the Note - the removed TACA node
    page.wait_for_timeout(200)  # a few animation frames without the node


# ------------------------------------------------------------------------------------------ runs

@pytest.fixture(scope="module")
def demo_run(page, server):
    """The tiny demo run from the page; what the page showed afterwards."""
    load(page, TINY)
    node_id = focus_taca(page)
    started = time.time()
    n_reports = len(bh.events(page, "comfyui-taca.report"))
    response, history = queue_from_page(page, server)
    d = drawn(page, node_id, condition="feedback !== null && plot.source === 'last run'")
    d["overlaps"] = page.evaluate(bh.OVERLAPS_JS, node_id)
    image = bh.screenshot(page)
    save_artifact(page, "tiny_taca_demo_after_run.png")
    reports = bh.events(page, "comfyui-taca.report")[n_reports:]  # this run's only
    return {"node_id": node_id, "response": response, "history": history, "drawn": d, "image": image,
            "reports": reports, "seconds": time.time() - started}


def test_tiny_demo_runs_from_the_browser(demo_run, server, page):
    assert page.taca_errors == []
    assert demo_run["response"]["node_errors"] == {}  # validated fully
    assert demo_run["history"]["status"]["status_str"] == "success", demo_run["history"]["status"]
    images = [img for out in demo_run["history"]["outputs"].values() for img in out.get("images", [])]
    assert len(images) == 1
    img = images[0]
    path = os.path.join(server.workdir, img["type"], img["subfolder"], img["filename"])
    stitched = Image.open(path).convert("RGB")
    assert stitched.size == (256 + 8 + 256, 256)
    left, spacer, right = stitched.crop((0, 0, 256, 256)), stitched.crop((256, 0, 264, 256)), stitched.crop((264, 0, 520, 256))
    assert spacer.getextrema() == ((255, 255),) * 3
    # with TACA (right) differs from without (left): same seed, same model, TACA on the first 3 of 30 steps.
    # On the tiny random-weight model the difference is small (a few levels) but covers much of the image.
    diff = ImageChops.difference(left, right).convert("L")
    changed = 1 - diff.histogram()[0] / (256 * 256)
    assert diff.getbbox() is not None and changed > 0.02, (changed, ImageStat.Stat(diff).extrema)


def test_feedback_shows_the_report_of_the_run(demo_run):
    reports = [r for r in demo_run["reports"] if r["node_id"] == str(demo_run["node_id"])]
    assert len(reports) == 1
    report = reports[0]
    assert report["acted_steps"] == [0, 1, 2] and report["warning"] is None and report["attention_calls"] > 0
    d = demo_run["drawn"]
    feedback = d["feedback"]
    assert feedback["acted_steps"] == [0, 1, 2]
    assert feedback["attention_calls"] == report["attention_calls"]
    text = " ".join(feedback["lines"])
    assert f"TACA acted on steps 0, 1, 2 of 30 · {report['attention_calls']} attention calls" in text
    assert feedback["warningShown"] is False
    assert d["overlaps"] == []  # the node grew to fit the feedback without running into the node below
    plot = d["plot"]
    assert plot["source"] == "last run" and "from last run" in plot["label"]
    assert plot["sigmas"] == report["sample_sigmas"]
    assert plot["active"] == [i in (0, 1, 2) for i in range(30)]
    image = demo_run["image"]
    for bar in plot["bars"][:5]:
        assert bh.close(bh.pixel(image, bar["centre"]), bh.hex_rgb(ACTIVE if bar["active"] else INACTIVE), 3)
    # the feedback text is drawn in the "ok" colour below the bars, and nothing in the warning colour
    box = [d["widgetBox"][0], plot["bars"][0]["bottom"][1] + 2, d["widgetBox"][2], d["widgetBox"][3]]
    assert bh.count_color(image, box, bh.hex_rgb("#8fd694"), 30) > 20
    assert bh.count_color(image, box, bh.hex_rgb(WARNING), 30) == 0
    assert d["titleWarning"] is None and bh.count_color(image, d["titleBox"], bh.hex_rgb(WARNING), 30) == 0


def test_warning_appears_when_the_run_starts_below_the_threshold(demo_run, page, server):
    node_id = demo_run["node_id"]
    ks = page.evaluate("() => app.graph.nodes.find((n) => n.title === 'KSampler (with TACA)').id")
    page.evaluate("""(id) => { const n = app.graph.getNodeById(id); app.canvas.ds.scale = 1;
        app.canvas.ds.offset[0] = 200 - n.pos[0]; app.canvas.ds.offset[1] = 200 - n.pos[1];
        app.canvas.setDirty(true, true); app.canvas.draw(true, true); }""", ks)
    set_number_widget(page, ks, "denoise", 0.8)
    focus_taca(page, node_id)
    n_reports = len(bh.events(page, "comfyui-taca.report"))
    _, history = queue_from_page(page, server)
    assert history["status"]["status_str"] == "success"
    reports = bh.events(page, "comfyui-taca.report")[n_reports:]
    assert len(reports) == 1 and reports[0]["node_id"] == str(node_id)
    warning = reports[0]["warning"]
    assert warning and "below threshold_sigma 0.97" in warning and reports[0]["acted_steps"] == []

    d = drawn(page, node_id, condition="feedback !== null && feedback.warning !== null")
    assert d["feedback"]["warning"] == warning and d["feedback"]["warningShown"]
    shown = " ".join(d["feedback"]["lines"])
    assert warning in shown.replace("⚠ ", "")  # every word of it, wrapped over lines
    assert len(d["feedback"]["lines"]) >= 3
    assert d["plot"]["source"] == "last run" and not any(d["plot"]["active"])
    assert d["plot"]["sigmas"][0] == pytest.approx(reports[0]["sample_sigmas"][0]) and d["plot"]["sigmas"][0] < 0.97
    image = bh.screenshot(page)
    box = [d["widgetBox"][0], d["plot"]["bars"][0]["bottom"][1] + 2, d["widgetBox"][2], d["widgetBox"][3]]
    assert bh.count_color(image, box, bh.hex_rgb(WARNING), 30) > 50
    # flagged in the title bar too, which a node placed below cannot cover
    assert d["titleWarning"]["text"] == "⚠ TACA never acted"
    assert bh.count_color(image, d["titleBox"], bh.hex_rgb(WARNING), 30) > 30
    save_artifact(page, "tiny_taca_demo_warning.png")
    assert page.taca_errors == []
