"""Which ComfyUI models TACA supports, and where their text tokens sit.

This is the one place that knows model families.  Each entry says how many
text and visual tokens a model call's joint attention holds, read at run time
from the actual inputs of ``BaseModel.apply_model`` (so ComfyUI's own text
lengths are used: 256+ T5 tokens for FLUX, about 154 for SD3, 512 for Flux.2),
and in which order they are concatenated.  An attention call whose sequence
length is not exactly text + visual (SD3.5 Medium's image-only self-attention,
for instance) is left alone.  HiDream-O1 hands the attention override only the
visual query rows of its joint attention, against all of it (``JointLayout.visual_queries_only``).

Models are matched by the exact ``comfy.model_base`` class name rather than by
inheritance, so a subclass we have not checked (a future subclass of Flux, for
example) is reported as unsupported instead of being patched blindly.
Nothing here imports ComfyUI; models are inspected by duck typing.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from .attention import JointLayout

CountFn = Callable[[Any, Any, Dict[str, Any]], int]
# (diffusion_model, x, context, conds) -> every joint layout of this model call (at most one per sequence length)
LayoutsFn = Callable[[Any, Any, Any, Dict[str, Any]], List[JointLayout]]


class UnsupportedModelError(ValueError):
    """Raised for a model TACA cannot patch; the message says why and what is supported."""


class ModelFamily(NamedTuple):
    name: str
    model_classes: Tuple[str, ...]  # comfy.model_base class names
    text_first: bool
    count_text: CountFn  # (diffusion_model, context, conds) -> text tokens
    count_visual: CountFn  # (diffusion_model, x, conds) -> visual tokens
    text_side: str  # for the README support matrix and error messages
    # Families whose blocks concatenate different token sets give all their layouts here; by default the one
    # layout text + visual, in the family's order.
    layouts_fn: Optional[LayoutsFn] = None
    untouched: str = "-"  # attention that is not the joint text+visual attention, for the README support matrix
    # True where the model hands the attention override only the visual query rows of its joint attention, against
    # the whole sequence, and computes the text rows itself (HiDream-O1): its layouts say ``visual_queries_only``.
    visual_rows_call: bool = False

    def span(self, text_tokens: int, visual_tokens: int) -> JointLayout:
        length = text_tokens + visual_tokens
        if self.text_first:
            return JointLayout.text_first(text_tokens, length, self.visual_rows_call)
        return JointLayout.text_last(text_tokens, length, self.visual_rows_call)

    def layouts(self, diffusion_model: Any, x: Any, context: Any, conds: Dict[str, Any]) -> List[JointLayout]:
        """The joint text+visual layouts of one model call, read from its actual inputs."""
        if self.layouts_fn is not None:
            return self.layouts_fn(diffusion_model, x, context, conds)
        text = self.count_text(diffusion_model, context, conds)
        return [self.span(text, self.count_visual(diffusion_model, x, conds))]


def _patch_size(diffusion_model: Any) -> Tuple[int, int]:
    p = getattr(diffusion_model, "patch_size", 1)
    if isinstance(p, (tuple, list)):
        return int(p[-2]), int(p[-1])
    return int(p), int(p)


def _patch_tokens(latent: Any, patch: Tuple[int, int]) -> int:
    """Tokens of one (B, C, H, W) latent after padding to the patch size."""
    h, w = latent.shape[-2], latent.shape[-1]
    return math.ceil(h / patch[0]) * math.ceil(w / patch[1])


def _context_tokens(diffusion_model: Any, context: Any, conds: Dict[str, Any]) -> int:
    return 0 if context is None else int(context.shape[1])


def _mmdit_text_tokens(diffusion_model: Any, context: Any, conds: Dict[str, Any]) -> int:
    # SD3's learned register tokens are prepended to the context inside the model.
    registers = int(getattr(diffusion_model, "register_length", 0) or 0)
    return _context_tokens(diffusion_model, context, conds) + registers


def _image_tokens(diffusion_model: Any, x: Any, conds: Dict[str, Any]) -> int:
    return _patch_tokens(x, _patch_size(diffusion_model))


def _flux_visual_tokens(diffusion_model: Any, x: Any, conds: Dict[str, Any]) -> int:
    # Kontext / Flux.2 reference images are appended to the image tokens: they are visual.
    patch = _patch_size(diffusion_model)
    refs: Sequence[Any] = conds.get("ref_latents") or ()
    return _patch_tokens(x, patch) + sum(_patch_tokens(r, patch) for r in refs)


def _ceil_tokens(sizes: Sequence[int], patch: Sequence[int]) -> int:
    """Tokens of a grid of ``sizes`` cut in patches of ``patch`` (each dimension padded up to the patch)."""
    return math.prod(math.ceil(int(s) / int(p)) for s, p in zip(sizes, patch))


def _latent_list(value: Any) -> Sequence[Any]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return value
    return (value,)


def _auraflow_text_tokens(diffusion_model: Any, context: Any, conds: Dict[str, Any]) -> int:
    # AuraFlow prepends its learned register tokens to the projected context: they are on the text side.
    registers = getattr(diffusion_model, "register_tokens", None)
    return _context_tokens(diffusion_model, context, conds) + (0 if registers is None else int(registers.shape[1]))


def _hunyuan_patch(diffusion_model: Any, latent: Any) -> Tuple[int, ...]:
    patch = tuple(int(p) for p in diffusion_model.patch_size)
    return patch[-(latent.ndim - 2):] if latent.ndim - 2 < len(patch) else patch


def _hunyuan_visual_tokens(diffusion_model: Any, x: Any, conds: Dict[str, Any]) -> int:
    # HunyuanVideo / HunyuanImage 2.1: the latent (2D or 3D) cut by the patch embedder, plus any reference
    # latent (HunyuanVideo 1.0 I2V "ref_latent"), which the model prepends to the image tokens.
    tokens = _ceil_tokens(x.shape[2:], _hunyuan_patch(diffusion_model, x))
    for ref in _latent_list(conds.get("ref_latent")):
        tokens += _ceil_tokens(ref.shape[2:], _hunyuan_patch(diffusion_model, ref))
    return tokens


def _hunyuan_text_tokens(diffusion_model: Any, context: Any, conds: Dict[str, Any]) -> int:
    # The refined text tokens (the token refiner is self-attention over the text alone, left untouched),
    # plus the byT5 glyph tokens and the vision-encoder tokens the model concatenates to them when it has
    # the layers for them (HunyuanImage 2.1, HunyuanVideo 1.5).
    tokens = _context_tokens(diffusion_model, context, conds)
    byt5 = conds.get("txt_byt5")
    if byt5 is not None and getattr(diffusion_model, "byt5_in", None) is not None:
        tokens += int(byt5.shape[1])
    clip_fea = conds.get("clip_fea")
    if clip_fea is not None and getattr(diffusion_model, "vision_in", None) is not None:
        tokens += int(clip_fea.shape[1])
    return tokens


def _hunyuan_image_first(diffusion_model: Any) -> bool:
    """Whether this ComfyUI's HunyuanVideo / HunyuanImage 2.1 puts the image tokens before the text.

    ComfyUI 0.3.75 builds the double blocks with ``flipped_img_txt=True`` (the block concatenates image, text and
    the single blocks follow with matching RoPE ids); in newer ComfyUI (0.33.0 and likely earlier) the flag is
    gone and the model concatenates text first, as FLUX does.  So the flag, where the blocks have it, says the order, and its
    absence means text first; both branches are exercised by the tests, one per ComfyUI version.
    """
    blocks = getattr(diffusion_model, "double_blocks", None)
    if blocks is None or len(blocks) == 0:
        return False
    return bool(getattr(blocks[0], "flipped_img_txt", False))


def _hunyuan_layouts(diffusion_model: Any, x: Any, context: Any, conds: Dict[str, Any]) -> List[JointLayout]:
    text = _hunyuan_text_tokens(diffusion_model, context, conds)
    visual = _hunyuan_visual_tokens(diffusion_model, x, conds)
    if _hunyuan_image_first(diffusion_model):
        return [JointLayout.text_last(text, text + visual)]
    return [JointLayout.text_first(text, text + visual)]


def _hunyuan_family(name: str, model_classes: Tuple[str, ...], text_side: str) -> ModelFamily:
    """A HunyuanVideo / HunyuanImage 2.1 family: they count their tokens alike, take their order from this
    ComfyUI's blocks (``_hunyuan_layouts``) and leave the token refiner alone; only the text side differs."""
    return ModelFamily(name=name, model_classes=model_classes, text_first=False, count_text=_hunyuan_text_tokens,
                       count_visual=_hunyuan_visual_tokens, text_side=text_side, layouts_fn=_hunyuan_layouts,
                       untouched="the token refiner")


