"""The shared workflows: built here, written to workflows/ as UI-format JSON (what users drag into ComfyUI).

    TACA_COMFYUI_VERSION=0.33.0 .runtime/comfyui-0.33.0/venv/bin/python -m devtools.workflows   # rewrite workflows/*.json

Also converts a UI-format workflow to the API format the way the frontend's
``app.graphToPrompt()`` does, using the server's ``/object_info`` (the browser
test checks the two agree).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS_DIR = os.path.join(REPO, "workflows")

# type -> (linkable inputs [(name, type)], outputs [(name, type)], widget names in order)
NODE_SPECS: Dict[str, Tuple[List[Tuple[str, str]], List[Tuple[str, str]], List[str]]] = {
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], ["ckpt_name"]),
    "UNETLoader": ([], [("MODEL", "MODEL")], ["unet_name", "weight_dtype"]),
    "DualCLIPLoader": ([], [("CLIP", "CLIP")], ["clip_name1", "clip_name2", "type", "device"]),
    "TripleCLIPLoader": ([], [("CLIP", "CLIP")], ["clip_name1", "clip_name2", "clip_name3"]),
    "VAELoader": ([], [("VAE", "VAE")], ["vae_name"]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")], ["text"]),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")], ["guidance"]),
    "EmptySD3LatentImage": ([], [("LATENT", "LATENT")], ["width", "height", "batch_size"]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")],
                 ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")], []),
    "ImageStitch": ([("image1", "IMAGE"), ("image2", "IMAGE")], [("IMAGE", "IMAGE")],
                    ["direction", "match_image_size", "spacing_width", "spacing_color"]),
    "SaveImage": ([("images", "IMAGE")], [], ["filename_prefix"]),
    "TACAPatchModel": ([("model", "MODEL")], [("MODEL", "MODEL")], ["gamma", "threshold_sigma", "mode"]),
    "TACALoraLoader": ([("model", "MODEL")], [("MODEL", "MODEL")], ["lora_name", "strength", "active_during"]),
    "TACAAttentionProbe": ([("model", "MODEL")], [("MODEL", "MODEL")], ["record", "max_rows"]),
    "TACAProbeReport": ([("model", "MODEL"), ("latent", "LATENT")], [("plot", "IMAGE"), ("json", "STRING")], []),
    "Note": ([], [], ["text"]),
}
VIRTUAL_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MUTED, BYPASSED = 2, 4

LORA_NOTE = ("TACA LoRA: the authors publish LoRAs trained with TACA on the Hugging Face hub, repository "
             "ldiex/TACA (linked from the official TACA README): one for FLUX.1-dev and one for SD3.5-Medium, rank 16 "
             "and rank 64. Put the file for your base model in ComfyUI/models/loras and pick it in the TACA LoRA Loader. "
             "Without it, bypass the loader: TACA alone still works.")


class Graph:
    def __init__(self):
        self.nodes: List[Dict[str, Any]] = []
        self.links: List[List[Any]] = []

    def add(self, node_type: str, widgets: Sequence[Any], pos: Tuple[int, int], size=(320, 130),
            title: Optional[str] = None) -> Dict[str, Any]:
        inputs, outputs, names = NODE_SPECS[node_type]
        assert len(widgets) == len(names), (node_type, widgets, names)
        node = {
            "id": len(self.nodes) + 1, "type": node_type, "pos": list(pos), "size": list(size), "flags": {},
            "order": len(self.nodes), "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": node_type},
            "widgets_values": list(widgets),
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def connect(self, src: Dict[str, Any], slot: int, dst: Dict[str, Any], input_name: str) -> None:
        link_id = len(self.links) + 1
        target = next(i for i, inp in enumerate(dst["inputs"]) if inp["name"] == input_name)
        kind = src["outputs"][slot]["type"]
        self.links.append([link_id, src["id"], slot, dst["id"], target, kind])
        src["outputs"][slot]["links"].append(link_id)
        dst["inputs"][target]["link"] = link_id

    def to_json(self) -> Dict[str, Any]:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}}, "version": 0.4}


def _sampler(g: Graph, model, pos, neg, latent, at, steps, cfg, seed, title):
    ks = g.add("KSampler", [seed, "fixed", steps, cfg, "euler", "simple", 1.0], at, (320, 262), title)
    g.connect(model[0], model[1], ks, "model")
    g.connect(pos, 0, ks, "positive")
    g.connect(neg, 0, ks, "negative")
    g.connect(latent, 0, ks, "latent_image")
    return ks


def _decode(g: Graph, samples, vae, at):
    dec = g.add("VAEDecode", [], at, (210, 46))
    g.connect(samples, 0, dec, "samples")
    g.connect(vae[0], vae[1], dec, "vae")
    return dec


def _stitch(g: Graph, left, right, at):
    st = g.add("ImageStitch", ["right", True, 8, "white"], at, (270, 150))
    g.connect(left, 0, st, "image1")
    g.connect(right, 0, st, "image2")
    return st


def compare_workflow(model_node, model_slot, clip, vae, prompt, negative, size, steps, cfg, seed, lora_name,
                     prefix, g: Graph, guidance=None) -> Graph:
    """Plain branch on top, TACA Patch Model + TACA LoRA Loader below, images side by side."""
    pos = g.add("CLIPTextEncode", [prompt], (420, 40), (400, 160), "Prompt")
    g.connect(clip[0], clip[1], pos, "clip")
    neg = g.add("CLIPTextEncode", [negative], (420, 240), (400, 120), "Negative")
    g.connect(clip[0], clip[1], neg, "clip")
    if guidance is not None:
        fg = g.add("FluxGuidance", [guidance], (860, 40), (300, 60))
        g.connect(pos, 0, fg, "conditioning")
        pos = fg
    latent = g.add("EmptySD3LatentImage", [size, size, 1], (420, 400), (300, 110))
    # Room under the TACA node for its schedule plot and run feedback (a wrapped warning included).
    taca = g.add("TACAPatchModel", [1.2, 0.97, "exact"], (420, 560), (320, 310))
    g.connect(model_node, model_slot, taca, "model")
    lora = g.add("TACALoraLoader", [lora_name, 1.0, "taca_steps"], (420, 910), (320, 130))
    g.connect(taca, 0, lora, "model")
    # The probe measures what TACA does to the attention; its report draws it once the sampler is done.
    probe = g.add("TACAAttentionProbe", ["taca_steps", 1024], (420, 1080), (320, 106))
    g.connect(lora, 0, probe, "model")
    plain = _sampler(g, (model_node, model_slot), pos, neg, latent, (860, 140), steps, cfg, seed, "KSampler (without TACA)")
    with_taca = _sampler(g, (probe, 0), pos, neg, latent, (860, 560), steps, cfg, seed, "KSampler (with TACA)")
    report = g.add("TACAProbeReport", [], (860, 900), (700, 360))
    g.connect(probe, 0, report, "model")
    g.connect(with_taca, 0, report, "latent")
    a = _decode(g, plain, vae, (1220, 140))
    b = _decode(g, with_taca, vae, (1220, 560))
    st = _stitch(g, a, b, (1480, 300))
    save = g.add("SaveImage", [prefix], (1800, 300), (420, 460), "Left: without TACA | right: with TACA")
    g.connect(st, 0, save, "images")
    return g


def _flux1_dev_loaders(g: Graph) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """FLUX.1-dev's loaders in the left column: (diffusion model, CLIP-L + T5-XXL, VAE)."""
    unet = g.add("UNETLoader", ["flux1-dev.safetensors", "default"], (20, 40), (340, 82))
    clip = g.add("DualCLIPLoader", ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"], (20, 170),
                 (340, 130))
    vae = g.add("VAELoader", ["ae.safetensors"], (20, 340), (340, 58))
    return unet, clip, vae


