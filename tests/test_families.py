"""Every joint-attention family of taca/families.py, patched through the node against the same model run with a float64
reference attention, and the models TACA refuses: cross-attention families, models that generate no image or video
from text, and joint-attention models whose attention calls it cannot reach.

Each case builds a tiny random-weight model with ComfyUI's own classes and runs it through ComfyUI's sampler.
Where the text sits in the joint attention (its order and span) is observed on the running ComfyUI
(``layouts.observe_joint_layout``: which key rows move with the text inputs and which with the image), never
taken from taca/families.py; the case tables hold what the test knows of the model it built:

    text, length   text tokens and joint sequence length (checked against the observation)
    other          every other attention call as (q length, k length) (refiners, image-only attention)

One Euler step from sigma 1 to 0 makes the output the model's CFG-combined prediction.  CogVideoX, a discrete-time
v-prediction model, is stepped from its largest sigma (timestep 999) with ComfyUI's VOIDSampler, the DDIM sampler
its workflows use: ComfyUI's other samplers hand it the noise scaled by sqrt(1 + sigma^2), about 4500 at that sigma,
which buries every attention output in the residual stream (TACA then moves the output by about 4e-5 only).
"""

from typing import Any, Dict, NamedTuple, Optional, Set, Tuple, Union

import pytest
import torch

import comfy.model_base
import comfy.sample
import comfy.samplers
import comfy.supported_models
import comfyui_version
from devtools import tiny_models as tm
from devtools.comfy_runtime import version_key
from devtools.sampling import one_step
from harness import GAMMA, AttentionSpy, ReferenceTacaAttention, installed_override, rel_diff, taca, with_override
from layouts import observe_joint_layout

TOLERANCE = 1e-4  # fp32 model vs the same model with float64 attention


class Case(NamedTuple):
    kind: str
    cond: Dict  # family_conditioning kwargs
    text: int  # text tokens of the joint attention
    length: int  # joint sequence length
    other: Set[Tuple[int, int]]
    joint_calls: int  # joint attention calls per model call
    batch: int = 2
    latent: Tuple = None  # latent shape without batch (default: the kind's)
    cfg: float = 3.0
    latent_batch: Optional[int] = None  # default: 1 at cfg 1 (one conditioning), else 2
    moves: int = 30  # TACA moves the output at least this many tolerances away from the plain model's
    sigma: Union[float, str, None] = None  # of the step; None: 1.0; "max": the model's model_sampling.sigma_max
    sampler: str = "euler"  # a KSampler name, or "void": ComfyUI's VOIDSampler (CogVideoX's DDIM, no noise scaling)
    since: Optional[str] = None  # the first tested ComfyUI whose model takes the case's inputs
    # The model's joint call holds only the visual query rows, against every key; it computes the text rows itself
    # (HiDream-O1's causal text pass), so TACA hands that call on whole, with the text keys scaled.
    visual_rows: bool = False


def _qwen_ref():
    return torch.randn(1, 16, 1, 12, 8, generator=torch.Generator().manual_seed(7))


def _omnigen_ref():
    return torch.randn(1, 16, 12, 8, generator=torch.Generator().manual_seed(7))


def _hunyuan_ref():
    return torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(7))


def _kontext_ref():
    return torch.randn(1, 16, 12, 8, generator=torch.Generator().manual_seed(5))


def _joyimage_ref():
    return torch.randn(1, 16, 1, 12, 8, generator=torch.Generator().manual_seed(7))


def _cogvideox_image():
    return torch.randn(1, 16, 1, 8, 10, generator=torch.Generator().manual_seed(7))