def _plane_tokens(diffusion_model: Any, latents: Sequence[Any]) -> int:
    """Image tokens of 4D (B, C, H, W) or 5D (B, C, F, H, W) latents patchified over H and W.

    ComfyUI 0.3.75 only runs F == 1 for these models; newer Qwen-Image (Layered) and Lumina (Ming-Image) builds
    patchify every frame, F x the plane, which this count follows.
    """
    patch = _patch_size(diffusion_model)
    return sum(_ceil_tokens(lat.shape[-2:], patch) * (int(lat.shape[2]) if lat.ndim == 5 else 1) for lat in latents)


def _with_ref_latents_visual_tokens(diffusion_model: Any, x: Any, conds: Dict[str, Any]) -> int:
    # Qwen-Image(-Edit), Omnigen2: every image plane (the latent's last two dims) is patchified after padding;
    # reference images are visual tokens too.
    return _plane_tokens(diffusion_model, [x, *_latent_list(conds.get("ref_latents"))])


def _hidream_text_tokens(diffusion_model: Any, context: Any, conds: Dict[str, Any]) -> int:
    # Every HiDream block sees the T5 tokens, the Llama tokens of the last Llama layer and the Llama tokens of
    # that block's own layer: T5 + 2 x Llama tokens, after the image tokens.
    llama = conds.get("encoder_hidden_states_llama3")
    llama_tokens = 0 if llama is None else int(llama.shape[-2])
    return _context_tokens(diffusion_model, context, conds) + 2 * llama_tokens