def flux1_dev_compare() -> Dict[str, Any]:
    g = Graph()
    unet, clip, vae = _flux1_dev_loaders(g)
    g.add("Note", [LORA_NOTE + " Prompt from the TACA paper (spatial relation)."], (20, 440), (360, 240), "TACA LoRA")
    compare_workflow(unet, 0, (clip, 0), (vae, 0), "a squirrel to the left of the man", "", 1024, 30, 1.0, 42,
                     "taca_flux1_dev_r64.safetensors", "taca/flux1_dev_compare", g, guidance=3.5)
    return g.to_json()


def sd35_medium_compare() -> Dict[str, Any]:
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ["sd3.5_medium.safetensors"], (20, 40), (340, 98))
    clip = g.add("TripleCLIPLoader", ["clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"],
                 (20, 190), (340, 106))
    g.add("Note", [LORA_NOTE + " Prompt from the TACA paper (colour binding)."], (20, 340), (360, 240), "TACA LoRA")
    compare_workflow(ckpt, 0, (clip, 0), (ckpt, 2), "a blue sun and a yellow sea", "", 1024, 30, 4.5, 42,
                     "taca_sd35_medium_r64.safetensors", "taca/sd35_medium_compare", g)
    return g.to_json()


def tiny_demo() -> Dict[str, Any]:
    from .demo_models import CHECKPOINT, LORA

    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", [CHECKPOINT], (20, 40), (340, 98))
    g.add("Note", ["Embedded demo: a tiny random-weight SD3.5-Medium-shaped model, CLIP-L and VAE generated by "
                   "`bash scripts/demo.sh` (no download). The images are noise-like, since the weights are random; "
                   "the workflow is the same as the real ones."], (20, 190), (360, 180), "About this demo")
    compare_workflow(ckpt, 0, (ckpt, 1), (ckpt, 2), "a blue sun and a yellow sea", "", 256, 30, 4.5, 7, LORA,
                     "taca/tiny_demo_compare", g)
    return g.to_json()