CASES = {
    # FLUX.1 dev / schnell: [256 T5 | (16/2)^2 = 64 image]; 2 double + 2 single blocks.
    "flux": Case("flux", {}, 256, 320, set(), 4, moves=100),
    "flux_schnell": Case("flux_schnell", {}, 256, 320, set(), 4, moves=100),
    # The text length is read from the conditioning, not diffusers' 512: 77 and 300 tokens.
    "flux_77_tokens": Case("flux", {"text_tokens": 77}, 77, 141, set(), 4, moves=100),
    "flux_300_tokens": Case("flux", {"text_tokens": 300}, 300, 364, set(), 4, moves=100),
    # Latents not a multiple of the patch size are padded by the model: ceil(9/2) x ceil(14/2) = 35 image tokens.
    "flux_odd_latent": Case("flux", {}, 256, 291, set(), 4, latent=(16, 9, 14), moves=100),
    # Kontext: a 12x8 reference latent adds 6 x 4 = 24 tokens, which count as visual.
    "flux_kontext": Case("flux", {"reference_latents": "kontext_ref"}, 256, 344, set(), 4, batch=1, latent_batch=1,
                         moves=100),
    # Redux / StyleModelApply concatenates 81 image-derived tokens to the conditioning: they count as text.
    "flux_redux": Case("flux", {"text_tokens": 256 + 81}, 337, 401, set(), 4, batch=1, latent_batch=1, moves=100),
    # Flux.2: text left-padded to 512 | 8 x 8 = 64 image (the latent is at 1/16 scale); 1 double + 2 single blocks.
    "flux2": Case("flux2", {}, 512, 576, set(), 3, moves=100),
    # Chroma: [40 T5 | 64 image]; 1 double + 2 single blocks.
    "chroma": Case("chroma", {}, 40, 104, set(), 3, moves=100),
    # SD3: [154 text (77 CLIP + 77 T5) | 64 image]; 2 joint blocks.
    "sd3": Case("sd3", {}, 154, 218, set(), 2, moves=100),
    # SD3.5 Medium: the same, and an image-only attention in both blocks.
    "sd35_medium": Case("sd35_medium", {}, 154, 218, {(64, 64)}, 2, moves=100),
    # AuraFlow: [8 registers + 40 T5 tokens | (16/2)^2 = 64 image tokens]; 1 joint (MMDiT) + 1 single (DiT) layer.
    "auraflow": Case("auraflow", {}, 48, 112, set(), 2),
    # HunyuanVideo: 3 x (8/2) x (8/2) = 48 video tokens and 30 text tokens (image first in ComfyUI 0.3.75, text first
    # in 0.33.0: observed); token refiner: 2 blocks over the text.
    "hunyuan_video": Case("hunyuan_video", {}, 30, 78, {(30, 30)}, 2),
    # HunyuanVideo 1.0 I2V class (33 input channels: latent + concat image + mask): same layout.
    "hunyuan_video_i2v": Case("hunyuan_video_i2v", {}, 30, 78, {(30, 30)}, 2),
    # HunyuanVideo with a reference latent (the "custom" image-to-video guidance): 16 ref + 48 video and 30 text tokens.
    # ComfyUI 0.3.75 writes into an expanded tensor for ref_latent when the model call's batch is > 1 (cond and
    # uncond batched), so this case runs batch 1 at cfg 1.
    "hunyuan_video_ref": Case("hunyuan_video", {"ref_latent": "hunyuan_ref"}, 30, 94, {(30, 30)}, 2,
                              batch=1, cfg=1.0),
    # HunyuanVideo 1.5: 2 x 4 x 4 = 32 video, 4 vision + 5 byT5 + 30 text; refiner over the 30 text tokens.
    "hunyuan_video15": Case("hunyuan_video15", {"byt5_tokens": 5, "vision_tokens": 4}, 39, 71, {(30, 30)}, 2),
    # HunyuanImage 2.1: patch 1: 8 x 8 = 64 image, 30 text + 5 byT5.
    "hunyuan_image21": Case("hunyuan_image21", {"byt5_tokens": 5}, 35, 99, {(30, 30)}, 2),
    # HunyuanImage 2.1 with a text padding mask (last 6 of 30 tokens masked): the model adds the mask to the joint
    # logits after TACA's scaling (and to the refiner's); batch 1 at cfg 1, as the model's mask is built for one,
    # and no byT5 tokens (0.3.75 does not extend the mask over them).
    "hunyuan_image21_masked": Case("hunyuan_image21", {"attention_mask": "text_mask"},
                                   30, 94, {(30, 30)}, 2, batch=1, cfg=1.0),
    # Chroma Radiance (pixel space): [40 T5 | (32/4)^2 = 64 pixel patches]; 1 double + 2 single blocks.
    "chroma_radiance": Case("chroma_radiance", {}, 40, 104, set(), 3),
    # Qwen-Image: [34 text | (16/2)^2 = 64 image]; 2 blocks.
    "qwen_image": Case("qwen_image", {}, 34, 98, set(), 2),
    # Qwen-Image-Edit: a 12x8 reference latent adds 6 x 4 = 24 visual tokens.
    "qwen_image_edit": Case("qwen_image", {"reference_latents": "qwen_ref"}, 34, 122, set(), 2),
    # HiDream: 64 image, 36 T5 + 7 Llama (last layer) + 7 Llama (the block's layer); 1 double + 1 single block.
    "hidream": Case("hidream", {"llama_tokens": 7}, 50, 114, set(), 2),
    # Lumina 2: [38 caption | 64 image]; context refiner (38) and noise refiner (64) untouched.
    "lumina2": Case("lumina2", {}, 38, 102, {(38, 38), (64, 64)}, 2),
    # Z-Image with pad_tokens_multiple=32: 37 caption tokens + 27 pad = 64 | 7 x 9 = 63 image + 1 pad = 64.
    "z_image": Case("z_image", {}, 64, 128, {(64, 64)}, 2),
    # Z-Image Omni (ComfyUI 0.33.0 passes reference latents to Z-Image): a 16-channel 8x8 reference with 5 text-embed
    # tokens and 6 left over. Text: 5 + 27 pad (reference) + 37 + 27 pad (prompt) + 6 + 26 pad (left over) = 128;
    # visual: (8/2)^2 = 16 + 16 pad (reference) + 63 + 1 pad (image) = 96; the refiners run over each side alone.
    "z_image_omni": Case("z_image", {"reference_latents": "z_image_ref",
                                     "reference_latents_text_embeds": "pixel_ref_texts"},
                         128, 224, {(128, 128), (96, 96)}, 2, batch=1, cfg=1.0, since="0.33.0"),
    # OmniGen2: [35 text | 24 reference + 64 image]; context (35), ref-image (24) and noise (64) refiners untouched.
    "omnigen2": Case("omnigen2", {"reference_latents": "omnigen_ref"}, 35, 123, {(35, 35), (24, 24), (64, 64)},
                     2, batch=1),
    # Lens: [(8 x 8 = 64 latent positions, one token each: the Flux.2 latent is already patchified) | 40 GPT-OSS
    # tokens (4 layers' features side by side)]; 2 dual-stream blocks, one joint call each, no other attention.
    # The model always passes an additive (B, 1, 1, 104) mask, zero here.
    "lens": Case("lens", {}, 40, 104, set(), 2),
    # Lens with the text encoder's padding mask (last 6 of 30 tokens masked, as when prompts of different lengths
    # share a batch): the masked tokens stay in the joint sequence (30 + 64) and count as text.
    "lens_masked": Case("lens", {"text_tokens": 30, "attention_mask": "text_mask"}, 30, 94, set(), 2),
    # JoyImage: [(1 x 16/2 x 16/2 = 64 image tokens, Conv3d patch 1x2x2) | 40 Qwen3-VL tokens]; 2 double blocks, one
    # joint call each, no other attention.
    "joyimage": Case("joyimage", {}, 40, 104, set(), 2),
    # JoyImage-Edit: a (1, 12, 8) reference latent adds 1 x 6 x 4 = 24 visual tokens after the target's 64.
    "joyimage_edit": Case("joyimage", {"reference_latents": "joyimage_ref"}, 40, 128, set(), 2),
    # PixelDiT: [40 Gemma-2 tokens | (32/4)^2 = 64 pixel patches], one joint attention per patch block (2); the pixel
    # block's attention runs over the 64 compressed patch tokens alone.
    "pixeldit": Case("pixeldit", {}, 40, 104, {(64, 64)}, 2),
    # A context longer than the model's txt_max_length (48 here, 300 in the real model) is cut there: 48 text tokens.
    "pixeldit_long_text": Case("pixeldit", {"text_tokens": 60}, 48, 112, {(64, 64)}, 2),
    # PiD: the same layout; its 4x4 latent is projected onto the 64 patch tokens (gated, added), no tokens of its own.
    "pid": Case("pid", {"lq_latent": (16, 4, 4)}, 40, 104, {(64, 64)}, 2),
    # MiniMax H3, one stream [24 text | 16 audio | 32 video]: the Qwen3-VL context after the token refiner (which runs
    # once in extra_conds, outside the model call); 8 stereo audio latent frames = 2 x 8 rows; 2 latent frames of
    # (8/2) x (8/2) video patches.  2 blocks, each one joint self-attention over the whole pack; nothing else attends.
    # The model takes batch 1 only (cond and uncond run as separate model calls).
    "minimax_h3": Case("minimax_h3", {}, 24, 72, set(), 2, batch=1, latent_batch=1),
    # first-frame keyframe (fl2va): 1 condition frame on the target grid (16 rows) and 4 audio frames (2 x 4 rows)
    # packed between the text and the target streams; condition rows are visual.
    "minimax_h3_keyframe": Case("minimax_h3", {"minimax_keyframes": "minimax_keyframe"}, 24, 96, set(), 2,
                                batch=1, latent_batch=1),
    # references (ref2va): an image of (6/2) x (8/2) = 12 rows and a video+audio block of 1 frame of (4/2) x (4/2) = 4
    # rows plus 2 x 3 audio rows, packed between the text and the target streams: 72 + 22.
    "minimax_h3_refs": Case("minimax_h3", {"minimax_refs": "minimax_refs"}, 24, 94, set(), 2, batch=1, latent_batch=1),
    # a video latent not a multiple of the patch: padded by the model to 2 x (8/2) x (10/2) = 40 video rows, + 16 audio.
    "minimax_h3_odd_latent": Case("minimax_h3", {}, 24, 80, set(), 2, batch=1, latent_batch=1, latent=(24, 2, 7, 9)),
    # CogVideoX 1.0 T2V: [26 T5 tokens (the conditioning's length; 226 with ComfyUI's T5 padding) | 3 frames x
    # (8/2) x (8/2) = 48 video tokens (frames are not patched)]; one joint attention per block, 2 blocks, no other
    # attention.  At its largest sigma (timestep 999) through VOIDSampler (see the module docstring).
    "cogvideox": Case("cogvideox", {}, 26, 74, set(), 2, moves=100, sigma="max", sampler="void"),
    # CogVideoX 1.5 I2V: the image latent enters as 16 concat channels, no tokens; 2 x 2 x 2 patches over the 3
    # frames padded to 4: 2 x 4 x 5 = 40 video tokens after the 26 text tokens; 2 blocks, no other attention.
    "cogvideox15_i2v": Case("cogvideox15_i2v", {"concat_latent_image": "cogvideox_image"}, 26, 66, set(), 2,
                            moves=100, sigma="max", sampler="void"),
    # Ideogram 4 (single stream): [40 Qwen3-VL tokens | 8 x 8 = 64 image tokens, one per position of the patchified
    # 128-channel latent]; 2 layers, each one joint attention; no other attention.
    "ideogram4": Case("ideogram4", {}, 40, 104, set(), 2),
    # Ideogram 4 with a text padding mask (last 6 of 30 tokens): the model keeps the padding in the sequence (text
    # side) and masks it out of every other token's attention (a block mask of its segments, added to the logits).
    "ideogram4_masked": Case("ideogram4", {"text_tokens": 30, "attention_mask": "text_mask"}, 30, 94, set(), 2),
    # Krea 2 (single stream): [40 text | (16/2)^2 = 64 image]; 2 blocks. Its text-fusion stack attends over the 2
    # tapped layers of each token (2 calls, (2, 2)), then over the 40 text tokens (2 refiner calls).
    "krea2": Case("krea2", {}, 40, 104, {(2, 2), (40, 40)}, 2),
    # Krea 2 with a 12x8 reference latent and a reference method: 6 x 4 = 24 reference tokens after the image ones
    # (visual); index_timestep_zero modulates them at timestep 0.
    "krea2_ref": Case("krea2", {"reference_latents": "qwen_ref", "reference_latents_method": "timestep_zero_method"},
                      40, 128, {(2, 2), (40, 40)}, 2),
    # Without a reference method Krea 2 ignores the reference latents: the joint sequence is text + image only.
    "krea2_ref_ignored": Case("krea2", {"reference_latents": "qwen_ref"}, 40, 104, {(2, 2), (40, 40)}, 2),
    # LongCat-Image (FLUX.1 blocks, no guidance or pooled vector): [48 text | (16/2)^2 = 64 image]; 2 double +
    # 2 single blocks.
    "longcat_image": Case("longcat_image", {}, 48, 112, set(), 4),
    # LongCat-Image-Edit: a 12x8 reference latent adds 6 x 4 = 24 visual tokens after the image.
    "longcat_image_edit": Case("longcat_image", {"reference_latents": "kontext_ref"}, 48, 136, set(), 4),
    # Mage-Flow (Qwen-Image blocks, patch 1 over the 128-channel latent): [34 text | 8 x 8 = 64 image]; 2 blocks.
    "mage_flow": Case("mage_flow", {}, 34, 98, set(), 2),
    # Mage-Flow edit: a 128 x 6 x 4 reference latent adds 24 visual tokens after the image.
    "mage_flow_edit": Case("mage_flow", {"reference_latents": "mage_ref"}, 34, 122, set(), 2),
    # Mage-Flow with a text padding mask (last 6 of 34 tokens masked): the model adds it to the joint logits as
    # -finfo.max over the masked text keys, after TACA's scaling.
    "mage_flow_masked": Case("mage_flow", {"attention_mask": "mage_mask"}, 34, 98, set(), 2),
    # Z-Image pixel space (pad_tokens_multiple=32): 40 caption + 24 pad = 64 | (32/4) x (40/4) = 80 patches + 16 pad
    # = 96; context refiner (64) and noise refiner (96) untouched.
    "z_image_pixel": Case("z_image_pixel", {}, 64, 160, {(64, 64), (96, 96)}, 2),
    # Z-Image's omni path (reference images): one 16x16 reference image with text embeds of 5 tokens and 6 tokens
    # left over. Text: 5 + 27 pad (reference) + 64 (prompt) + 6 + 26 pad (left over) = 128; visual: 4 x 4 = 16 +
    # 16 pad (reference) + 96 = 128. Context refiner over the 128 text tokens, noise refiner over the 128 patches.
    # Batch 1 at cfg 1: ComfyUI's omni path builds the left-over text's rotary table for the call's batch and the
    # others for one.
    "z_image_pixel_refs": Case("z_image_pixel", {"reference_latents": "pixel_ref",
                                                 "reference_latents_text_embeds": "pixel_ref_texts"},
                               128, 256, {(128, 128)}, 2, batch=1, cfg=1.0),
    # The same on a model with a SigLIP embedder, the reference's SigLIP output a 3 x 5 grid: the SigLIP tokens sit
    # between the text and the patches and count as visual: 15 + 17 pad (reference) + 32 pad (the image's own
    # slot) = 64, so visual 64 + 128 = 192; the SigLIP refiner runs over those 64.
    "z_image_pixel_omni": Case("z_image_pixel_omni", {"reference_latents": "pixel_ref",
                                                      "reference_latents_text_embeds": "pixel_ref_texts",
                                                      "clip_vision_outputs": "pixel_siglip"},
                               128, 320, {(128, 128), (64, 64)}, 2, batch=1, cfg=1.0),
    # Boogu: [35 text | 64 image]; 2 double-stream + 2 single-stream joint calls; context (35) and noise (64)
    # refiners, and the double-stream blocks' image-only self-attention (64), untouched.
    "boogu": Case("boogu", {}, 35, 99, {(35, 35), (64, 64)}, 4, batch=1),
    # Boogu edit: [35 text | 24 reference + 64 image]; the reference refiner (24) and the image-only
    # self-attention over reference + image (88) untouched.
    "boogu_edit": Case("boogu", {"reference_latents": "omnigen_ref"}, 35, 123,
                       {(35, 35), (24, 24), (64, 64), (88, 88)}, 4, batch=1),
    # HiDream-O1: 24 prompt ids in the chat template make 34 ids (tiny_models.hidream_o1_input_ids); the 33 before
    # <|tms|> are the causal text pass, which goes straight to SDPA.  The one call the override sees holds the other
    # 13 query rows (<|tms|> and (128/32) x (96/32) = 12 pixel patches) against all 46 keys; 2 decoder layers.
    "hidream_o1": Case("hidream_o1", {}, 33, 46, set(), 2, visual_rows=True, moves=100),
}

