"""Where a model's text tokens sit in its joint attention, found by observation, not read from any code.

The model runs three times on the ComfyUI in use: as given, with every text-side input replaced by other random
values (the context, and the extra token inputs some families take: Llama layers, byT5 glyph tokens, vision
tokens), and with every visual input replaced (the noise, reference latents, the latent PiD decodes).  Before the
first joint attention, text and image tokens have not met, so in that call's keys the rows that moved with the text
are text tokens and the rows that moved with the image are visual tokens.  Rows that moved with neither are learned
tokens (registers, padding); they belong to the run of tokens before them (padding follows what it pads), or, at the
start of the sequence, to the run after them (registers are prepended).

A model may hand the override only some query rows of its joint attention, against every key (HiDream-O1 computes
its text rows in a causal pass of their own): the queries, recorded too, must then be the last (or first) key rows,
the ones that moved with the image and, among those, none that moved with the text (a query row that moved with
neither, HiDream-O1's timestep token, is on the image side); every other key row is on the text side, and none of
them may have moved with the image.

This knows nothing of taca/families.py, so the spans it returns are an independent reference for it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from devtools.sampling import one_step
from harness import installed_override, with_override

# conditioning keys whose tensors are token sequences on the text side of the families we build
TEXT_SIDE_KEYS = ("conditioning_llama3", "conditioning_byt5small", "reference_latents_text_embeds")
# and those holding visual inputs (reference and condition latents)
VISUAL_KEYS = (
    "reference_latents",
    "ref_latent",
    "clip_vision_outputs",  # Z-Image omni: SigLIP features of the reference images
    "lq_latent",  # PiD: the latent it decodes
    "minimax_keyframes",  # MiniMax H3: lists of dicts holding condition latents
    "minimax_refs",
)
# conditioning keys holding token ids, which the model embeds itself (HiDream-O1)
TEXT_TOKEN_KEYS = ("text_input_ids",)
# Qwen's vocabulary, where those ids come from: the ids from here on are special tokens (chat template, vision and
# timestep markers), which say where the image and the timestep go; only the other ids (the prompt's) are replaced.
SPECIAL_TOKEN_IDS_FROM = 151643


class KeyRecorder:
    """Attention override that keeps every call's keys (and queries) as (B, N, ...) with the sequence on dim 1."""

    def __init__(self):
        self.keys: List[torch.Tensor] = []
        self.query_values: List[torch.Tensor] = []
        self.queries: List[int] = []

    def __call__(self, func, *args, **kwargs):
        q, k = args[0], args[1]
        seq_dim = 2 if kwargs.get("skip_reshape", False) else 1
        self.keys.append(k.detach().movedim(seq_dim, 1).flatten(2).double().clone())
        self.query_values.append(q.detach().movedim(seq_dim, 1).flatten(2).double().clone())
        self.queries.append(q.shape[seq_dim])
        return func(*args, **kwargs)


def _other(value: Any, generator: torch.Generator) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return torch.randn(value.shape, generator=generator, dtype=value.dtype)
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_other(v, generator) for v in value)
    if hasattr(value, "_fields"):  # a NamedTuple such as a CLIP vision output
        return type(value)(*(_other(v, generator) for v in value))
    if isinstance(value, dict):  # a keyframe or reference block: its latents change, its geometry stays
        return {k: _other(v, generator) for k, v in value.items()}
    return value


