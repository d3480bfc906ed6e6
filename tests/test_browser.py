"""The pack in the real ComfyUI frontend: a headless Chromium (Playwright) against a real `main.py --cpu`.

The matrix: the running ComfyUI version (``TACA_COMFYUI_VERSION``, else its comfyui_version.py) with the
frontend it pins, and on 0.33 also the newest frontend package served with ``--front-end-root``; each in
the classic LiteGraph renderer and in the Vue node renderer ("Nodes 2.0", the ``Comfy.VueNodes.Enabled``
setting, set through the frontend's settings API as the settings dialog does). One server per frontend,
one browser, one page per (frontend, renderer).

The shared workflows are loaded with the frontend's own ``app.loadGraphData`` and converted with its
``app.graphToPrompt``; the tiny demo is run from the page with ``app.queuePrompt`` (what the Run button
does). The schedule plot and the run report are read from what the page shows and what the server sent: the
plot canvas's pixels (its bars, read from the colours) and the page's pixels where it is, the canvas's text
alternative, and the websocket messages (through listeners the tests add to the frontend's api object).

Needs /usr/bin/chromium (scripts/setup_runtime.sh installs it); TACA_SKIP_BROWSER=1 skips the module.
Screenshots go to .artifacts/browser/.
"""

from __future__ import annotations

import glob
import io
import json
import os
import subprocess
import time
import urllib.request

import pytest
from PIL import Image, ImageChops, ImageStat

import browser_helpers as bh
from devtools.comfy_server import ComfyServer
from conftest import REPO
from devtools import comfy_runtime
from taca.settings import format_blocks

if os.environ.get("TACA_SKIP_BROWSER") == "1":
    pytest.skip("TACA_SKIP_BROWSER=1", allow_module_level=True)

from devtools import browser as browser_harness  # noqa: E402  (shared with the thumbnails)
from devtools import thumbnails  # noqa: E402
from devtools import workflows as wfs  # noqa: E402

WORKFLOW_FILES = sorted(glob.glob(os.path.join(REPO, "workflows", "*.json")))
WORKFLOW_NAMES = [os.path.splitext(os.path.basename(p))[0] for p in WORKFLOW_FILES]
TINY = "tiny_taca_demo"
MODEL_FILE_INPUTS = {"ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "clip_name3", "vae_name",
                     "lora_name"}
ARTIFACTS = os.path.join(REPO, ".artifacts", "browser")
MODELS = os.path.join(comfy_runtime.RUNTIME_HOME, "test_models")
LOADER_TYPES = ("CheckpointLoaderSimple", "UNETLoader", "DualCLIPLoader", "TripleCLIPLoader", "VAELoader",
                "TACALoraLoader")
ACTIVE, INACTIVE, OK, WARNING = bh.ACTIVE, bh.INACTIVE, bh.OK, bh.WARNING


def _comfyui_version():
    version = os.environ.get("TACA_COMFYUI_VERSION")
    if version:
        return version
    with open(os.path.join(comfy_runtime.COMFYUI, "comfyui_version.py")) as f:
        return f.read().split('__version__ = "')[1].split('"')[0]


def _pinned_frontend():
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("comfyui-frontend-package")
    except PackageNotFoundError:
        return None


COMFYUI_VERSION = _comfyui_version()
PINNED_FRONTEND = _pinned_frontend()
NEWEST_FRONTEND = subprocess.run(["bash", os.path.join(REPO, "scripts", "setup_runtime.sh"), "--newest-frontend"],
                                 capture_output=True, text=True, check=True).stdout.strip()
NEWEST_FRONTEND_ROOT = os.path.join(comfy_runtime.RUNTIMES, "frontends", NEWEST_FRONTEND)
# ComfyUI 0.3.75's server predates the newest frontend's API; from 0.33 on both are tested.
FRONTENDS = [PINNED_FRONTEND] + ([NEWEST_FRONTEND] if comfy_runtime.version_key(COMFYUI_VERSION) >= (0, 33)
                                 and NEWEST_FRONTEND != PINNED_FRONTEND else [])
RENDERERS = ["classic", "vue"]
VUE_SETTING = "Comfy.VueNodes.Enabled"