# The cases whose model class this ComfyUI has (the newer families only exist in newer ComfyUI).
AVAILABLE = [name for name, case in CASES.items() if tm.available(case.kind)
             and (case.since is None or version_key(comfyui_version.__version__) >= version_key(case.since))]


def _text_mask():
    mask = torch.ones(1, 30, dtype=torch.long)
    mask[:, 24:] = 0
    return mask


def _minimax_keyframe():
    g = torch.Generator().manual_seed(11)
    return [{"resolved_frame_index": 0, "latent": torch.randn(1, 24, 1, 8, 8, generator=g),
             "audio_latent": torch.randn(1, 32, 2, 4, generator=g)}]


def _minimax_refs():
    g = torch.Generator().manual_seed(13)
    return [{"kind": "image", "latent_h": 6, "latent_w": 8, "latent": torch.randn(1, 24, 1, 6, 8, generator=g)},
            {"kind": "video_audio", "latent_t": 1, "latent_h": 4, "latent_w": 4, "ref_audio_t": 3,
             "latent": torch.randn(1, 24, 1, 4, 4, generator=g), "audio_latent": torch.randn(1, 32, 2, 3, generator=g)}]


def _mage_mask():
    mask = torch.ones(1, 34, dtype=torch.long)
    mask[:, 28:] = 0
    return mask


