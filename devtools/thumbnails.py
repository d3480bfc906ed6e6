"""Template thumbnails: each workflow in workflows/*.json, loaded in the real (headless) ComfyUI frontend.

    TACA_COMFYUI_VERSION=0.33.0 .runtime/comfyui-0.33.0/venv/bin/python -m devtools.thumbnails   # rewrite workflows/<name>.jpg

The frontend shows them in its Templates dialog, from /api/workflow_templates/comfyui-taca/<name>.jpg.
Needs the runtime (scripts/setup_runtime.sh) and /usr/bin/chromium; starts ComfyUI `main.py --cpu`
on a free loopback port through devtools/comfy_server.py, as the tests do. The browser itself is set up
by devtools/browser.py, as in the browser tests.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import re
import sys
import tempfile
from typing import Any, Dict

from devtools import browser
from devtools.comfy_server import ComfyServer
from devtools.workflows import REPO, WORKFLOWS_DIR

THUMB_SIZE = (640, 360)
# For pictures: no canvas info text or zoom controls, and node text drawn at any zoom.
THUMB_SETTINGS = {"Comfy.Graph.CanvasInfo": False, "Comfy.Graph.CanvasMenu": False, "LiteGraph.Canvas.MinFontSizeForLOD": 1}


def set_focus_mode(page, on: bool = True) -> None:
    """Hide (or show) the menus and side bars around the canvas."""
    page.evaluate("""async (on) => {
        if (!!app.extensionManager.focusMode !== on) await app.extensionManager.command.execute('Workspace.ToggleFocusMode');
    }""", on)
    page.wait_for_timeout(300)


def fit_view(page) -> None:
    """Zoom so that every node is visible, with a margin."""
    page.evaluate("""() => {
        const nodes = app.graph.nodes;
        if (!nodes.length) return;
        let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
        for (const n of nodes) {
            const title = LiteGraph.NODE_TITLE_HEIGHT;
            x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
            x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
        }
        const canvas = app.canvas.canvas, ds = app.canvas.ds;
        const w = canvas.clientWidth, h = canvas.clientHeight, margin = 30;
        const scale = Math.min((w - 2 * margin) / (x1 - x0), (h - 2 * margin) / (y1 - y0), 1.0);
        ds.scale = scale;
        ds.offset[0] = (w / scale - (x1 - x0)) / 2 - x0;
        ds.offset[1] = (h / scale - (y1 - y0)) / 2 - y0;
        app.canvas.setDirty(true, true);
        app.canvas.draw(true, true);
    }""")
    page.wait_for_timeout(300)


# ------------------------------------------------------------------ a throwaway server for this script

MODEL_FOLDERS = ("checkpoints", "diffusion_models", "text_encoders", "vae", "loras")
MODEL_FILE = re.compile(r"\.(safetensors|ckpt|pt|pth|bin|gguf)$")


def _placeholder_models(workflows, workdir: str) -> str:
    """An extra_model_paths config listing an empty file for every model file the workflows name, so the
    frontend draws the loaders as a user with those files sees them (not outlined as missing)."""
    names = {v for wf in workflows for node in wf.get("nodes", []) for v in node.get("widgets_values") or []
             if isinstance(v, str) and MODEL_FILE.search(v)}
    base = os.path.join(workdir, "models")
    for folder in MODEL_FOLDERS:
        os.makedirs(os.path.join(base, folder), exist_ok=True)
        for name in names:
            open(os.path.join(base, folder, name), "wb").close()
    config = os.path.join(workdir, "extra_model_paths.yaml")
    with open(config, "w") as f:
        f.write("placeholders:\n    base_path: " + base + "\n"
                + "".join(f"    {folder}: {folder}\n" for folder in MODEL_FOLDERS))
    return config


def start_server(workdir: str, workflows=()) -> ComfyServer:
    """ComfyUI on loopback (the one server harness), listing a placeholder for each model the workflows name."""
    return ComfyServer(workdir, ("--extra-model-paths-config", _placeholder_models(workflows, workdir))).start()


def screenshot_workflow(page, workflow: Dict[str, Any], size=THUMB_SIZE, quality: int = 80) -> bytes:
    """JPEG bytes of the whole graph of ``workflow``, ``size`` pixels."""
    from PIL import Image

    browser.load_workflow(page, workflow)
    fit_view(page)
    image = browser.screenshot(page).resize(size, Image.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality, optimize=True)
    return out.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="workflow names (default: all in workflows/)")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    paths = sorted(glob.glob(os.path.join(WORKFLOWS_DIR, "*.json")))
    if args.names:
        paths = [p for p in paths if os.path.splitext(os.path.basename(p))[0] in args.names]
    with tempfile.TemporaryDirectory(prefix="taca-thumbs-") as workdir:
        workflows = []
        for path in paths:
            with open(path) as f:
                workflows.append(json.load(f))
        server = start_server(workdir, workflows)
        try:
            server.post("/settings", {**browser.FRONTEND_SETTINGS, **THUMB_SETTINGS})
            with sync_playwright() as pw:
                chromium = browser.launch_browser(pw)
                # twice the thumbnail size, then downscaled: readable titles, no low-quality rendering
                page = browser.open_frontend(chromium, server.url, viewport=(THUMB_SIZE[0] * 2, THUMB_SIZE[1] * 2))
                set_focus_mode(page, True)
                for path, workflow in zip(paths, workflows):
                    target = os.path.splitext(path)[0] + ".jpg"
                    with open(target, "wb") as f:
                        f.write(screenshot_workflow(page, workflow))
                    print("wrote", os.path.relpath(target, REPO))
                chromium.close()
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
