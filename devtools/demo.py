"""The README's demo command: a TACA comparison run on a real, headless ComfyUI server.

    bash scripts/demo.sh                       # the compositional-world model, CPU, a few minutes
    bash scripts/demo.sh --models ~/ComfyUI/models   # your FLUX.1-dev or SD3.5-Medium files
    bash scripts/demo.sh --tiny                # the tiny random-weight models (noise; the tests' workflow)

It writes the model files if needed (no download), starts ComfyUI on loopback with this pack, submits the
comparison workflow in the API format the frontend produces (``devtools.workflows.ui_to_api`` over the
server's ``/object_info``), shows progress, stops the server, and writes to ``demo_output/``:
``taca_compare.png``, ``taca_probe.png`` and ``taca_probe.json`` (what the TACA Attention Probe measured: the
image-to-text attention share, plain vs TACA) and ``report.md``.

On the world model the workflow runs once for each category's first held-out prompt (chosen before any image
was made), and the checker (``taca_eval.checker``) writes its verdict under each image: without TACA | with
TACA, same seed. On the other models: without TACA | with TACA | difference.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time
import urllib.parse
import uuid
from typing import Any, Dict, List, Optional, Tuple

from . import comfy_runtime, workflows
from .comfy_server import ComfyServer, port_in_use

REPO = comfy_runtime.REPO
DEFAULT_OUT = os.path.join(REPO, "demo_output")
TINY_MODELS = os.path.join(comfy_runtime.RUNTIME_HOME, "demo_models")
WORLD_MODELS = os.path.join(comfy_runtime.RUNTIME_HOME, "world_models")
WORLD = "world_taca_demo"

# Real-model workflows: (workflow, {folder: [files]} it needs, base-model words for finding the TACA LoRA)
REAL = [
    ("flux1_dev_taca_compare", {"diffusion_models": ["flux1-dev.safetensors"],
                                "clip": ["clip_l.safetensors", "t5xxl_fp16.safetensors"], "vae": ["ae.safetensors"]},
     ("flux",)),
    ("sd35_medium_taca_compare", {"checkpoints": ["sd3.5_medium.safetensors"],
                                  "clip": ["clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"]},
     ("sd3", "sd35", "sd3.5")),
]
FOLDER_ALIASES = {"diffusion_models": ("diffusion_models", "unet"), "clip": ("text_encoders", "clip"),
                  "checkpoints": ("checkpoints",), "vae": ("vae",), "loras": ("loras",)}


class DemoError(RuntimeError):
    pass


def find_file(models_dir: str, folder: str, name: str) -> Optional[str]:
    for sub in FOLDER_ALIASES[folder]:
        path = os.path.join(models_dir, sub, name)
        if os.path.isfile(path):
            return path
    return None


def choose_workflow(models_dir: Optional[str], tiny: bool = False) -> Tuple[str, Dict[str, Any], Optional[str], List[str]]:
    """(workflow name, UI workflow, models dir, notes)."""
    if models_dir is None and tiny:
        from .demo_models import ensure_demo_models

        print("[demo] tiny built-in models:", os.path.relpath(TINY_MODELS, REPO))
        ensure_demo_models(TINY_MODELS)
        return "tiny_taca_demo", workflows.WORKFLOWS["tiny_taca_demo"](), TINY_MODELS, []
    if models_dir is None:
        from .world_model import ensure_checkpoint

        print("[demo] the compositional-world model:", os.path.relpath(ensure_checkpoint(WORLD_MODELS), REPO))
        return WORLD, workflows.WORKFLOWS[WORLD](), WORLD_MODELS, []
    models_dir = os.path.abspath(os.path.expanduser(models_dir))
    if not os.path.isdir(models_dir):
        raise DemoError(f"--models {models_dir}: no such folder")
    looked = []
    for name, needs, lora_words in REAL:
        missing = [f"{folder}/{f}" for folder, files in needs.items() for f in files if not find_file(models_dir, folder, f)]
        if missing:
            looked.append(f"{name}: missing {', '.join(missing)}")
            continue
        workflow = workflows.WORKFLOWS[name]()
        notes = [_set_lora(workflow, models_dir, lora_words)]
        return name, workflow, models_dir, notes
    raise DemoError("no complete FLUX.1-dev or SD3.5-Medium model set under " + models_dir + ":\n  " + "\n  ".join(looked))


def _set_lora(workflow: Dict[str, Any], models_dir: str, words) -> str:
    node = next(n for n in workflow["nodes"] if n["type"] == "TACALoraLoader")
    folder = os.path.join(models_dir, "loras")
    candidates = []
    if os.path.isdir(folder):
        for root, _, files in os.walk(folder):
            for f in files:
                rel = os.path.relpath(os.path.join(root, f), folder)
                low = rel.lower()
                if "taca" in low and low.endswith(".safetensors") and any(w in low for w in words):
                    candidates.append(rel)
    if candidates:
        node["widgets_values"][0] = sorted(candidates)[-1]
        return f"TACA LoRA: {node['widgets_values'][0]}"
    node["mode"] = workflows.BYPASSED
    return "no TACA LoRA found in loras/ (a .safetensors with 'taca' and the model name in it): LoRA loader bypassed"


def write_paths_config(models_dir: str, workdir: str) -> str:
    path = os.path.join(workdir, "extra_model_paths.yaml")
    lines = ["taca_demo:", f"    base_path: {models_dir}"]
    for comfy_name, subs in (("checkpoints", ["checkpoints"]), ("diffusion_models", ["diffusion_models", "unet"]),
                             ("text_encoders", ["text_encoders", "clip"]), ("clip", ["clip", "text_encoders"]),
                             ("vae", ["vae"]), ("loras", ["loras"])):
        lines.append(f"    {comfy_name}: |")
        lines.extend(f"        {s}" for s in subs)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


async def run_prompt(server: ComfyServer, prompt: Dict[str, Any], titles: Dict[str, str]) -> Dict[str, Any]:
    """Queue the prompt and follow it over the websocket: progress lines, per-node times, TACA reports."""
    import aiohttp

    client_id = uuid.uuid4().hex
    started: Dict[str, float] = {}
    durations: Dict[str, float] = {}
    steps_seen: Dict[str, List[float]] = {}  # node -> [time of step 1, time of the last step, steps]
    reports: List[Dict[str, Any]] = []
    notices: List[str] = []
    current: Optional[str] = None
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}") as ws:
            async with session.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                body = await r.json()
                if r.status != 200:
                    raise DemoError("the server refused the workflow:\n" + json.dumps(body, indent=1)[:3000])
            prompt_id = body["prompt_id"]
            t0 = time.perf_counter()
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    continue  # previews and progress text frames
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                event = json.loads(msg.data)
                kind, data = event.get("type"), event.get("data", {})
                now = time.perf_counter()
                if kind == "executing" and data.get("prompt_id") == prompt_id:
                    if current is not None:
                        durations[current] = now - started[current]
                    current = data.get("node")
                    if current is None:
                        break
                    started[current] = now
                    print(f"\r[demo] {now - t0:6.1f}s  {titles.get(current, current):<40}", end="", flush=True)
                elif kind == "progress" and data.get("prompt_id", prompt_id) == prompt_id:
                    node = data.get("node")
                    seen = steps_seen.setdefault(node, [now, now, 0])
                    seen[1], seen[2] = now, data["value"]
                    print(f"\r[demo] {now - t0:6.1f}s  {titles.get(node, node):<40} step {data['value']}/{data['max']}",
                          end="", flush=True)
                elif kind == "comfyui-taca.report":
                    reports.append(data)
                elif kind == "execution_error":
                    print()
                    raise DemoError(f"node {data.get('node_type')} failed: {data.get('exception_message')}")
            print()
    history = server.get(f"/history/{prompt_id}")[prompt_id]
    # Sampling time without model loading: from the end of step 1 to the end of the last step, per step.
    per_step = {node: (t1 - t0) / (n - 1) for node, (t0, t1, n) in steps_seen.items() if n > 1}
    return {"durations": durations, "per_step": per_step, "reports": reports, "history": history, "notices": notices}


def fetch_image(server: ComfyServer, history: Dict[str, Any], node_id: str):
    from PIL import Image
    import urllib.request

    image = history["outputs"][node_id]["images"][0]
    query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image["subfolder"],
                                    "type": image["type"]})
    with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=60) as r:
        return Image.open(io.BytesIO(r.read())).convert("RGB")


PROBE_TEXT_ID = "taca-probe-json"


def show_probe_json(prompt: Dict[str, Any]) -> None:
    """Add to the prompt a core Preview as Text node on the TACA Probe Report's json output, as a user would to
    read the numbers (the report node itself shows its plot)."""
    report_id = next((k for k, v in prompt.items() if v["class_type"] == "TACAProbeReport"), None)
    if report_id is not None:
        prompt[PROBE_TEXT_ID] = {"class_type": "PreviewAny", "inputs": {"source": [report_id, 1]},
                                 "_meta": {"title": "TACA probe numbers"}}


def fetch_probe(server: ComfyServer, history: Dict[str, Any], prompt: Dict[str, Any]):
    """(plot, measurements) of the workflow's TACA Probe Report, or None when it has none."""
    report_id = next((k for k, v in prompt.items() if v["class_type"] == "TACAProbeReport"), None)
    if report_id is None or report_id not in history["outputs"] or PROBE_TEXT_ID not in history["outputs"]:
        return None
    return fetch_image(server, history, report_id), json.loads(history["outputs"][PROBE_TEXT_ID]["text"][0])