def _mage_ref():
    return torch.randn(1, 128, 6, 4, generator=torch.Generator().manual_seed(7))


def _pixel_ref():
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def _z_image_ref():
    return [torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7))]


def _pixel_ref_texts():
    g = torch.Generator().manual_seed(8)
    return [torch.randn(1, 5, tm.CONTEXT_DIM, generator=g), torch.randn(1, 6, tm.CONTEXT_DIM, generator=g)]


class _SiglipOutput(NamedTuple):  # what a CLIP vision encode hands Z-Image Omni (the fields its extra_conds reads)
    last_hidden_state: torch.Tensor
    image_sizes: list


def _pixel_siglip():
    g = torch.Generator().manual_seed(9)
    return [_SiglipOutput(torch.randn(1, 3 * 5, tm.VISION_DIM, generator=g), [(3, 3 * 16, 5 * 16)])]


_MAKERS = {"text_mask": _text_mask, "qwen_ref": lambda: [_qwen_ref()], "omnigen_ref": lambda: [_omnigen_ref()],
           "hunyuan_ref": _hunyuan_ref, "kontext_ref": lambda: [_kontext_ref()],
           "joyimage_ref": lambda: [_joyimage_ref()],
           "minimax_keyframe": _minimax_keyframe, "minimax_refs": _minimax_refs,
           "cogvideox_image": _cogvideox_image, "timestep_zero_method": lambda: "index_timestep_zero",
           "mage_ref": lambda: [_mage_ref()], "mage_mask": _mage_mask, "pixel_ref": lambda: [_pixel_ref()],
           "pixel_ref_texts": _pixel_ref_texts, "z_image_ref": _z_image_ref, "pixel_siglip": _pixel_siglip}


def setup(case: Case):
    tiny = tm.build(case.kind)
    cond = {k: (_MAKERS[v]() if isinstance(v, str) else v) for k, v in case.cond.items()}
    positive = tm.family_conditioning(tiny, 1, batch=case.batch, **cond)
    negative = tm.family_conditioning(tiny, 2, batch=case.batch, **cond)
    latent_batch = case.latent_batch or (1 if case.cfg == 1.0 else 2)
    latent = tm.family_latent(tiny, batch=latent_batch, shape=case.latent)
    return tiny, positive, negative, latent


def step(case: Case, tiny) -> Dict[str, Any]:
    """one_step's sigma and sampler for a case."""
    sigma = case.sigma
    if sigma is None:
        sigma = 1.0
    elif sigma == "max":
        sigma = float(tiny.patcher.get_model_object("model_sampling").sigma_max)
    sampler: Any = case.sampler
    if sampler == "void":
        from comfy_extras.nodes_void import VOID_DDIM  # ComfyUI 0.33.0's VOIDSampler node hands this out

        sampler = VOID_DDIM()
    return {"sigma": sigma, "sampler": sampler, "cfg": case.cfg}


