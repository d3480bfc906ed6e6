"""Which ComfyUI models TACA supports, and where their text tokens sit.

This is the one place that knows model families.  Each entry says how many
text and visual tokens a model call's joint attention holds, read at run time
from the actual inputs of ``BaseModel.apply_model`` (so ComfyUI's own text
lengths are used: 256+ T5 tokens for FLUX, about 154 for SD3, 512 for Flux.2),
and in which order they are concatenated.  An attention call whose sequence
length is not exactly text + visual (SD3.5 Medium's image-only self-attention,
for instance) is left alone.

Models are matched by the exact ``comfy.model_base`` class name rather than by
inheritance, so a subclass we have not checked (ChromaRadiance is a Chroma, for
example) is reported as unsupported instead of being patched blindly.
Nothing here imports ComfyUI; models are inspected by duck typing.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from .attention import TextSpan

CountFn = Callable[[Any, Any, Dict[str, Any]], int]
# (diffusion_model, x, context, conds) -> every joint layout of this model call (at most one per sequence length)
LayoutsFn = Callable[[Any, Any, Any, Dict[str, Any]], List[TextSpan]]


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

    def span(self, text_tokens: int, visual_tokens: int) -> TextSpan:
        length = text_tokens + visual_tokens
        if self.text_first:
            return TextSpan.text_first(text_tokens, length)
        return TextSpan.text_last(text_tokens, length)

    def layouts(self, diffusion_model: Any, x: Any, context: Any, conds: Dict[str, Any]) -> List[TextSpan]:
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
        name="Chroma",
        model_classes=("Chroma",),
        text_first=True,
        count_text=_context_tokens,
        count_visual=_image_tokens,
        text_side="T5 tokens",
    ),
    ModelFamily(
        name="SD3 / SD3.5 (Large, Medium)",
        model_classes=("SD3",),
        text_first=True,
        count_text=_mmdit_text_tokens,
        count_visual=_image_tokens,
        text_side="CLIP-L/G + T5 tokens (about 154) plus register tokens",
    ),
)

# Families whose text enters through cross-attention: there is no joint softmax to rebalance.
CROSS_ATTENTION_MODELS: Tuple[str, ...] = (
    "BaseModel", "SD21UNCLIP", "SDXL", "SDXLRefiner", "SD15_instructpix2pix", "SDXL_instructpix2pix",
    "SVD_img2vid", "StableCascade_C", "StableCascade_B", "PixArt", "HunyuanDiT", "WAN21", "WAN22",
    "CosmosVideo", "CosmosPredict2", "LTXV", "GenmoMochi",
)


def supported_names() -> str:
    return ", ".join(f.name for f in FAMILIES)


def family_for_model(base_model: Any) -> ModelFamily:
    """The family of a ``comfy.model_base.BaseModel`` instance, or UnsupportedModelError."""
    class_name = type(base_model).__name__
    for family in FAMILIES:
        if class_name in family.model_classes:
            return family
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


def family_by_class_name(class_name: str) -> Optional[ModelFamily]:
    for family in FAMILIES:
        if class_name in family.model_classes:
            return family
    return None