def load_json(name):
    with open(os.path.join(REPO, "workflows", name + ".json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module", params=FRONTENDS, ids=lambda v: f"frontend-{v}")
def frontend(request):
    return request.param


@pytest.fixture(scope="module")
def server(frontend, tmp_path_factory):
    from devtools.demo_models import ensure_demo_models

    ensure_demo_models(MODELS)  # cached beside the runtime (git-ignored), reused by later runs
    workdir = str(tmp_path_factory.mktemp("comfy_browser"))
    config = os.path.join(workdir, "extra_model_paths.yaml")
    with open(config, "w") as f:
        f.write(f"tiny:\n    base_path: {MODELS}\n    checkpoints: checkpoints\n    loras: loras\n")
    args = ["--extra-model-paths-config", config]
    if frontend != PINNED_FRONTEND:
        if not os.path.isfile(os.path.join(NEWEST_FRONTEND_ROOT, "index.html")):
            pytest.fail(f"{NEWEST_FRONTEND_ROOT} is missing: run scripts/setup_runtime.sh")
        args += ["--front-end-root", NEWEST_FRONTEND_ROOT]
    srv = ComfyServer(workdir, tuple(args)).start()
    status, _ = srv.post("/settings", dict(browser_harness.FRONTEND_SETTINGS))
    assert status == 200
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(browser_harness.CHROMIUM):
        pytest.fail(f"{browser_harness.CHROMIUM} is missing: run scripts/setup_runtime.sh (it installs Debian chromium), "
                    "or set TACA_SKIP_BROWSER=1")
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    b = browser_harness.launch_browser(pw)
    yield b
    b.close()
    pw.stop()


@pytest.fixture(scope="module", params=RENDERERS)
def renderer(request):
    return request.param


@pytest.fixture(scope="module")
def page(server, browser, frontend, renderer):
    pg = browser_harness.open_frontend(browser, server.url)
    served = pg.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
    assert served == frontend
    try:
        browser_harness.set_renderer(pg, renderer)
    except browser_harness.RendererMissing as err:
        pg.context.close()
        pytest.skip(str(err))
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
    browser_harness.load_workflow(page, workflow)
    return workflow


def focus_taca(page, node_id=None):
    node_id = page.evaluate(bh.FOCUS_TACA_JS, node_id)
    page.evaluate(bh.SETTLE_JS)
    return node_id


def vue_mode(page):
    return page.evaluate("() => !!LiteGraph.vueNodesMode")


def drawn(page, node_id, condition="true", timeout=15_000):
    """The node's plot as the page shows it (``bh.read_plot``), once its text satisfies ``condition``: a JS
    expression over ``text`` (the canvas's text alternative) and ``lines`` (its lines: the label, then the report)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(bh.WAIT_TEXT_JS.replace("CONDITION", condition), arg=node_id, timeout=timeout)
    except PlaywrightTimeout:
        last = page.evaluate(bh.PLOT_JS, node_id)
        pytest.fail(f"node {node_id}: no plot with {condition} in {timeout} ms; last shown: {last and last['text']!r}")
    page.evaluate(bh.SETTLE_JS)
    return bh.read_plot(page, node_id)


def simple_gamma(position, gamma=1.2, threshold=0.97):
    """The TACA Patch Model's gamma at ``position``, from the paper's rule: gamma while t >= t_thresh, else 1."""
    return gamma if position >= threshold and gamma != 1 else 1.0


def set_number_widget(page, node_id, name, value):
    """Types a value into a number widget the way a user does: click it, type, Enter."""
    if vue_mode(page):
        assert page.evaluate(bh.VUE_WIDGET_INPUT_JS, [node_id, name]), f"no input for widget {name} in node {node_id}"
        box = page.locator("[data-taca-target]")
        # a real click at the input (newer frontends lay a drag-to-scrub layer over it), then select its text
        r = box.bounding_box()
        page.mouse.click(r["x"] + r["width"] / 2, r["y"] + r["height"] / 2)
        box.select_text()
        page.keyboard.type(str(value))
        page.keyboard.press("Enter")
        page.keyboard.press("Tab")  # inputs that commit on blur
    else:
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
    combo = page.evaluate("() => `${window.__COMFYUI_FRONTEND_VERSION__}_${LiteGraph.vueNodesMode ? 'vue' : 'classic'}`")
    path = os.path.join(ARTIFACTS, f"comfyui-{COMFYUI_VERSION}_frontend-{combo}_{name}")
    page.screenshot(path=path)
    return path


# ------------------------------------------------------------------------------------------ the extension

def test_extension_is_served_and_registered(server, clean_page):
    # the frontend imports every file listed; the rules module only exports functions for taca.js
    served = server.get("/extensions")
    assert "/extensions/comfyui-taca/taca.js" in served and "/extensions/comfyui-taca/taca_rules.js" in served
    names = clean_page.evaluate("() => app.extensions.map((e) => e.name)")
    assert "comfyui-taca.schedule" in names


def test_node_help_pages_are_served_with_every_input(server, object_info):
    for node in ("TACAPatchModel", "TACAPatchModelAdvanced", "TACALoraLoader"):
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
                                   "taca_gamma_sweep", "world_taca_demo"}
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
        nodes: app.graph.nodes.map((n) => ({ id: String(n.id), type: n.type, errors: !!n.has_errors,
            files: (n.widgets ?? []).filter((w) => Array.isArray(w.options?.values))
                .map((w) => ({ name: w.name, value: w.value, listed: w.options.values.includes(w.value) })) })),
    })""")
    missing = sorted({n["type"] for n in workflow["nodes"]} - set(state["registered"]))
    assert missing == []
    assert sorted(n["id"] for n in state["nodes"]) == sorted(str(n["id"]) for n in workflow["nodes"])
    # newer frontends flag loaders whose model file is not on the server; nothing else may be flagged
    for n in state["nodes"]:
        if n["errors"]:
            unlisted = [f["name"] for f in n["files"] if not f["listed"]]
            assert n["type"] in LOADER_TYPES and set(unlisted) & MODEL_FILE_INPUTS, n

    # every TACA node's schedule plot is drawn, and no other node of the workflow covers it
    for taca_id in [n["id"] for n in workflow["nodes"] if n["type"] == "TACAPatchModel"]:
        focus_taca(page, taca_id)
        d = drawn(page, taca_id)
        assert len(d["bars"]) == 30
        assert all(d["onTop"]), d["onTop"]
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
        assert output[node_id]["class_type"] in LOADER_TYPES, (node_id, e)