_OBSERVED: Dict[str, Dict[int, Tuple[int, int]]] = {}


def joint_layout(name: str) -> Dict[int, Tuple[int, int]]:
    """{length: (text start, text stop)} of a case, observed on this ComfyUI and checked against the case's counts."""
    if name not in _OBSERVED:
        case = CASES[name]
        tiny, positive, _, latent = setup(case)
        observed = observe_joint_layout(tiny.patcher, positive, latent)
        (length, (start, stop)), = observed.items()
        assert (length, stop - start) == (case.length, case.text), (name, observed)
        _OBSERVED[name] = observed
    return _OBSERVED[name]


def check_forward(pack_nodes, name: str, mode: str = "exact", listing2: bool = False, case: Optional[Case] = None):
    """The node's model against the same model with the float64 reference attention on the observed layout."""
    case = case or CASES[name]
    tiny, positive, negative, latent = setup(case)
    reference = ReferenceTacaAttention(joint_layout(name), GAMMA, listing2=listing2)
    at = step(case, tiny)
    out = one_step(taca(pack_nodes, tiny.patcher, mode=mode), positive, negative, latent, **at)
    ref = one_step(with_override(tiny.patcher, reference), positive, negative, latent, **at)
    plain = one_step(tiny.patcher, positive, negative, latent, **at)
    assert reference.joint_calls > 0
    assert torch.isfinite(out).all()
    assert rel_diff(out, ref) <= TOLERANCE, (rel_diff(out, ref), rel_diff(plain, ref))
    # The test can fail: TACA moves the output far beyond the tolerance (AuraFlow's tiny model the least, ~4e-3).
    assert rel_diff(plain, ref) > case.moves * TOLERANCE


@pytest.mark.parametrize("name", AVAILABLE)
def test_exact_forward_matches_reference(pack_nodes, name):
    check_forward(pack_nodes, name)


@pytest.mark.parametrize("name", AVAILABLE)
def test_selective_forward_matches_listing2(pack_nodes, name):
    check_forward(pack_nodes, name, mode="selective", listing2=True)


@pytest.mark.parametrize("name", AVAILABLE)
def test_flex_forward_matches_reference(pack_nodes, name):
    check_forward(pack_nodes, name, mode="flex", case=CASES[name]._replace(batch=1, latent_batch=1))


def test_sd35_medium_image_only_attention_is_untouched(pack_nodes):
    tiny, positive, negative, latent = setup(CASES["sd35_medium"]._replace(batch=1, latent_batch=1))
    text, visual = 154, tm.image_tokens(tiny, 16, 16)
    patched = taca(pack_nodes, with_override(tiny.patcher, AttentionSpy()))
    # clone() deep-copies model_options in ComfyUI 0.3.75: read the spy the patched model holds.
    spy = installed_override(patched)
    one_step(patched, positive, negative, latent, cfg=3.0)
    x_only = [c for c in spy.calls if c[2] == visual]
    joint_text_rows = [c for c in spy.calls if c[1] == text and c[2] == text + visual]
    joint_visual_rows = [c for c in spy.calls if c[1] == visual and c[2] == text + visual]
    unsplit_joint = [c for c in spy.calls if c[1] == text + visual]
    # 2 blocks, both with an image-only attention; one model call (cond + uncond batched).
    assert len(x_only) == 2 and all(c[1] == visual for c in x_only)
    assert len(joint_text_rows) == 2 and len(joint_visual_rows) == 2
    assert unsplit_joint == []
    assert len(spy.calls) == 6


@pytest.mark.parametrize("mode", ["selective", "flex"])
def test_other_modes_on_an_image_first_family(pack_nodes, mode):
    """HiDream (image first, text last): 'flex' is eq. 10 exactly; 'selective' is within its listing-2 error."""
    case = CASES["hidream"]
    tiny, positive, negative, latent = setup(case)
    reference = ReferenceTacaAttention(joint_layout("hidream"), GAMMA)
    out = one_step(taca(pack_nodes, tiny.patcher, mode=mode), positive, negative, latent, cfg=case.cfg)
    ref = one_step(with_override(tiny.patcher, reference), positive, negative, latent, cfg=case.cfg)
    plain = one_step(tiny.patcher, positive, negative, latent, cfg=case.cfg)
    if mode == "flex":
        assert rel_diff(out, ref) <= TOLERANCE
    else:
        assert rel_diff(out, plain) > 100 * TOLERANCE and rel_diff(out, ref) < rel_diff(plain, ref)


@pytest.mark.parametrize("name", AVAILABLE)
def test_only_joint_calls_are_split_and_the_rest_untouched(pack_nodes, name):
    """Another pack's override sees every call: joint calls arrive split in a text-row and a visual-row call (a
    joint call of the visual rows alone arrives whole), refiner and single-modality calls arrive whole, exactly as
    without TACA."""
    case = CASES[name]
    tiny, positive, negative, latent = setup(case)
    patched = taca(pack_nodes, with_override(tiny.patcher, AttentionSpy()))
    spy = installed_override(patched)
    at = step(case, tiny)
    one_step(patched, positive, negative, latent, **at)
    plain_model = with_override(tiny.patcher, AttentionSpy())
    plain_spy = installed_override(plain_model)
    one_step(plain_model, positive, negative, latent, **at)

    (length, (start, stop)), = joint_layout(name).items()
    text, visual = stop - start, length - (stop - start)
    joint = (visual if case.visual_rows else length, length)  # the (q, k) lengths of the model's joint call
    plain_joint = [c for c in plain_spy.calls if c[1:] == joint]
    # every joint block of every model call (cond and uncond batched in one call, or run one after the other)
    assert len(plain_joint) > 0 and len(plain_joint) % case.joint_calls == 0
    plain_other = [c for c in plain_spy.calls if c[1:] != joint]
    assert {c[1:] for c in plain_other} == case.other

    split = sorted(c[1] for c in spy.calls if c[2] == length)
    if case.visual_rows:
        assert split == [visual] * len(plain_joint)  # each the model's own call, keys scaled but not split
    else:
        assert length not in split  # no joint call went through unsplit
        assert split == sorted([text, visual] * len(plain_joint))  # one text-row and one visual-row call each
    other = [c for c in spy.calls if c[2] != length]
    assert sorted(other) == sorted(plain_other)  # the refiners' calls, whole and unchanged