def _hidream_visual_tokens(diffusion_model: Any, x: Any, conds: Dict[str, Any]) -> int:
    # HiDream-E1 edit: the condition image is concatenated to the latent along its width before patchifying.
    width = int(x.shape[-1])
    image_cond = conds.get("image_cond")
    if image_cond is not None:
        width += int(image_cond.shape[-1])
    return _ceil_tokens((x.shape[-2], width), _patch_size(diffusion_model))


def _round_up(n: int, multiple: Any) -> int:
    if not multiple:
        return n
    return n + (-n) % int(multiple)


def _lens_visual_tokens(diffusion_model: Any, x: Any, conds: Dict[str, Any]) -> int:
    # Lens: every position of the Flux.2 latent is one token (the VAE latent is already patchified; the model's
    # patch_size only shapes its output projection).
    return int(x.shape[-2]) * int(x.shape[-1])


def _joyimage_visual_tokens(diffusion_model: Any, x: Any, conds: Dict[str, Any]) -> int:
    # JoyImage: the (B, C, T, H, W) latent and every reference latent, each padded to the 3D patch and cut by the
    # Conv3d patch embedder; the references follow the target image and are visual tokens too.
    patch = diffusion_model.patch_size
    return sum(_ceil_tokens(lat.shape[2:], patch) for lat in [x, *_latent_list(conds.get("ref_latents"))])


def _pixeldit_text_tokens(diffusion_model: Any, context: Any, conds: Dict[str, Any]) -> int:
    # PixelDiT / PiD keep at most txt_max_length (300) caption tokens: the model cuts a longer context there.
    # ComfyUI's Gemma-2 encoder hands exactly 300 (padding included; the model ignores the attention mask).
    tokens = _context_tokens(diffusion_model, context, conds)
    limit = getattr(diffusion_model, "txt_max_length", None)
    return tokens if limit is None else min(tokens, int(limit))