# ------------------------------------------------------------------------------------------ schedule plot

def test_plot_uses_the_nominal_schedule_before_any_run(clean_page):
    page = clean_page
    load(page, TINY)
    node_id = focus_taca(page)
    d = drawn(page, node_id)
    expected = [simple_gamma(s) for s in nominal_comfy_sigmas()[:-1]]
    assert expected == [1.2] * 3 + [1.0] * 27  # ComfyUI's own schedule: its first 3 sigmas are >= 0.97
    assert d["active"] == [g != 1 for g in expected]
    assert d["heights"] == pytest.approx(expected, abs=0.05)
    assert d["label"] == "gamma 1.2 on steps 0-2 of 30 (nominal 30-step schedule)"
    assert d["report"] == []  # no run yet: no report lines
    assert bh.count_color(d["canvas"].convert("RGB"), (0, d["base"], *d["canvas"].size), bh.hex_rgb(OK), 30) == 0

    image = bh.screenshot(page)
    for bar in d["bars"]:
        expected_color = bh.hex_rgb(ACTIVE if bar["active"] else INACTIVE)
        assert bh.close(bh.pixel(image, bar["centre"]), expected_color, 3), bar
    # bar heights on the page: gamma for the TACA steps, 1 for the others
    active, inactive = d["bars"][0], d["bars"][10]
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
    assert sum(before["active"]) == 3

    # whole numbers: the Vue number inputs of some frontends take no decimal point from the keyboard
    set_number_widget(page, node_id, "gamma", 2)
    g = drawn(page, node_id, condition="text.startsWith('gamma 2 ')")
    assert g["label"] == "gamma 2 on steps 0-2 of 30 (nominal 30-step schedule)"
    assert g["heights"] == pytest.approx([2] * 3 + [1] * 27, abs=0.05)
    bars = g["bars"]
    assert bars[0]["h"] / bars[20]["h"] == pytest.approx(2, rel=0.04)
    image = bh.screenshot(page)
    h_active = bh.column_run(image, bars[2]["centre"][0], bars[2]["top"][1] - 3, bars[2]["bottom"][1] + 3,
                             bh.hex_rgb(ACTIVE))
    h_inactive = bh.column_run(image, bars[3]["centre"][0], bars[2]["top"][1] - 3, bars[3]["bottom"][1] + 3,
                               bh.hex_rgb(INACTIVE))
    assert h_active / h_inactive == pytest.approx(2, abs=0.12)
    assert bh.close(bh.pixel(image, bars[3]["centre"]), bh.hex_rgb(INACTIVE), 3)

    set_number_widget(page, node_id, "threshold_sigma", 0)
    after = drawn(page, node_id, condition="text.startsWith('gamma 2 on steps 0-29 ')")
    assert after["active"] == [True] * 30  # 0 means every step
    assert after["heights"] == pytest.approx([2] * 30, abs=0.05)
    assert after["label"] == "gamma 2 on steps 0-29 of 30 (nominal 30-step schedule)"
    image = bh.screenshot(page)
    for i in (3, 15, 29):  # drawn inactive before, active now
        assert bh.close(bh.pixel(image, after["bars"][i]["centre"]), bh.hex_rgb(ACTIVE), 3), i
    assert all(after["onTop"]), after["onTop"]
    save_artifact(page, "tiny_taca_demo_widgets_changed.png")

    # the plot is not saved: the node still serialises its three widget values, and the prompt has no extra input
    saved = page.evaluate("(id) => app.graph.serialize().nodes.find((n) => String(n.id) === String(id)).widgets_values",
                          node_id)
    assert saved == [2, 0, "exact"]


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
        await new Promise((resolve) => requestAnimationFrame(() => resolve()));
        return { before, after: app.graph.nodes.map((n) => [n.id, n.widgets?.length ?? 0]),
                 plots: document.querySelectorAll('.comfyui-taca-schedule').length };
    }""")
    assert result["before"] == result["after"] and result["plots"] == 0

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
    assert result == {"present": False, "nodes": 13}  # 15 nodes - the Note - the removed TACA node
    page.wait_for_timeout(200)  # a few animation frames without the node


# ------------------------------------------------------------------------------------------ runs

# Adds a "Preview as Text" node (ComfyUI's PreviewAny) showing the TACA Probe Report's JSON output, as a user
# does to read it, to the right of the graph; returns its id.
ADD_JSON_PREVIEW_JS = """() => {
    const report = app.graph.nodes.find((n) => n.type === 'TACAProbeReport');
    const preview = LiteGraph.createNode('PreviewAny');
    preview.pos = [Math.max(...app.graph.nodes.map((n) => n.pos[0] + n.size[0])) + 100, report.pos[1]];
    app.graph.add(preview);
    report.connect(1, preview, 0);
    return preview.id;
}"""


@pytest.fixture(scope="module")
def demo_run(page, server):
    """The tiny demo run from the page (with the probe's JSON shown by a Preview as Text node); what the page
    showed afterwards."""
    # the server is shared by both renderers: drop its cached outputs so that this page's run samples again
    status, _ = server.post("/free", {"free_memory": True})
    assert status == 200
    time.sleep(1.0)
    load(page, TINY)
    preview_id = page.evaluate(ADD_JSON_PREVIEW_JS)
    node_id = focus_taca(page)
    started = time.time()
    n_reports = len(bh.events(page, "comfyui-taca.report"))
    response, history = queue_from_page(page, server)
    d = drawn(page, node_id, condition="text.includes('(from last run)') && lines.length > 1")
    d["overlaps"] = page.evaluate(bh.OVERLAPS_JS, node_id)
    image = bh.screenshot(page)
    save_artifact(page, "tiny_taca_demo_after_run.png")
    reports = bh.events(page, "comfyui-taca.report")[n_reports:]  # this run's only
    return {"node_id": node_id, "preview_id": preview_id, "vue": vue_mode(page), "response": response, "history": history, "drawn": d, "image": image,
            "reports": reports, "seconds": time.time() - started}


def test_tiny_demo_runs_from_the_browser(demo_run, server, page):
    assert page.taca_errors == []
    assert demo_run["response"]["node_errors"] == {}  # validated fully
    assert demo_run["history"]["status"]["status_str"] == "success", demo_run["history"]["status"]
    images = [img for out in demo_run["history"]["outputs"].values() for img in out.get("images", [])
              if img["type"] == "output"]  # the saved comparison (the probe report's plot is a temp preview)
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


PROBE_PREVIEW_JS = """(name) => {
    const node = app.graph.nodes.find((n) => n.type === 'TACAProbeReport');
    const shown = [...(node.imgs || []), ...document.querySelectorAll('img')]
        .filter((img) => img.complete && img.naturalWidth > 0 && (img.src || '').includes(encodeURIComponent(name)));
    if (!shown.length) return null;
    const img = shown[0];
    const canvas = document.createElement('canvas');
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const ctx = canvas.getContext('2d');
    ctx.drawImage(img, 0, 0);
    const at = (x, y) => Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3));
    const points = [[10, 10], [300, 200], [640, 140], [820, 140], [700, 290]];
    return {width: img.naturalWidth, height: img.naturalHeight, inDom: img.isConnected,
            nodeImgs: (node.imgs || []).length, points, pixels: points.map(([x, y]) => at(x, y))};
}"""


def test_probe_report_shows_its_plot_after_the_demo_run(demo_run, server, page):
    """The report node's preview is the plot the node drew: its size and pixels are those of the saved PNG.

    Right after the demo run, before any test loads another graph into the page (that drops the node's preview)."""
    outputs = demo_run["history"]["outputs"]
    report_id = next(k for k, v in demo_run["history"]["prompt"][2].items() if v["class_type"] == "TACAProbeReport")
    image = outputs[report_id]["images"][0]
    assert image["type"] == "temp"
    query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=30) as r:
        plot = Image.open(io.BytesIO(r.read())).convert("RGB")
    assert plot.size == (960, 400)
    # the JSON output, as the Preview as Text node got it
    data = json.loads(outputs[str(demo_run["preview_id"])]["text"][0])
    assert len(data["steps"]) == 3 and data["heatmap"]["height"] * data["heatmap"]["width"] == 256
    page.wait_for_function(f"() => ({PROBE_PREVIEW_JS})({json.dumps(image['filename'])}) !== null", timeout=30_000)
    shown = page.evaluate(PROBE_PREVIEW_JS, image["filename"])
    assert (shown["width"], shown["height"]) == plot.size
    for (x, y), rgb in zip(shown["points"], shown["pixels"]):
        assert bh.close(tuple(rgb), plot.getpixel((x, y)), 3), ((x, y), rgb, plot.getpixel((x, y)))
    if vue_mode(page):
        assert shown["inDom"]  # Nodes 2.0 shows the preview as an image element in the node
    else:
        assert shown["nodeImgs"] >= 1  # LiteGraph draws node.imgs on the canvas
    assert page.taca_errors == []


