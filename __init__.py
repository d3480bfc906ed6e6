"""comfyui-taca: TACA (arXiv 2506.07986) for ComfyUI's MM-DiT models.

On a ComfyUI too old for the mechanisms the pack needs (V3 nodes, the
attention override passed through transformer_options, APPLY_MODEL wrappers),
loading logs one line naming the minimum version and registers no nodes.
"""

import logging

MIN_COMFYUI = "0.3.75"
WEB_DIRECTORY = "./js"


def _missing_mechanism():
    """Name the first ComfyUI mechanism this pack needs that is missing, or None."""
    try:
        import comfy.ldm.modules.attention as comfy_attention
        import comfy.patcher_extension as patcher_extension
        from comfy_api.latest import ComfyExtension, io  # noqa: F401
    except ImportError as err:
        return str(err)
    if not hasattr(comfy_attention, "wrap_attn"):
        return "comfy.ldm.modules.attention.wrap_attn (optimized_attention_override)"
    if not hasattr(getattr(patcher_extension, "WrappersMP", None), "APPLY_MODEL"):
        return "comfy.patcher_extension.WrappersMP.APPLY_MODEL"
    return None


_missing = _missing_mechanism()
if _missing is None:
    from .nodes import comfy_entrypoint  # noqa: F401
else:
    try:
        from comfyui_version import __version__ as _found
    except ImportError:
        _found = "unknown"
    logging.error("[comfyui-taca] needs ComfyUI >= %s (found %s; missing %s); TACA nodes not loaded. Update ComfyUI.",
                  MIN_COMFYUI, _found, _missing)
    NODE_CLASS_MAPPINGS = {}