# Flow models (sigma in [0, 1]) of several families; one name per line.
SIGMA_GATED = [
    "auraflow",
    "chroma_radiance",
    "hunyuan_video",
    "qwen_image",
    "hidream",
    "lumina2",
    "z_image",
    "omnigen2",
    "hunyuan_image21",
    "hunyuan_video15",
    "lens",
    "joyimage",
    "pixeldit",
    "pid",
    "minimax_h3",
    "ideogram4",
    "krea2",
    "longcat_image",
    "mage_flow",
    "z_image_pixel",
    "boogu",
    "hidream_o1",
]


@pytest.mark.parametrize("name", [name for name in SIGMA_GATED if name in AVAILABLE])
def test_below_threshold_bit_identical_and_gated_by_sigma(pack_nodes, name):
    case = CASES[name]
    tiny, positive, negative, latent = setup(case)
    patched = taca(pack_nodes, tiny.patcher, threshold=0.97)
    for sigma in (0.9, 0.969):
        a = one_step(patched, positive, negative, latent, sigma=sigma, cfg=case.cfg)
        b = one_step(tiny.patcher, positive, negative, latent, sigma=sigma, cfg=case.cfg)
        assert torch.equal(a, b), sigma
    a = one_step(patched, positive, negative, latent, sigma=0.97, cfg=case.cfg)
    b = one_step(tiny.patcher, positive, negative, latent, sigma=0.97, cfg=case.cfg)
    assert rel_diff(a, b) > 30 * TOLERANCE
    # gamma 1: bit-identical on every step
    assert torch.equal(one_step(taca(pack_nodes, tiny.patcher, gamma=1.0, threshold=0.0), positive, negative, latent,
                                sigma=1.0, cfg=case.cfg),
                       one_step(tiny.patcher, positive, negative, latent, sigma=1.0, cfg=case.cfg))


def test_hunyuan_video_sampled_through_comfy_sample(pack_nodes):
    """A few frames of HunyuanVideo through comfy.sample.sample (what KSampler runs), 8 steps, TACA on the steps
    with sigma >= 0.97 only: equal to the same run with the float64 reference gated by sigma."""
    case = CASES["hunyuan_video"]
    tiny, positive, negative, _ = setup(case)
    latent = tm.family_latent(tiny, batch=1, shape=(16, 3, 8, 8))
    positive = tm.family_conditioning(tiny, 1, batch=1)
    negative = tm.family_conditioning(tiny, 2, batch=1)
    model_sampling = tiny.patcher.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "simple", 8).cpu()
    taca_steps = [i for i, s in enumerate(sigmas[:-1].tolist()) if s >= 0.97]
    assert 0 < len(taca_steps) < 8  # shift 7: the first steps only

    def run(model):
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
        return comfy.sample.sample(model, noise, 8, 4.0, "euler", "simple", positive, negative, latent,
                                   disable_pbar=True, seed=3)

    patched = taca(pack_nodes, with_override(tiny.patcher, AttentionSpy()))
    out = run(patched)
    spy = installed_override(patched)
    gated = with_override(tiny.patcher, ReferenceTacaAttention(joint_layout("hunyuan_video"), GAMMA, threshold=0.97))
    ref = run(gated)
    plain = run(tiny.patcher)
    assert out.shape == (1, 16, 3, 8, 8) and torch.isfinite(out).all()
    assert rel_diff(out, ref) <= TOLERANCE
    assert rel_diff(out, plain) > 30 * TOLERANCE
    step_of_sigma = {round(s, 5): i for i, s in enumerate(sigmas[:-1].tolist())}
    acted = {step_of_sigma[round(c[0], 5)] for c in spy.calls if c[2] == case.length and c[1] != case.length}
    untouched = {step_of_sigma[round(c[0], 5)] for c in spy.calls if c[1] == case.length}
    assert sorted(acted) == taca_steps
    assert untouched == set(range(8)) - set(taca_steps)


@pytest.mark.skipif(not tm.available("cogvideox"), reason="CogVideoX is newer than this ComfyUI")
def test_cogvideox_threshold_is_on_the_models_own_timestep(pack_nodes):
    """CogVideoX is a discrete-time model: its sigmas run from about 4519 down, so eq. 11's t >= 970 is read on
    the timestep ComfyUI's model_sampling maps each sigma to, not on the raw sigma (>= 0.97 on almost every step).
    20 steps of the simple schedule through ComfyUI's sampler (VOIDSampler's DDIM, as CogVideoX workflows run it):
    TACA splits the joint calls on exactly the steps with t >= 970, and the run equals the float64 reference gated
    the same way."""
    from comfy_extras.nodes_void import VOID_DDIM

    from devtools.sampling import sample_sigmas

    case = CASES["cogvideox"]
    tiny, positive, negative, latent = setup(case)
    model_sampling = tiny.patcher.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "simple", 20).cpu()

    def timestep(sigma: float) -> int:
        return int(model_sampling.timestep(torch.tensor([sigma])).item())

    taca_steps = [i for i, s in enumerate(sigmas[:-1].tolist()) if timestep(s) >= 970]
    raw_sigma_steps = [i for i, s in enumerate(sigmas[:-1].tolist()) if s >= 0.97]
    assert taca_steps == [0] and len(raw_sigma_steps) > 10  # the rule matters on this schedule

    def run(model):
        return sample_sigmas(model, positive, negative, latent, sigmas, cfg=case.cfg, seed=3, sampler=VOID_DDIM())

    patched = taca(pack_nodes, with_override(tiny.patcher, AttentionSpy()))
    out = run(patched)
    spy = installed_override(patched)
    reference = ReferenceTacaAttention(joint_layout("cogvideox"), GAMMA, threshold=lambda s: timestep(s) >= 970)
    ref = run(with_override(tiny.patcher, reference))
    plain = run(tiny.patcher)
    assert rel_diff(out, ref) <= TOLERANCE
    assert rel_diff(out, plain) > 10 * TOLERANCE  # one TACA step of 20 (measured 1.8e-3)
    step_of_sigma = {round(s, 3): i for i, s in enumerate(sigmas[:-1].tolist())}
    split = {step_of_sigma[round(c[0], 3)] for c in spy.calls if c[2] == case.length and c[1] != case.length}
    assert sorted(split) == taca_steps