def test_feedback_shows_the_report_of_the_run(demo_run):
    reports = [r for r in demo_run["reports"] if r["node_id"] == str(demo_run["node_id"])]
    assert len(reports) == 1
    report = reports[0]
    assert report["acted_steps"] == [0, 1, 2] and report["warning"] is None and report["attention_calls"] > 0
    # the node shows the server's summary as it was sent, the line the server logs
    assert report["summary"].startswith(f"TACA acted on steps 0, 1, 2 of 30 (sigma >= 0.97, gamma 1.2, exact): "
                                        f"{report['attention_calls']} joint attention calls")
    d = demo_run["drawn"]
    assert d["report"] == [report["summary"]]
    assert d["overlaps"] == []  # the node grew to fit the report without running into the node below
    # the bars are the run's steps now: a TACA step where the run's position is >= threshold_sigma
    assert d["label"] == "gamma 1.2 on steps 0-2 of 30 (from last run)"
    assert d["active"] == [p >= 0.97 for p in report["sample_positions"][:-1]] == [i in (0, 1, 2) for i in range(30)]
    assert d["heights"] == pytest.approx([simple_gamma(p) for p in report["sample_positions"][:-1]], abs=0.05)
    image = demo_run["image"]
    for bar in d["bars"][:5]:
        assert bh.close(bh.pixel(image, bar["centre"]), bh.hex_rgb(ACTIVE if bar["active"] else INACTIVE), 3)
    # the report is drawn in the "ok" colour below the bars, and nothing in the warning colour
    box = [d["widgetBox"][0], d["bars"][0]["bottom"][1] + 2, d["widgetBox"][2], d["widgetBox"][3]]
    assert bh.count_color(image, box, bh.hex_rgb(OK), 30) > 20
    assert bh.count_color(image, box, bh.hex_rgb(WARNING), 30) == 0
    if not demo_run["vue"]:
        assert bh.count_color(image, d["titleBox"], bh.hex_rgb(WARNING), 30) == 0