def world_demo_scenes():
    """The demo's prompts: the first held-out scene of each category of the world, fixed before any image."""
    from taca_eval import world

    return [world.make_scene(category, 0, "heldout") for category in world.CATEGORIES]


def world_demo(prompt: Optional[str] = None) -> Dict[str, Any]:
    """The demo's trained model: without TACA | with TACA (same seed), and a probed TACA run for the probe's
    report, so the two compared samplers carry nothing but TACA (the probe costs time of its own)."""
    from .world_model import CHECKPOINT

    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", [CHECKPOINT], (20, 40), (340, 98))
    g.add("Note", ["The demo model: a small SD3-shaped MMDiT trained by this project on a world of coloured shapes "
                   "(devtools/train_world_model.py), written by `bash scripts/demo.sh` (no download). Try its "
                   "held-out prompts: colour and shape pairs it never saw (a red star, an orange circle, a yellow "
                   "square, ...), counts (two red stars) and relations (a cyan star above an orange triangle)."],
          (20, 190), (360, 220), "About this demo")
    pos = g.add("CLIPTextEncode", [prompt or world_demo_scenes()[0].prompt], (420, 40), (400, 160), "Prompt")
    g.connect(ckpt, 1, pos, "clip")
    neg = g.add("CLIPTextEncode", [""], (420, 240), (400, 120), "Negative")
    g.connect(ckpt, 1, neg, "clip")
    latent = g.add("EmptySD3LatentImage", [256, 256, 1], (420, 400), (300, 110))
    taca = g.add("TACAPatchModel", [1.2, 0.97, "exact"], (420, 560), (320, 310))
    g.connect(ckpt, 0, taca, "model")
    probe = g.add("TACAAttentionProbe", ["taca_steps", 1024], (420, 910), (320, 106))
    g.connect(taca, 0, probe, "model")
    plain = _sampler(g, (ckpt, 0), pos, neg, latent, (860, 40), 30, 4.5, 7, "KSampler (without TACA)")
    with_taca = _sampler(g, (taca, 0), pos, neg, latent, (860, 340), 30, 4.5, 7, "KSampler (with TACA)")
    probed = _sampler(g, (probe, 0), pos, neg, latent, (860, 640), 30, 4.5, 7, "KSampler (with TACA, probed)")
    report = g.add("TACAProbeReport", [], (860, 940), (700, 360))
    g.connect(probe, 0, report, "model")
    g.connect(probed, 0, report, "latent")
    a = _decode(g, plain, (ckpt, 2), (1220, 40))
    b = _decode(g, with_taca, (ckpt, 2), (1220, 340))
    st = _stitch(g, a, b, (1480, 140))
    save = g.add("SaveImage", ["taca/world_demo_compare"], (1800, 140), (420, 300), "Left: without TACA | right: with TACA")
    g.connect(st, 0, save, "images")
    return g.to_json()