@pytest.mark.parametrize("kind,class_name", [
    ("sdxl", "SDXL"), ("wan21", "WAN21"), ("wan21_vace", "WAN21_Vace"), ("wan22", "WAN22"), ("pixart", "PixArt"),
    ("hunyuan_dit", "HunyuanDiT"), ("cosmos_predict2", "CosmosPredict2"),
])


def test_cross_attention_models_are_told_why_taca_does_not_apply(pack_nodes, kind, class_name):
    patcher = tm.build_cross_attention(kind)
    assert type(patcher.model).__name__ == class_name
    before = repr(patcher.model_options)
    with pytest.raises(ValueError) as err:
        taca(pack_nodes, patcher)
    message = str(err.value)
    for word in (class_name, "cross-attention", "no text/visual token imbalance", "FLUX.1", "AuraFlow", "HiDream"):
        assert word in message, (word, message)
    assert repr(patcher.model_options) == before


NEW_CROSS_ATTENTION = ["Kandinsky5", "Kandinsky5Image", "Anima", "LTXAV", "StableAudio3", "ACEStep15",
                       "WAN21_CausalAR", "WAN21_FlowRVS", "WAN21_SCAIL", "WAN21_SCAIL2", "WAN22_WanDancer",
                       "WAN_Animate2"]
NOT_VISUAL_GENERATION = {"DepthAnything3": "depth", "RT_DETR_v4": "detector", "SAM3": "segmentation",
                         "Trellis2": "3D", "MiniMaxMusic3": "music", "TripoSplat": "3D"}


def _uninitialised(class_name: str):
    """An instance of this ComfyUI's model_base class, never initialised: refusals read only the class."""
    import comfy.model_base

    return object.__new__(getattr(comfy.model_base, class_name))


# with classes every tested ComfyUI has, so the list is never empty
@pytest.mark.parametrize("class_name", [c for c in ["SDXL", "WAN21", "LTXV"] + NEW_CROSS_ATTENTION
                                        if hasattr(comfy.model_base, c)])


def test_cross_attention_classes_are_told_why(class_name):
    from taca import families

    with pytest.raises(ValueError) as err:
        families.family_for_model(_uninitialised(class_name))
    message = str(err.value)
    for word in (class_name, "cross-attention", "no text/visual token imbalance", "FLUX.1"):
        assert word in message, (word, message)


def test_models_that_are_not_text_to_visual_generators_are_told_so():
    """The classes ComfyUI 0.33.0 added that generate no image or video from text (none exist in 0.3.75)."""
    from taca import families

    present = [c for c in NOT_VISUAL_GENERATION if hasattr(comfy.model_base, c)]
    assert len(present) in (0, len(NOT_VISUAL_GENERATION))
    for class_name in present:
        _refused_as_not_visual_generation(families, class_name)


def _refused_as_not_visual_generation(families, class_name: str) -> None:
    with pytest.raises(ValueError) as err:
        families.family_for_model(_uninitialised(class_name))
    message = str(err.value)
    for word in (class_name, NOT_VISUAL_GENERATION[class_name], "not a text-to-image or text-to-video model",
                 "bypass"):
        assert word in message, (word, message)
@pytest.mark.skipif(not tm.available("hidream_o1"), reason="this ComfyUI has no HiDream-O1")
@pytest.mark.parametrize("mode", ["exact", "flex"])
def test_hidream_o1_edit_puts_the_reference_image_on_both_sides(pack_nodes, mode):
    """Editing: ComfyUI splices the reference image's vision-tower tokens into the ids (the causal text pass) and
    appends its 32 x 32 patches to the image's.  The layout comes from the model's own token types (0: the text
    pass, 1: the rows of the one call the override sees); the spy sees that call, and TACA matches the reference."""
    tiny = tm.build("hidream_o1")
    image = torch.rand(1, 64, 80, 3, generator=torch.Generator().manual_seed(7))  # (B, H, W, RGB) in [0, 1]
    positive, negative = (tm.family_conditioning(tiny, seed, reference_latents=[image]) for seed in (1, 2))
    latent = tm.family_latent(tiny)
    conds = tiny.patcher.model.extra_conds(text_input_ids=positive[0][1]["text_input_ids"], noise=latent,
                                           reference_latents=[image])
    token_types = conds["token_types"].cond[0]
    length, text = token_types.shape[0], int((token_types == 0).sum())
    assert bool((token_types[:text] == 0).all())  # the text pass is a prefix
    # The 34 ids plus the vision tower's (416/32) x (320/32) = 130 merged tokens of the image resized to 384^2 pixels
    # and its 2 markers: 166 ids, 165 before <|tms|>.  Then <|tms|>, 4 x 3 image patches and 4 x 3 patches of the
    # reference resized to 128 x 96 (about the target's area): 190.
    assert (text, length) == (165, 190)
    plain_model = with_override(tiny.patcher, AttentionSpy())
    plain = one_step(plain_model, positive, negative, latent, cfg=3.0)
    assert {c[1:] for c in installed_override(plain_model).calls} == {(length - text, length)}
    reference = ReferenceTacaAttention({length: (0, text)}, GAMMA)
    out = one_step(taca(pack_nodes, tiny.patcher, mode=mode), positive, negative, latent, cfg=3.0)
    ref = one_step(with_override(tiny.patcher, reference), positive, negative, latent, cfg=3.0)
    assert reference.joint_calls == 2  # 2 layers; cond and uncond batched in one model call
    assert rel_diff(out, ref) <= TOLERANCE
    assert rel_diff(plain, ref) > 30 * TOLERANCE


@pytest.mark.parametrize("kind,class_name,where", [
    case for case in [("ernie_image", "ErnieImage", "comfy.ldm.ernie.model"),
                      ("seedvr2", "SeedVR2", "comfy.ldm.seedvr.attention")] if tm.available(case[0])])