def test_warning_appears_when_the_run_starts_below_the_threshold(demo_run, page, server):
    node_id = demo_run["node_id"]
    ks = page.evaluate("() => app.graph.nodes.find((n) => n.title === 'KSampler (with TACA)').id")
    page.evaluate("""(id) => { const n = app.graph.getNodeById(id); app.canvas.ds.scale = 1;
        app.canvas.ds.offset[0] = 200 - n.pos[0]; app.canvas.ds.offset[1] = 200 - n.pos[1];
        app.canvas.setDirty(true, true); app.canvas.draw(true, true); }""", ks)
    page.evaluate(bh.SETTLE_JS)
    if demo_run["vue"]:
        # what a Vue number input does on a change (typing 0.8 is not possible in every frontend's)
        page.evaluate("(id) => { const w = app.graph.getNodeById(id).widgets.find((x) => x.name === 'denoise');"
                      " w.value = 0.8; w.callback?.(0.8); }", ks)
    else:
        set_number_widget(page, ks, "denoise", 0.8)
    focus_taca(page, node_id)
    n_reports = len(bh.events(page, "comfyui-taca.report"))
    _, history = queue_from_page(page, server)
    assert history["status"]["status_str"] == "success"
    reports = bh.events(page, "comfyui-taca.report")[n_reports:]
    assert len(reports) == 1 and reports[0]["node_id"] == str(node_id)
    warning = reports[0]["warning"]
    assert warning and "below threshold_sigma 0.97" in warning and reports[0]["acted_steps"] == []
    assert reports[0]["summary"] == warning and reports[0]["sample_sigmas"][0] < 0.97

    d = drawn(page, node_id, condition="text.includes('⚠ TACA never acted')")
    assert d["report"] == ["⚠ " + warning]
    assert d["label"] == "gamma 1.2 on no step of 30: no sigma >= 0.97 (from last run)"
    assert not any(d["active"]) and len(d["bars"]) == 30
    # every word of it is drawn, wrapped over lines below the bars, in the warning colour
    assert bh.text_rows(d["canvas"], d["base"], bh.WARNING) >= 3
    image = bh.screenshot(page)
    box = [d["widgetBox"][0], d["bars"][0]["bottom"][1] + 2, d["widgetBox"][2], d["widgetBox"][3]]
    assert bh.count_color(image, box, bh.hex_rgb(WARNING), 30) > 50
    assert all(d["onTop"]), d["onTop"]
    if not demo_run["vue"]:
        # flagged in the classic canvas's title bar too, which a node placed below cannot cover
        assert bh.count_color(image, d["titleBox"], bh.hex_rgb(WARNING), 30) > 30
    save_artifact(page, "tiny_taca_demo_warning.png")
    assert page.taca_errors == []