def gamma_sweep() -> Dict[str, Any]:
    """FLUX.1-dev, one seed, gamma 1.0 / 1.15 / 1.2 / 1.25 / 1.3 (Table 5 of the paper), one row of images."""
    g = Graph()
    unet, clip, vae = _flux1_dev_loaders(g)
    g.add("Note", ["gamma 1.0 is the model without TACA. The paper's ablation (Table 5) finds 1.15-1.25 all help; "
                   "1.3 helps shape and spatial layout but hurts colour and texture. Prompt from the paper."],
          (20, 440), (360, 160), "Gamma sweep")
    pos = g.add("CLIPTextEncode", ["a blue sun and a yellow sea"], (420, 40), (400, 160), "Prompt")
    g.connect(clip, 0, pos, "clip")
    fg = g.add("FluxGuidance", [3.5], (420, 240), (300, 60))
    g.connect(pos, 0, fg, "conditioning")
    neg = g.add("CLIPTextEncode", [""], (420, 340), (400, 120), "Negative")
    g.connect(clip, 0, neg, "clip")
    latent = g.add("EmptySD3LatentImage", [1024, 1024, 1], (420, 500), (300, 110))
    images = []
    for i, gamma in enumerate((1.0, 1.15, 1.2, 1.25, 1.3)):
        x = 880 + i * 360
        taca = g.add("TACAPatchModel", [gamma, 0.97, "exact"], (x, 40), (320, 310), f"TACA gamma {gamma}")
        g.connect(unet, 0, taca, "model")
        ks = _sampler(g, (taca, 0), fg, neg, latent, (x, 390), 30, 1.0, 42, f"KSampler gamma {gamma}")
        images.append(_decode(g, ks, (vae, 0), (x, 690)))
    row = images[0]
    for i, img in enumerate(images[1:]):
        row = _stitch(g, row, img, (880 + i * 360, 810))
    save = g.add("SaveImage", ["taca/gamma_sweep"], (880, 1010), (1400, 420), "gamma 1.0 | 1.15 | 1.2 | 1.25 | 1.3")
    g.connect(row, 0, save, "images")
    return g.to_json()


WORKFLOWS = {
    "flux1_dev_taca_compare": flux1_dev_compare,
    "sd35_medium_taca_compare": sd35_medium_compare,
    "taca_gamma_sweep": gamma_sweep,
    "tiny_taca_demo": tiny_demo,
    "world_taca_demo": world_demo,
}


def render(name: str) -> str:
    return json.dumps(WORKFLOWS[name](), indent=1) + "\n"


def write_all(directory: str = WORKFLOWS_DIR) -> List[str]:
    os.makedirs(directory, exist_ok=True)
    written = []
    for name in WORKFLOWS:
        path = os.path.join(directory, name + ".json")
        with open(path, "w") as f:
            f.write(render(name))
        written.append(path)
    return written


# ------------------------------------------------------------------ UI format -> API format

def _widget_inputs(info: Dict[str, Any]) -> List[Tuple[str, bool]]:
    """(input name, followed by a control_after_generate widget) for every widget input, in widget order."""
    order = info.get("input_order") or {}
    spec = info["input"]
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, list(spec.get(section, {}))):
            entry = spec.get(section, {}).get(name)
            if entry is None:
                continue
            kind = entry[0]
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            is_widget = isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
            if not is_widget or options.get("forceInput"):
                continue
            control = bool(options.get("control_after_generate")) or (kind == "INT" and name in ("seed", "noise_seed"))
            out.append((name, control))
    return out


def ui_to_api(workflow: Dict[str, Any], object_info: Dict[str, Any]) -> Dict[str, Any]:
    """The prompt the frontend would queue for ``workflow`` (muted/bypassed and virtual nodes removed)."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def source(link_id):
        _, origin, slot, _, _, kind = links[link_id]
        node = nodes[origin]
        if node.get("mode") == BYPASSED or node["type"] == "Reroute":
            for inp in node.get("inputs", []):
                if inp.get("link") is not None and (node["type"] == "Reroute" or inp["type"] == kind):
                    return source(inp["link"])
            return None
        return [str(origin), slot]

    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_TYPES or node.get("mode") in (MUTED, BYPASSED):
            continue
        info = object_info[node["type"]]
        inputs: Dict[str, Any] = {}
        values = list(node.get("widgets_values") or [])
        i = 0
        for name, control in _widget_inputs(info):
            if i < len(values):
                inputs[name] = values[i]
            i += 2 if control else 1
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                src = source(inp["link"])
                if src is not None:
                    inputs[inp["name"]] = src
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title") or info.get("display_name") or node["type"]}}
    return prompt


if __name__ == "__main__":
    for path in write_all():
        print("wrote", os.path.relpath(path, REPO))