def test_joint_attention_taca_cannot_reach_is_refused_with_the_reason(pack_nodes, kind, class_name, where):
    """ERNIE-Image and SeedVR2 do run a joint text+image softmax, but call their attention without
    transformer_options, so the attention override never sees it: the node refuses them, saying so, instead of
    returning a model on which it would silently do nothing."""
    from taca import families

    patcher = tm.build_unsupported(kind)
    assert type(patcher.model).__name__ == class_name
    assert class_name in families.UNREACHABLE_MODELS and class_name not in families.CROSS_ATTENTION_MODELS
    assert all(class_name not in family.model_classes for family in families.FAMILIES)
    before = repr(patcher.model_options)
    with pytest.raises(ValueError) as err:
        taca(pack_nodes, patcher)
    message = str(err.value)
    for word in (class_name, "cannot reach", where, "without transformer_options", "never sees",
                 "Remove the TACA Patch Model node (or bypass it)", "FLUX.1", "HiDream"):
        assert word in message, (word, message)
    assert "cross-attention" not in message and "yet" not in message
    assert repr(patcher.model_options) == before


def test_every_model_base_class_is_placed():
    """Every comfy.model_base model class of this ComfyUI is placed: supported (each one sampled against the
    reference: the next test), refused with its reason (cross-attention, a joint attention TACA cannot reach, not a
    text-to-image/video model), or one of the few joint-attention classes knowingly left unsupported, which get the
    generic message.  Each refusal is checked on the class itself: the message says the reason it was placed for."""
    import inspect

    from taca import families

    left_unsupported = {"GenmoMochi", "Hunyuan3Dv2", "Hunyuan3Dv2_1"}
    supported = {c for f in families.FAMILIES for c in f.model_classes}
    reasons = {  # placement -> words its message must hold
        "cross-attention": (set(families.CROSS_ATTENTION_MODELS), "its text enters through cross-attention"),
        "unreachable": (set(families.UNREACHABLE_MODELS), "cannot reach the joint attention"),
        "not generation": (set(families.NOT_VISUAL_GENERATION_MODELS), "not a text-to-image or text-to-video model"),
        "left": (left_unsupported, "does not support the model class"),
    }
    groups = [supported] + [names for names, _ in reasons.values()]
    assert sum(len(g) for g in groups) == len(set().union(*groups)), "a class is placed twice"
    classes = {name for name, cls in inspect.getmembers(comfy.model_base, inspect.isclass)
               if cls.__module__ == "comfy.model_base" and issubclass(cls, comfy.model_base.BaseModel)}
    assert classes - set().union(*groups) == set()
    for class_name in sorted(classes - supported):
        with pytest.raises(ValueError) as err:
            families.family_for_model(_uninitialised(class_name))
        words = next(w for names, w in reasons.values() if class_name in names)
        assert class_name in str(err.value) and words in str(err.value), (class_name, str(err.value))
    for class_name in sorted(classes & supported):
        assert class_name in families.family_for_model(_uninitialised(class_name)).model_classes


SUBCLASS_KINDS = ["hunyuan_video_skyreels", "hunyuan_video15_sr", "hunyuan_image21_refiner"]


def test_every_supported_class_of_this_comfyui_is_sampled_against_the_reference():
    """Each model class the family table supports, where this ComfyUI has it, is the class of a tiny model some
    forward test above compares with the float64 reference (the case table or the subclass test)."""
    from taca import families

    supported = {c for f in families.FAMILIES for c in f.model_classes if hasattr(comfy.model_base, c)}
    kinds = {CASES[name].kind for name in AVAILABLE} | set(SUBCLASS_KINDS)
    tested = {type(tm.build(kind).patcher.model).__name__ for kind in kinds}
    assert supported - tested == set()


@pytest.mark.parametrize("kind", SUBCLASS_KINDS)
def test_supported_subclasses_patch_and_match_the_reference(pack_nodes, kind):
    """Subclasses claimed supported: same forward (only the concatenated channels or the timestep input differ)."""
    tiny = tm.build(kind)
    spec = tm.FAMILY_KINDS[kind]
    c, *grid = spec.latent_shape
    patch = spec.unet_config["patch_size"][-len(grid):]
    visual = 1
    for size, p in zip(grid, patch):
        visual *= size // p
    text = spec.text_tokens
    positive = tm.family_conditioning(tiny, 1, batch=2)
    negative = tm.family_conditioning(tiny, 2, batch=2)
    latent = tm.family_latent(tiny, batch=2)
    layout = observe_joint_layout(tiny.patcher, positive, latent)
    (length, (start, stop)), = layout.items()
    assert (length, stop - start) == (visual + text, text)
    reference = ReferenceTacaAttention(layout, GAMMA)
    out = one_step(taca(pack_nodes, tiny.patcher), positive, negative, latent, cfg=3.0)
    ref = one_step(with_override(tiny.patcher, reference), positive, negative, latent, cfg=3.0)
    plain = one_step(tiny.patcher, positive, negative, latent, cfg=3.0)
    assert rel_diff(out, ref) <= TOLERANCE
    assert rel_diff(plain, ref) > 30 * TOLERANCE


def test_joint_attention_models_not_supported_yet_get_the_generic_message(pack_nodes):
    patcher = tm.build_unsupported("hunyuan3d")
    with pytest.raises(ValueError) as err:
        taca(pack_nodes, patcher)
    message = str(err.value)
    for word in ("Hunyuan3Dv2", "not support", "FLUX.1", "AuraFlow", "OmniGen2"):
        assert word in message, (word, message)
    assert "cross-attention" not in message


@pytest.mark.parametrize("name", ["hunyuan_video", "hunyuan_video15", "hunyuan_image21"])
def test_hunyuan_order_matches_what_this_comfyui_does(name):
    """HunyuanVideo 1.0 / 1.5 and HunyuanImage 2.1 changed their token order between ComfyUI versions (0.3.75:
    image first; 0.33.0: text first).  The observed layout must be one of the two, text at one end; the forward
    tests then check that TACA scales exactly those tokens."""
    (length, (start, stop)), = joint_layout(name).items()
    assert start == 0 or stop == length
    import comfyui_version
    image_first = stop == length
    if comfyui_version.__version__ == "0.3.75":
        assert image_first
    elif comfyui_version.__version__ == "0.33.0":
        assert not image_first