# ------------------------------------------------------------------------------------------ the Advanced node

# gamma, sigma_start, sigma_end, ramp, blocks, target_share, mode: a window that leaves out step 0, a falling ramp,
# the second of the tiny demo model's 2 joint attention calls and two it does not make, and an adaptive gamma
ADVANCED_INPUTS = [1.5, 0.99, 0.8, "linear", "1,5-6", 0.6, "exact"]


def advanced_demo():
    """The tiny demo with its TACA Patch Model replaced by an Advanced one (ADVANCED_INPUTS), and the nodes below
    it moved down to make room for its widgets."""
    workflow = load_json(TINY)
    node = next(n for n in workflow["nodes"] if n["type"] == "TACAPatchModel")
    node.update(type="TACAPatchModelAdvanced", widgets_values=list(ADVANCED_INPUTS), size=[340, 560],
                properties={"Node name for S&R": "TACAPatchModelAdvanced"})
    for other in workflow["nodes"]:
        if other is not node and other["pos"][1] > node["pos"][1] and abs(other["pos"][0] - node["pos"][0]) < 200:
            other["pos"] = [other["pos"][0], other["pos"][1] + 500]
    return workflow, node["id"]


def ramp_gamma(position, gamma=ADVANCED_INPUTS[0], start=ADVANCED_INPUTS[1], end=ADVANCED_INPUTS[2]):
    """The linear ramp's gamma at ``position``, from the node's documented formula."""
    if not end <= position <= start:
        return 1.0
    return 1.0 + (gamma - 1.0) * (position - end) / (start - end)


