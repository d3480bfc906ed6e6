"""The headless browser on the real ComfyUI frontend: launch, page set-up, node renderer, workflow loading.

Shared by devtools/thumbnails.py (the template thumbnails) and the browser tests (tests/test_browser.py), so
both see the frontend the same way. Needs Playwright for Python and /usr/bin/chromium (scripts/setup_runtime.sh
installs both); ``TACA_CHROMIUM`` points at another Chromium.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any, Dict

CHROMIUM = os.environ.get("TACA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
# The frontend's settings for a clean, repeatable page: no tutorial / templates dialog, no minimap.
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}
# Only the local server is reachable; everything else (update checks, registry look-ups) fails at once.
NOT_LOOPBACK = re.compile(r"^(?!https?://(127\.0\.0\.1|localhost)[:/])[a-z]+://")
VUE_NODES_SETTING = "Comfy.VueNodes.Enabled"


class RendererMissing(Exception):
    """The frontend has no Vue node renderer (no such setting)."""


def launch_browser(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def open_frontend(browser, url: str, viewport=(1600, 900)):
    """A new page on the ComfyUI frontend at ``url``, once the app and its extensions are ready."""
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]}, device_scale_factor=1)
    context.route(NOT_LOOPBACK, lambda route: route.abort())
    # the "Nodes 2.0" banner above the canvas (the frontend keeps its dismissal in localStorage)
    context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
    page = context.new_page()
    page.goto(url)
    page.wait_for_function("() => window.app && window.app.graph && window.app.vueAppReady && window.app.extensions",
                           timeout=90_000)
    return page


def set_renderer(page, renderer: str) -> None:
    """Switches the node renderer, "classic" (LiteGraph canvas) or "vue" ("Nodes 2.0"), through the
    frontend's settings API, as its settings dialog does, and waits until the canvas uses it."""
    vue = renderer == "vue"
    known = page.evaluate("(id) => app.extensionManager.setting.get(id) !== undefined", VUE_NODES_SETTING)
    if not known:
        if not vue:
            return  # the classic canvas is the only renderer
        version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
        raise RendererMissing(f"frontend {version} has no {VUE_NODES_SETTING} setting: no Vue node renderer")
    page.evaluate("async ([id, on]) => { await app.extensionManager.setting.set(id, on); }", [VUE_NODES_SETTING, vue])
    page.wait_for_function("(on) => !!LiteGraph.vueNodesMode === on", arg=vue, timeout=30_000)


def load_workflow(page, workflow: Dict[str, Any]) -> None:
    """Loads ``workflow`` with the frontend's own ``app.loadGraphData`` and waits until it is drawn."""
    page.evaluate("async (wf) => { await app.loadGraphData(wf); app.canvas.draw(true, true); }", workflow)
    if page.evaluate("() => !!LiteGraph.vueNodesMode"):
        # Vue nodes mount after the graph is loaded
        page.wait_for_function("(n) => document.querySelectorAll('[data-node-id]').length >= n",
                               arg=len(workflow.get("nodes", [])), timeout=30_000)


def screenshot(page):
    """The page as an RGB PIL image, one pixel per CSS pixel."""
    from PIL import Image

    return Image.open(io.BytesIO(page.screenshot(type="png"))).convert("RGB")