def _other_ids(ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    other = torch.randint(0, SPECIAL_TOKEN_IDS_FROM, ids.shape, generator=generator, dtype=ids.dtype)
    return torch.where(ids < SPECIAL_TOKEN_IDS_FROM, other, ids)


def _perturbed(conditioning, keys: Tuple[str, ...], context: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for tensor, options in conditioning:
        options = dict(options)
        for key in keys:
            if key in options:
                options[key] = _other(options[key], g)
        if context and "clip_vision_output" in options:
            options["clip_vision_output"] = _other(options["clip_vision_output"], g)
        for key in TEXT_TOKEN_KEYS:
            if context and key in options:
                options[key] = _other_ids(options[key], g)
        out.append([_other(tensor, g) if context else tensor, options])
    return out


def _record(patcher, positive, latent, seed: int) -> KeyRecorder:
    model = with_override(patcher, KeyRecorder())
    one_step(model, positive, positive, latent, cfg=1.0, seed=seed)
    return installed_override(model)


def _changed_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    scale = max(float(a.abs().max()), 1e-30)
    return ((a - b).abs().amax(dim=(0, 2)) > 1e-6 * scale)


def _assign_unmoved(owner: List[Optional[str]]) -> List[str]:
    """Rows that moved with neither input join the run before them (or, at the start, the run after them)."""
    first_known = next((o for o in owner if o is not None), None)
    assert first_known is not None, "no row moved with either input"
    out, last = [], first_known
    for o in owner:
        last = o if o is not None else last
        out.append(last)
    return out


def observe_joint_layout(patcher, positive, latent) -> Dict[int, Tuple[int, int]]:
    """{joint sequence length: (text start, text stop)} of the first joint attention call of one model call.

    ``positive`` is a ComfyUI conditioning list and ``latent`` the latent, as the test will sample them.
    """
    base = _record(patcher, positive, latent, seed=0)
    text = _record(patcher, _perturbed(positive, TEXT_SIDE_KEYS, context=True, seed=101), latent, seed=0)
    visual = _record(patcher, _perturbed(positive, VISUAL_KEYS, context=False, seed=202), latent, seed=1)
    assert len(base.keys) == len(text.keys) == len(visual.keys), "the runs made different attention calls"
    for i, (k, kt, kv) in enumerate(zip(base.keys, text.keys, visual.keys)):
        if base.queries[i] > k.shape[1]:
            continue  # more queries than keys: not an attention within one sequence
        moved_text, moved_visual = _changed_rows(k, kt), _changed_rows(k, kv)
        if not (moved_text.any() and moved_visual.any()):
            continue  # a text-only refiner or an image-only attention
        assert not (moved_text & moved_visual).any(), (
            f"call {i}: rows moved with both the text and the image; text and image have already met")
        if base.queries[i] < k.shape[1]:
            return {k.shape[1]: _text_outside_the_queries(i, base, text, visual, moved_text, moved_visual)}
        owner = ["text" if t else "visual" if v else None for t, v in zip(moved_text.tolist(), moved_visual.tolist())]
        owner = _assign_unmoved(owner)
        text_rows = [n for n, o in enumerate(owner) if o == "text"]
        start, stop = text_rows[0], text_rows[-1] + 1
        assert stop - start == len(text_rows), f"call {i}: text rows are not contiguous: {owner}"
        return {k.shape[1]: (start, stop)}
    raise AssertionError("no attention call mixed text and image tokens")


def _text_outside_the_queries(i: int, base: KeyRecorder, text: KeyRecorder, visual: KeyRecorder,
                              moved_text: torch.Tensor, moved_visual: torch.Tensor) -> Tuple[int, int]:
    """(text start, text stop) of call ``i``, whose queries are only some of its key rows."""
    q = base.query_values[i]
    n_query, n_key = q.shape[1], moved_text.shape[0]
    query_text, query_visual = _changed_rows(q, text.query_values[i]), _changed_rows(q, visual.query_values[i])
    assert query_visual.any() and not query_text.any(), f"call {i}: the queries are not image rows: {query_text}"
    # Which key rows the queries are: the last or the first n_query, told apart by the rows that moved with the image.
    offsets = [o for o in sorted({0, n_key - n_query}) if torch.equal(moved_visual[o:o + n_query], query_visual)]
    assert len(offsets) == 1, f"call {i}: the queries are neither the first nor the last key rows"
    start, stop = (n_query, n_key) if offsets[0] == 0 else (0, n_key - n_query)
    assert not moved_text[offsets[0]:offsets[0] + n_query].any(), f"call {i}: a query row's key moved with the text"
    assert moved_text[start:stop].any() and not moved_visual[start:stop].any(), (
        f"call {i}: the key rows outside the queries are not the text: {moved_visual[start:stop]}")
    return start, stop