def _minimax_h3_visual_tokens(diffusion_model: Any, x: Any, conds: Dict[str, Any]) -> int:
    # MiniMax H3 packs [text | keyframe condition rows or reference blocks | audio | video]; everything after the
    # text is visual.  x is the sampler's flat pack of the video and audio latents, "latent_shapes" their shapes;
    # the condition latents ride in "minimax_payload" and are laid out as the model's PackedLayout does.
    shapes = conds.get("latent_shapes") or [x.shape]
    video = shapes[0]
    patch = tuple(int(p) for p in getattr(diffusion_model, "patch_size", (1, 2, 2)))
    frame = _ceil_tokens(video[3:], patch[1:])  # 2x2-patch rows of one target latent frame (padded like the model)
    tokens = int(video[2]) * frame
    if len(shapes) > 1:
        tokens += 2 * int(shapes[1][-1])  # stereo audio: one row per channel and latent frame
    payload = conds.get("minimax_payload") or {}
    for keyframe in payload.get("keyframes") or ():
        # keyframe video rows share the target frame grid; keyframe audio rows are stereo like the target's
        if keyframe.get("latent") is not None:
            tokens += int(keyframe["latent"].shape[2]) * frame
        if keyframe.get("audio_latent") is not None:
            tokens += 2 * int(keyframe["audio_latent"].shape[-1])
    for block in payload.get("refs") or ():
        kind = block["kind"]
        ref_frame = (int(block.get("latent_h", 0)) // patch[1]) * (int(block.get("latent_w", 0)) // patch[2])
        if kind == "image":
            tokens += ref_frame
        elif kind == "audio":
            tokens += 2 * int(block["ref_audio_t"])
        elif kind in ("video", "video_audio"):
            tokens += 2 * int(block["ref_audio_t"]) + int(block["latent_t"]) * ref_frame
    return tokens


def _cogvideox_visual_tokens(diffusion_model: Any, x: Any, conds: Dict[str, Any]) -> int:
    # CogVideoX: the (B, C, T, H, W) latent padded to the patch size and cut into p x p patches per frame
    # (CogVideoX 1.0), or into p_t x p x p patches (1.5, patch_size_t set).  Image-to-video concatenates the image
    # latent as channels, which adds no tokens.
    p = int(diffusion_model.patch_size)
    p_t = getattr(diffusion_model, "patch_size_t", None) or 1
    return _ceil_tokens(x.shape[2:], (p_t, p, p))


def _ideogram4_visual_tokens(diffusion_model: Any, x: Any, conds: Dict[str, Any]) -> int:
    # Ideogram 4's latent comes patchified (2 x 2 patches of 32 channels in its 128 channels): one image token per
    # latent position, no padding.
    return int(x.shape[-2]) * int(x.shape[-1])


def _krea2_visual_tokens(diffusion_model: Any, x: Any, conds: Dict[str, Any]) -> int:
    # Krea 2: each frame's plane, padded to the patch (frames go to the batch, one sequence each), plus the
    # reference latents, which the model appends only when a reference method is set (in the conditioning, or the
    # checkpoint's default); without one it ignores them.
    patch = (int(getattr(diffusion_model, "patch", 2)),) * 2
    tokens = _ceil_tokens(x.shape[-2:], patch)
    method = conds.get("ref_latents_method", getattr(diffusion_model, "default_ref_method", None))
    if method is not None:
        tokens += sum(_ceil_tokens(ref.shape[-2:], patch) for ref in _latent_list(conds.get("ref_latents")))
    return tokens


def _zimage_omni(conds: Dict[str, Any]) -> bool:
    # Z-Image's "omni" path (reference images) runs whenever the call carries reference latents.
    return len(_latent_list(conds.get("ref_latents"))) > 0


def _zimage_text_tokens(diffusion_model: Any, context: Any, conds: Dict[str, Any]) -> int:
    # Lumina 2 / Z-Image (and the pixel-space Z-Image, which assembles its tokens the same way): every caption
    # segment is padded to the model's pad_tokens_multiple and all of them are concatenated before the image side.  Omni (reference
    # images): one caption per reference (its reference_latents_text_embeds entry, or a segment of pad tokens
    # where there is none), the prompt's own caption, and the text embeds left over after the references.
    multiple = getattr(diffusion_model, "pad_tokens_multiple", None)
    tokens = _round_up(_context_tokens(diffusion_model, context, conds), multiple)
    if not _zimage_omni(conds):
        return tokens
    refs = _latent_list(conds.get("ref_latents"))
    ref_contexts = _latent_list(conds.get("ref_contexts"))
    for i in range(len(refs)):
        tokens += _round_up(int(ref_contexts[i].shape[1]), multiple) if i < len(ref_contexts) else int(multiple or 0)
    return tokens + sum(_round_up(int(c.shape[1]), multiple) for c in ref_contexts[len(refs):])


def _zimage_visual_tokens(diffusion_model: Any, x: Any, conds: Dict[str, Any]) -> int:
    # The image patches (padded to pad_tokens_multiple); omni: each reference image's patches (padded) before
    # them, and, on a model with a SigLIP embedder, the SigLIP tokens of each reference (a segment of pad tokens
    # where a reference has none, and one for the image itself), which sit between the captions and the patches.
    multiple = getattr(diffusion_model, "pad_tokens_multiple", None)
    tokens = _round_up(_plane_tokens(diffusion_model, [x]), multiple)
    if not _zimage_omni(conds):
        return tokens
    refs = _latent_list(conds.get("ref_latents"))
    tokens += sum(_round_up(_plane_tokens(diffusion_model, [r]), multiple) for r in refs)
    if getattr(diffusion_model, "siglip_embedder", None) is not None:
        siglip = _latent_list(conds.get("siglip_feats"))
        pad = int(multiple or 0) if getattr(diffusion_model, "siglip_pad_token", None) is not None else 0
        for i in range(len(refs)):
            tokens += _round_up(int(siglip[i].shape[1]) * int(siglip[i].shape[2]), multiple) if i < len(siglip) else pad
        tokens += pad  # the image's own SigLIP slot holds pad tokens
    return tokens


def _hidream_o1_text_tokens(diffusion_model: Any, context: Any, conds: Dict[str, Any]) -> int:
    # HiDream-O1 (one Qwen3-VL decoder over text and image) runs the token ids before <|tms|> (ar_len of them: the
    # chat template, the prompt and, when editing, the vision tokens of the reference images spliced into the ids)
    # as a causal text pass straight through SDPA; the rest of the sequence attends to all of it in the one call
    # that reaches the override.  The context is a stand-in for the ids, which come as their own input.
    ar_len = conds.get("ar_len")
    return 0 if ar_len is None else max(int(ar_len), 0)


def _hidream_o1_visual_tokens(diffusion_model: Any, x: Any, conds: Dict[str, Any]) -> int:
    # The query rows of that call: the ids from <|tms|> on (the token that carries the timestep), the image's
    # 32 x 32 pixel patches and the reference images' patches appended to them.
    input_ids = conds.get("input_ids")
    if input_ids is None:
        return 0
    patch = _patch_size(diffusion_model)
    tokens = int(input_ids.shape[1]) - _hidream_o1_text_tokens(diffusion_model, None, conds)
    tokens += (int(x.shape[-2]) // patch[0]) * (int(x.shape[-1]) // patch[1])  # the model floors (no padding)
    ref_patches = conds.get("ref_patches")
    return tokens + (0 if ref_patches is None else int(ref_patches.shape[1]))


FAMILIES: Tuple[ModelFamily, ...] = (
    ModelFamily(
        name="FLUX.1 (dev, schnell, Kontext, Fill)",
        model_classes=("Flux",),
        text_first=True,
        count_text=_context_tokens,
        count_visual=_flux_visual_tokens,
        text_side="T5 tokens (256+ in ComfyUI) plus any Redux/style-model tokens appended to the conditioning",
    ),
    ModelFamily(
        name="Flux.2",
        model_classes=("Flux2",),
        text_first=True,
        count_text=_context_tokens,
        count_visual=_flux_visual_tokens,
        text_side="text-encoder tokens, left-padded to 512",
    ),
    ModelFamily(
        name="Chroma, Chroma Radiance",
        model_classes=("Chroma", "ChromaRadiance"),
        text_first=True,
        count_text=_context_tokens,
        count_visual=_image_tokens,  # Radiance: pixel patches of the model's patch size (16); its NeRF head has no attention
        text_side="T5 tokens",
        untouched="Radiance's NeRF head (no attention)",
    ),
    ModelFamily(
        name="SD3 / SD3.5 (Large, Medium)",
        model_classes=("SD3",),
        text_first=True,
        count_text=_mmdit_text_tokens,
        count_visual=_image_tokens,
        text_side="CLIP-L/G + T5 tokens (about 154) plus register tokens",
        untouched="SD3.5 Medium's image-only attention",
    ),
    ModelFamily(
        name="AuraFlow",
        model_classes=("AuraFlow",),
        text_first=True,
        count_text=_auraflow_text_tokens,
        count_visual=_image_tokens,
        text_side="the model's 8 register tokens plus the T5 (Pile-T5) tokens",
    ),
    # (name, model classes, text side): the rest is the same for the three (see _hunyuan_family)
    _hunyuan_family("HunyuanVideo 1.0 (T2V, I2V, SkyReels I2V)",
                    ("HunyuanVideo", "HunyuanVideoI2V", "HunyuanVideoSkyreelsI2V"),
                    "the LLaVA-Llama tokens after the token refiner (I2V: including the image tokens the text "
                    "encoder put into them)"),
    _hunyuan_family("HunyuanVideo 1.5", ("HunyuanVideo15", "HunyuanVideo15_SR_Distilled"),
                    "vision-encoder tokens (I2V), byT5 tokens and the Qwen2.5-VL tokens after the token refiner"),
    _hunyuan_family("HunyuanImage 2.1", ("HunyuanImage21", "HunyuanImage21Refiner"),
                    "Qwen2.5-VL tokens after the token refiner plus the byT5 glyph tokens"),
    ModelFamily(
        name="Qwen-Image (and Qwen-Image-Edit)",
        model_classes=("QwenImage",),
        text_first=True,
        count_text=_context_tokens,
        count_visual=_with_ref_latents_visual_tokens,
        text_side="Qwen2.5-VL tokens (Edit: including the vision tokens of the input image); reference latents "
                  "count as image tokens",
    ),
    ModelFamily(
        name="HiDream",
        model_classes=("HiDream",),
        text_first=False,
        count_text=_hidream_text_tokens,
        count_visual=_hidream_visual_tokens,
        text_side="T5 tokens plus the Llama-3.1 tokens (twice: the last layer's and each block's own layer's)",
    ),
    ModelFamily(
        name="Lumina 2 / Z-Image",
        model_classes=("Lumina2",),
        text_first=True,
        # Lumina 2 sets no pad tokens and takes no reference images: its caption and its image, as they are
        count_text=_zimage_text_tokens,
        count_visual=_zimage_visual_tokens,
        text_side="the caption tokens, padding included as the model keeps it (Z-Image: its pad tokens; Z-Image "
                  "Omni: every reference's text segment too); reference images count as image tokens",
        untouched="the context and noise refiners",
    ),
    ModelFamily(
        name="OmniGen2",
        model_classes=("Omnigen2",),
        text_first=True,
        count_text=_context_tokens,
        count_visual=_with_ref_latents_visual_tokens,
        text_side="the Qwen2.5-VL tokens; reference images count as image tokens",
        untouched="the context, noise and reference-image refiners",
    ),
    ModelFamily(
        name="Lens",
        model_classes=("Lens",),
        text_first=False,
        count_text=_context_tokens,
        count_visual=_lens_visual_tokens,
        text_side="the GPT-OSS tokens (several layers' features side by side), masked padding included",
    ),
    ModelFamily(
        name="JoyImage (and JoyImage-Edit)",
        model_classes=("JoyImage",),
        text_first=False,
        count_text=_context_tokens,
        count_visual=_joyimage_visual_tokens,
        text_side="the Qwen3-VL tokens (Edit: including the vision tokens of the input images); reference latents "
                  "count as image tokens",
    ),
    ModelFamily(
        name="PixelDiT (T2I) and PiD",
        # PiD is PixelDiT with a low-quality latent added onto the image tokens (no tokens of its own): same layout.
        model_classes=("PixelDiTT2I", "PiD"),
        text_first=True,
        count_text=_pixeldit_text_tokens,
        count_visual=_image_tokens,  # pixel patches of the model's patch size (16), before any pixel-level block
        text_side="the Gemma-2 tokens (300 from ComfyUI's encoder, padding included, as the model keeps it; a "
                  "longer context is cut to 300)",
        untouched="the pixel blocks' attention over the patch tokens",
    ),
    ModelFamily(
        name="MiniMax H3 (audio + video)",
        model_classes=("MiniMaxH3",),
        text_first=True,
        count_text=_context_tokens,
        count_visual=_minimax_h3_visual_tokens,
        text_side="the Qwen3-VL tokens after the token refiner (including the vision tokens of the keyframe and "
                  "reference images the text encoder saw); keyframe, reference, audio and video latents count as "
                  "visual",
    ),
    ModelFamily(
        name="CogVideoX (1.0, 1.5; T2V, I2V, Fun inpainting)",
        model_classes=("CogVideoX",),
        text_first=True,
        count_text=_context_tokens,
        count_visual=_cogvideox_visual_tokens,
        text_side="the T5 tokens, padded to 226 (padding included: the model has no text mask)",
    ),
    ModelFamily(
        name="Ideogram 4",
        model_classes=("Ideogram4",),
        text_first=True,
        count_text=_context_tokens,
        count_visual=_ideogram4_visual_tokens,
        text_side="the Qwen3-VL tokens (13 layers stacked per token), padding included as the model keeps it "
                  "(masked out of the image's attention)",
    ),
    ModelFamily(
        name="Krea 2",
        model_classes=("Krea2",),
        text_first=True,
        count_text=_context_tokens,
        count_visual=_krea2_visual_tokens,
        text_side="the Qwen3-VL tokens after the model's text-fusion blocks; reference latents count as image "
                  "tokens",
        untouched="the text-fusion and text-refiner attention",
    ),
    # The four below are subclasses of supported classes with the same joint layout as their parent, each with its
    # own entry for its own text encoder (matching is by exact class name).
    ModelFamily(
        name="LongCat-Image (and LongCat-Image-Edit)",
        model_classes=("LongCatImage",),
        text_first=True,
        count_text=_context_tokens,
        count_visual=_flux_visual_tokens,
        text_side="Qwen2.5-VL tokens, the prompt padded to 512 (Edit: including the vision tokens of the input "
                  "image); reference latents count as image tokens",
    ),
    ModelFamily(
        name="Mage-Flow",
        model_classes=("MageFlow",),
        text_first=True,
        count_text=_context_tokens,
        count_visual=_with_ref_latents_visual_tokens,
        text_side="Qwen3-VL tokens (Edit: including the vision tokens of the input images); reference latents "
                  "count as image tokens",
    ),
    ModelFamily(
        name="Z-Image pixel space",
        model_classes=("ZImagePixelSpace",),
        text_first=True,
        count_text=_zimage_text_tokens,
        count_visual=_zimage_visual_tokens,
        text_side="the Qwen3 caption tokens with the model's pad tokens (Omni: every reference's text segment "
                  "too); reference images and their SigLIP tokens count as image tokens",
        untouched="the context and noise refiners",
    ),
    ModelFamily(
        name="Boogu-Image",
        model_classes=("Boogu",),
        text_first=True,
        count_text=_context_tokens,
        count_visual=_with_ref_latents_visual_tokens,
        text_side="the Qwen3-VL tokens; reference images count as image tokens",
        untouched="the context, noise and reference-image refiners, the image-only self-attention",
    ),
    ModelFamily(
        name="HiDream-O1",
        model_classes=("HiDreamO1",),
        text_first=True,
        count_text=_hidream_o1_text_tokens,
        count_visual=_hidream_o1_visual_tokens,
        text_side="the prompt in its chat template up to the begin-of-image token, including the vision tokens of "
                  "reference images (the model's causal text pass); the timestep token and the reference images' "
                  "patches count as image tokens",
        visual_rows_call=True,
        untouched="the causal text pass, which the model runs through SDPA itself (eq. 10 leaves text rows as they are)",
    ),
)

# model_base classes whose text (or other condition) enters through cross-attention: there is no joint softmax in
# which the text is outnumbered, so nothing to rebalance.  Every such class of ComfyUI 0.3.75 is listed (subclasses
# by name, since matching is by exact class name).  GenmoMochi and Hunyuan3Dv2 do use joint attention and get the
# "not supported yet" message instead.
CROSS_ATTENTION_MODELS: Tuple[str, ...] = (
    # UNets (SD1.x / SD2.x / SDXL and their variants, SVD, SV3D, Zero123, x4 upscaler, Lotus, Stable Cascade)
    "BaseModel", "SD21UNCLIP", "SDXL", "SDXLRefiner", "SD15_instructpix2pix", "SDXL_instructpix2pix",
    "SVD_img2vid", "SV3D_u", "SV3D_p", "Stable_Zero123", "SD_X4Upscaler", "Lotus",
    "StableCascade_C", "StableCascade_B",
    # cross-attention DiTs
    "PixArt", "HunyuanDiT", "LTXV", "CosmosVideo", "CosmosPredict2", "StableAudio1", "ACEStep",
    "WAN21", "WAN22", "WAN21_Vace", "WAN21_Camera", "WAN21_HuMo", "WAN22_Animate", "WAN22_S2V",
    # added in ComfyUI 0.33.0: Kandinsky 5 (video, image), Anima, LTX-2 audio+video, Stable Audio 3, ACE-Step 1.5
    # and Wan 2.1 / 2.2 variants (causal AR, FlowRVS, SCAIL, WanDancer, Animate 2)
    "Kandinsky5", "Kandinsky5Image", "Anima", "LTXAV", "StableAudio3", "ACEStep15", "WAN21_CausalAR",
    "WAN21_FlowRVS", "WAN21_SCAIL", "WAN21_SCAIL2", "WAN22_WanDancer", "WAN_Animate2",
)

# model_base classes that are not text-to-image or text-to-video generators: what each one is instead.
NOT_VISUAL_GENERATION_MODELS: Dict[str, str] = {
    "DepthAnything3": "a depth-estimation model",
    "RT_DETR_v4": "an object detector",
    "SAM3": "a segmentation model",
    "Trellis2": "an image-to-3D model",
    "MiniMaxMusic3": "a music (audio) generator",
    "TripoSplat": "an image-to-3D (Gaussian splat) model whose joint attention runs over image conditioning, not text",
}


# model_base classes with a joint text+image softmax that the attention override never sees: the model calls its
# attention function without transformer_options, and that function is a module-level name, shared by every model in
# the process, not an attribute of the model that a clone could replace.  Class name -> why, in words.
_SHARED = ("and that function is a module-level name, shared by every model in the process, not a part of this model "
           "that TACA could replace for it alone")
UNREACHABLE_MODELS: Dict[str, str] = {
    "ErnieImage": "its blocks run one softmax over the image and text tokens concatenated (comfy.ldm.ernie.model), but "
                  "call optimized_attention without transformer_options, so the attention override TACA installs on "
                  "the model never sees them, " + _SHARED,
    "SeedVR2": "its window attention is one softmax over each window's video tokens and the text tokens, but goes "
               "through comfy.ldm.seedvr.attention, which calls optimized_attention without transformer_options, so "
               "the attention override TACA installs on the model never sees it, " + _SHARED,
}


def supported_names() -> str:
    return ", ".join(f.name for f in FAMILIES)


def family_for_model(base_model: Any) -> ModelFamily:
    """The family of a ``comfy.model_base.BaseModel`` instance, or UnsupportedModelError."""
    class_name = type(base_model).__name__
    for family in FAMILIES:
        if class_name in family.model_classes:
            return family
    if class_name in NOT_VISUAL_GENERATION_MODELS:
        raise UnsupportedModelError(
            f"TACA does not apply to {class_name}: it is {NOT_VISUAL_GENERATION_MODELS[class_name]}, not a "
            f"text-to-image or text-to-video model, so there are no text tokens drowned by image tokens to "
            f"rebalance. Remove the TACA Patch Model node (or bypass it) for this model. TACA supports: "
            f"{supported_names()}."
        )
    if class_name in UNREACHABLE_MODELS:
        raise UnsupportedModelError(
            f"TACA cannot reach the joint attention of {class_name}: {UNREACHABLE_MODELS[class_name]}. "
            f"A TACA patch would have no effect on it. Remove the TACA Patch Model node (or bypass it) for this model. "
            f"Supported: {supported_names()}."
        )
    if class_name in CROSS_ATTENTION_MODELS:
        raise UnsupportedModelError(
            f"TACA does not apply to {class_name}: its text enters through cross-attention, not a joint "
            f"text+image softmax, so there is no text/visual token imbalance to correct. "
            f"TACA supports MM-DiT models: {supported_names()}."
        )
    raise UnsupportedModelError(
        f"TACA does not support the model class {class_name} yet. Supported: {supported_names()}. "
        f"Remove the TACA Patch Model node (or bypass it) for this model."
    )



class JointCalls(NamedTuple):
    """How many joint text+image attention calls one model call of a real model makes, from its published config."""

    model: str  # the model, as its makers name it
    family: str  # the ``ModelFamily.name`` it runs as
    calls: int  # joint attention calls per model call: what the Advanced node's ``blocks`` input counts
    blocks: Tuple[Tuple[int, str], ...]  # what they are, in call order: (how many, kind of block)
    unit: str = "blocks"  # what the model's config calls them
    not_counted: str = ""  # attention of the model that is not a joint call (TACA leaves it alone)

    def made_of(self) -> str:
        return " + ".join(f"{count} {kind}" for count, kind in self.blocks) + f" {self.unit}"


# Joint attention calls per model call of the real models (the one place these numbers are written: the Advanced
# node's tooltip, its help page and the support matrix are made from it).
JOINT_CALLS: Tuple[JointCalls, ...] = (
    JointCalls("FLUX.1", "FLUX.1 (dev, schnell, Kontext, Fill)", 57, ((19, "double-stream"), (38, "single-stream"))),
    JointCalls("Chroma", "Chroma, Chroma Radiance", 57, ((19, "double-stream"), (38, "single-stream"))),
    JointCalls("Flux.2 [dev]", "Flux.2", 56, ((8, "double-stream"), (48, "single-stream"))),
    JointCalls("SD3 / SD3.5 Medium", "SD3 / SD3.5 (Large, Medium)", 24, ((24, "joint"),),
               not_counted="SD3.5 Medium's extra image-only attention"),
    JointCalls("SD3.5 Large", "SD3 / SD3.5 (Large, Medium)", 38, ((38, "joint"),)),
    JointCalls("AuraFlow", "AuraFlow", 36, ((4, "joint"), (32, "single"))),
    JointCalls("HunyuanVideo 1.0", "HunyuanVideo 1.0 (T2V, I2V, SkyReels I2V)", 60,
               ((20, "double-stream"), (40, "single-stream")), not_counted="the token refiner"),
    JointCalls("Qwen-Image", "Qwen-Image (and Qwen-Image-Edit)", 60, ((60, "joint"),)),
    JointCalls("HiDream-I1", "HiDream", 48, ((16, "double-stream"), (32, "single-stream"))),
    JointCalls("Lumina 2", "Lumina 2 / Z-Image", 26, ((26, "joint"),), unit="layers",
               not_counted="the context and noise refiners"),
    JointCalls("Z-Image", "Lumina 2 / Z-Image", 30, ((30, "joint"),), unit="layers",
               not_counted="the context and noise refiners"),
)


def joint_calls_summary() -> str:
    """JOINT_CALLS in one line (the Advanced node's tooltip): models with the same count together, the first with what
    its calls are made of."""
    groups: List[List[JointCalls]] = []
    for row in JOINT_CALLS:
        if groups and groups[-1][0].calls == row.calls:
            groups[-1].append(row)
        else:
            groups.append([row])
    parts = [" and ".join(r.model for r in group) + f" {group[0].calls}" for group in groups]
    if len({row.made_of() for row in groups[0]}) == 1:
        parts[0] += f" ({groups[0][0].made_of()})"
    return ", ".join(parts)