def mean_shares(data: Dict[str, Any]) -> Tuple[float, float]:
    """The probe's text share (plain, with TACA's gamma), averaged over its steps, joint calls and batch entries."""
    plain = [s for step in data["steps"] for call in step["calls"] for s in call["share_plain"]]
    scaled = [s for step in data["steps"] for call in step["calls"] for s in call["share_taca"]]
    return sum(plain) / max(len(plain), 1), sum(scaled) / max(len(scaled), 1)


def probe_note(data: Dict[str, Any]) -> str:
    plain, scaled = mean_shares(data)
    return (f"TACA Attention Probe: on the {len(data['steps'])} recorded steps the image tokens give the text "
            f"{plain:.4f} of their attention without TACA and {scaled:.4f} with TACA's gamma (mean over steps, joint "
            "calls and batch entries); plot in taca_probe.png, numbers in taca_probe.json.")


def halves(stitched, spacing: int = 8):
    """(without TACA, with TACA) from the workflow's image stitched side by side."""
    width = (stitched.width - spacing) // 2
    return (stitched.crop((0, 0, width, stitched.height)),
            stitched.crop((width + spacing, 0, 2 * width + spacing, stitched.height)))


def comparison(stitched, spacing: int = 8):
    """Captioned panels from the workflow's stitched image: without TACA | with TACA | their difference."""
    from PIL import Image, ImageChops, ImageDraw

    left, right = halves(stitched, spacing)
    width = left.width
    diff = ImageChops.difference(left, right)
    peak = max(hi for _, hi in diff.getextrema()) or 1
    diff = diff.point(lambda v: min(255, v * 255 // peak))
    bar = 28
    out = Image.new("RGB", (3 * width + 2 * spacing, stitched.height + bar), "white")
    draw = ImageDraw.Draw(out)
    for i, (panel, caption) in enumerate(((left, "without TACA"), (right, "with TACA (+ TACA LoRA)"),
                                          (diff, f"difference (x{255 / peak:.0f})"))):
        x = i * (width + spacing)
        out.paste(panel, (x, bar))
        draw.text((x + 6, 8), caption, fill="black")
    return out


def set_prompt_text(prompt: Dict[str, Any], text: str) -> Dict[str, Any]:
    """A copy of the API prompt with the positive prompt (the node titled "Prompt") set to ``text``."""
    out = json.loads(json.dumps(prompt))
    node = next(v for v in out.values() if v["_meta"]["title"] == "Prompt")
    node["inputs"]["text"] = text
    return out


def verdicts(scenes, images) -> List[Tuple[dict, dict]]:
    """The checker's result for each (without TACA, with TACA) pair of images."""
    import numpy as np

    from taca_eval import checker

    return [tuple(checker.score_all(scene, np.asarray(img)) for img in halves(image))
            for scene, image in zip(scenes, images)]


def world_comparison(scenes, images, results, spacing: int = 8):
    """One column per prompt, without TACA above and with TACA below (same seed), the checker's verdict and
    what it saw under each image."""
    from PIL import Image, ImageDraw, ImageFont

    side = halves(images[0])[0].width
    font = ImageFont.load_default(size=13)
    label, title, caption = 120, 40, 40
    row_h = side + caption
    out = Image.new("RGB", (label + len(images) * (side + spacing), title + 2 * row_h), "white")
    draw = ImageDraw.Draw(out)
    for r, text in enumerate(("without\nTACA", "with TACA\n(gamma 1.2)")):
        draw.multiline_text((6, title + r * row_h + side // 2 - 14), text, fill="black", font=font)
    for col, (scene, image, pair) in enumerate(zip(scenes, images, results)):
        x = label + col * (side + spacing)
        draw.multiline_text((x + 2, 2), f"{scene.category}:\n{scene.prompt}", fill="black", font=font)
        for row, (panel, result) in enumerate(zip(halves(image), pair)):
            y = title + row * row_h
            out.paste(panel, (x, y))
            ok = result["score"] == 1.0
            draw.text((x + 2, y + side + 3), f"checker: {'follows' if ok else 'misses'} the prompt",
                      fill=(0, 120, 0) if ok else (180, 0, 0), font=font)
            draw.text((x + 2, y + side + 20), f"saw: {result['seen']}"[:40], fill="black", font=font)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=os.environ.get("TACA_MODELS_DIR"),
                        help="a ComfyUI models folder with FLUX.1-dev or SD3.5-Medium files (default: the built-in "
                             "compositional-world model)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random-weight models instead (images are noise)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("TACA_DEMO_PORT", "8199")))
    parser.add_argument("--out", default=DEFAULT_OUT, help="where to write taca_compare.png and report.md")
    parser.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU (default: --cpu for the built-in models)")
    args = parser.parse_args(argv)
    try:
        comfy_runtime.activate(cpu=True)
        if port_in_use(args.port):
            raise DemoError(f"port {args.port} on 127.0.0.1 is already in use (another ComfyUI?). "
                            f"Stop it or choose another port: --port N (or TACA_DEMO_PORT=N).")
        name, workflow, models_dir, notes = choose_workflow(args.models, args.tiny)
        for note in notes:
            print("[demo]", note)
        scenes = workflows.world_demo_scenes() if name == WORLD else [None]
        os.makedirs(args.out, exist_ok=True)
        runs = []
        with tempfile.TemporaryDirectory(prefix="taca_demo_") as workdir:
            server = ComfyServer(workdir, ("--extra-model-paths-config", write_paths_config(models_dir, workdir)),
                                 port=args.port, cpu=not (args.gpu or args.models))
            print(f"[demo] starting ComfyUI on {server.url} (log: kept in the report on failure)")
            try:
                server.start()
                object_info = server.get("/object_info")
                base = workflows.ui_to_api(workflow, object_info)
                show_probe_json(base)
                titles = {k: v["_meta"]["title"] for k, v in base.items()}
                save_id = next(k for k, v in base.items() if v["class_type"] == "SaveImage")
                t0 = time.perf_counter()
                for scene in scenes:
                    prompt = base if scene is None else set_prompt_text(base, scene.prompt)
                    print(f"[demo] running {name} ({len(prompt)} nodes)" + (f": {scene.prompt}" if scene else ""))
                    result = asyncio.run(run_prompt(server, prompt, titles))
                    runs.append((result, fetch_image(server, result["history"], save_id),
                                 fetch_probe(server, result["history"], prompt)))
                total = time.perf_counter() - t0
            except Exception:
                log_tail = server.log()[-3000:] if os.path.exists(server.log_path) else ""
                if log_tail:
                    print("[demo] server log (tail):\n" + log_tail, file=sys.stderr)
                raise
            finally:
                server.stop()
                print("[demo] server stopped")
        png = os.path.join(args.out, "taca_compare.png")
        images = [image for _, image, _ in runs]
        checked = verdicts(scenes, images) if name == WORLD else None
        (world_comparison(scenes, images, checked) if checked else comparison(images[0])).save(png)
        written = [png]
        probe = runs[0][2]
        if probe is not None:
            probe_png, probe_json = os.path.join(args.out, "taca_probe.png"), os.path.join(args.out, "taca_probe.json")
            probe[0].save(probe_png)
            with open(probe_json, "w") as f:
                json.dump(probe[1], f, indent=1)
            written += [probe_png, probe_json]
            notes = notes + [probe_note(probe[1])]
        report = make_report(name, base, [r for r, _, _ in runs], total, notes, scenes, checked)
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write(report)
        print(report)
        written.append(os.path.join(args.out, "report.md"))
        print("[demo] wrote " + ", ".join(os.path.relpath(p) for p in written))
        return 0
    except DemoError as err:
        print(f"[demo] {err}", file=sys.stderr)
        return 2


def make_report(name: str, prompt: Dict[str, Any], results: List[Dict[str, Any]], total: float, notes: List[str],
                scenes=None, checked=None) -> str:
    samplers = {v["_meta"]["title"]: k for k, v in prompt.items() if v["class_type"] == "KSampler"}
    lines = [f"# TACA demo: {name}", ""]
    if checked:
        lines += ["| category | prompt | without TACA | with TACA |", "|---|---|---|---|"]
        for scene, (plain, taca) in zip(scenes, checked):
            cell = lambda r: f"{r['score']:g} (saw {r['seen']})"  # noqa: E731
            lines.append(f"| {scene.category} | {scene.prompt} | {cell(plain)} | {cell(taca)} |")
        lines += ["", "Checker scores (1 = follows the prompt), one seed per prompt: an illustration, not a "
                  "measurement; bench/README.md has the scores over 200 prompt x seed pairs per category.", ""]
    for report in results[0]["reports"]:
        steps = ", ".join(str(s) for s in report["acted_steps"]) or "none"
        lines += [f"- TACA (gamma {report['gamma']:g}, threshold sigma {report['threshold_sigma']:g}, mode "
                  f"{report['mode']}) acted on steps {steps} of {report['steps_total']}: "
                  f"{report['attention_calls']} joint attention calls changed in {report['model_calls_acted']} of "
                  f"{report['model_calls']} model calls; {report['untouched_attention_calls']} other attention calls "
                  "in those model calls were left untouched."]
        if report.get("warning"):
            lines.append(f"- Warning: {report['warning']}")
        break  # every sampler with TACA reports the same; one line is enough
    per_step = lambda title: [r["per_step"][samplers[title]] for r in results  # noqa: E731
                              if samplers.get(title) in r["per_step"]]
    plain, taca = per_step("KSampler (without TACA)"), per_step("KSampler (with TACA)")
    plain_ms = 1e3 * sum(plain) / max(len(plain), 1)
    taca_ms = 1e3 * sum(taca) / max(len(taca), 1)
    extra = "" if name == WORLD else " + TACA LoRA + probe"
    lines += [f"- Sampling wall time per step (steps 2 to the last, model loading excluded, mean of {len(plain)} "
              f"run(s)): without TACA {plain_ms:.1f} ms, with TACA{extra} {taca_ms:.1f} ms (ratio "
              f"{taca_ms / plain_ms if plain_ms else float('nan'):.3f}; noisy: bench/benchmark.py measures the cost "
              f"properly); whole demo {total:.1f} s including server-side model loading."]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