def test_advanced_node_shows_its_window_ramp_blocks_and_gammas(page, server):
    before_errors = len(page.taca_errors)
    status, _ = server.post("/free", {"free_memory": True})  # the other renderer's run is cached otherwise
    assert status == 200
    time.sleep(1.0)
    workflow, node_id = advanced_demo()
    load(page, workflow)
    focus_taca(page, node_id)
    nominal = drawn(page, node_id)
    sigmas = nominal_comfy_sigmas()[:-1]
    nominal_steps = [i for i, s in enumerate(sigmas) if ramp_gamma(s) != 1.0]
    assert nominal["label"] == (f"gamma 1.5→1 (linear) on steps {format_blocks(nominal_steps)} of 30, window sigma "
                                "0.8-0.99 (nominal 30-step schedule)")
    assert nominal["activeSteps"] == nominal_steps
    assert nominal["heights"] == pytest.approx([ramp_gamma(s) for s in sigmas], abs=0.05)

    n_reports = len(bh.events(page, "comfyui-taca.report"))
    _, history = queue_from_page(page, server)
    assert history["status"]["status_str"] == "success", history["status"]
    reports = [r for r in bh.events(page, "comfyui-taca.report")[n_reports:] if r["node_id"] == str(node_id)]
    assert len(reports) == 1
    report = reports[0]
    d = drawn(page, node_id, condition="text.includes('(from last run)') && lines.length > 1")
    image = bh.screenshot(page)
    save_artifact(page, "tiny_taca_demo_advanced_after_run.png")

    # the run: the window's steps, the one block the model has, the blocks it has not, gammas within the ramp's
    positions = report["sample_positions"][:-1]
    expected_steps = [i for i, p in enumerate(positions) if ramp_gamma(p) != 1.0]
    assert 0 not in expected_steps and len(expected_steps) >= 3
    assert report["acted_steps"] == expected_steps and report["warning"] is None
    assert (report["sigma_start"], report["sigma_end"], report["ramp"], report["blocks"], report["target_share"]) == (
        0.99, 0.8, "linear", "1,5-6", 0.6)
    assert report["joint_calls_per_model_call"] == 2 and report["acted_blocks"] == [1]
    assert report["blocks_beyond"] == [5, 6]
    assert report["blocks_warning"].startswith(
        "blocks 5-6 name joint attention calls this model does not make: it makes 2 per model call")
    for entry in report["step_gammas"]:
        assert entry["gammas"][0] == 1.0 and 1.0 <= entry["gammas"][1] <= ramp_gamma(entry["sigma"]) + 1e-9

    # what is shown: bars of the ramp at the run's positions, the server's summary (it names the blocks acted on
    # and each step's gammas) and, on its own line in the warning colour, the blocks beyond the model
    assert d["heights"] == pytest.approx([ramp_gamma(p) for p in positions], abs=0.05)
    assert d["activeSteps"] == expected_steps
    assert d["label"] == (f"gamma 1.5→1 (linear) on steps {format_blocks(expected_steps)} of 30, window sigma "
                          "0.8-0.99 (from last run)")
    assert d["report"] == [report["summary"], "⚠ " + report["blocks_warning"]]
    assert "Blocks 1,5-6: acted on 1 of 2 joint calls per model call." in report["summary"]
    assert "Gamma per step, adaptive towards share 0.6: " in report["summary"]

    bars = d["bars"]
    for bar in bars:
        expected = ACTIVE if bar["active"] else INACTIVE
        assert bh.close(bh.pixel(image, bar["centre"]), bh.hex_rgb(expected), 3), bar
    first, off = bars[expected_steps[0]], bars[0]
    h_first = bh.column_run(image, first["centre"][0], first["top"][1] - 3, first["bottom"][1] + 3, bh.hex_rgb(ACTIVE))
    h_off = bh.column_run(image, off["centre"][0], first["top"][1] - 3, off["bottom"][1] + 3, bh.hex_rgb(INACTIVE))
    assert h_first / h_off == pytest.approx(ramp_gamma(positions[expected_steps[0]]), abs=0.1)
    assert bars[expected_steps[0]]["h"] > bars[expected_steps[-1]]["h"]  # the ramp falls over the window
    box = [d["widgetBox"][0], bars[0]["bottom"][1] + 2, d["widgetBox"][2], d["widgetBox"][3]]
    assert bh.count_color(image, box, bh.hex_rgb(OK), 30) > 20
    assert bh.count_color(image, box, bh.hex_rgb(WARNING), 30) > 30  # the blocks warning
    assert all(d["onTop"]), d["onTop"]
    if not vue_mode(page):
        assert bh.count_color(image, d["titleBox"], bh.hex_rgb(WARNING), 30) == 0  # TACA acted: no "never acted" flag
    assert page.taca_errors[before_errors:] == []
