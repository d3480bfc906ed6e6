"""The generated parts of the README, docs/, the nodes' help pages (js/docs/*.md) and pyproject.toml.

    .runtime/comfyui-0.33.0/venv/bin/python -m devtools.help_pages     # rewrite the generated parts in place

Each generated part of a page sits between ``<!-- generated: NAME ... -->`` and ``<!-- /generated: NAME -->``
(in pyproject.toml: ``# generated: NAME ...`` and ``# /generated: NAME``); the rest of each page is written by
hand and left as it is. The families come from ``taca.families.FAMILIES``, the joint attention calls per model call
of the real models from ``taca.families.JOINT_CALLS``, the versions from ``scripts/setup_runtime.sh --list`` (the
runtimes every test runs on), and which of those versions has a family from the class names in each runtime's
``comfy/model_base.py``, so none of it can go stale (tests/test_help_pages.py checks the committed pages equal what
this writes).
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import subprocess
import sys
from typing import Callable, Dict, FrozenSet, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# pages with generated parts, relative to the repository
PAGES = ("README.md", "docs/support-matrix.md", "js/docs/TACAPatchModel.md", "js/docs/TACAPatchModelAdvanced.md",
         "js/docs/TACALoraLoader.md", "js/docs/TACAAttentionProbe.md", "js/docs/TACAProbeReport.md", "pyproject.toml")
BLOCK = re.compile(r"(<!-- generated: (\w+) [^>]*-->\n)(.*?)(<!-- /generated: \2 -->)", re.S)
# the same in TOML, whose comments are lines starting with #
TOML_BLOCK = re.compile(r"^(# generated: (\w+) [^\n]*\n)(.*?)^(# /generated: \2$)", re.S | re.M)


def block_pattern(name: str) -> "re.Pattern[str]":
    """The markers of the generated parts in the page ``name``."""
    return TOML_BLOCK if name.endswith(".toml") else BLOCK


def tested_versions() -> List[str]:
    """The ComfyUI versions the tests run on, oldest first."""
    return subprocess.run(["bash", os.path.join(REPO, "scripts", "setup_runtime.sh"), "--list"],
                          capture_output=True, text=True, check=True).stdout.split()


@functools.lru_cache(maxsize=None)
def model_classes(version: str) -> FrozenSet[str]:
    """The class names ``comfy/model_base.py`` of that ComfyUI runtime defines (read, not imported)."""
    path = os.path.join(REPO, ".runtime", f"comfyui-{version}", "ComfyUI", "comfy", "model_base.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the support matrix lists the versions that have each model "
                                f"class; build that runtime with `bash scripts/setup_runtime.sh {version}`")
    with open(path) as f:
        tree = ast.parse(f.read())
    return frozenset(node.name for node in tree.body if isinstance(node, ast.ClassDef))


def family_versions(family) -> str:
    """The tested ComfyUI versions that have at least one of the family's model classes."""
    have = [v for v in tested_versions() if model_classes(v) & set(family.model_classes)]
    return ", ".join(have) or "none tested"


def _version_dependent_orders() -> Dict[Callable, str]:
    """Token order of the families whose order is read from the model (its ``layouts_fn``), in words.

    HunyuanVideo / HunyuanImage 2.1: ComfyUI 0.3.75 builds their double blocks image first, newer ComfyUI text
    first (``taca.families._hunyuan_image_first``).
    """
    from taca import families

    return {families._hunyuan_layouts: "text first; image first in 0.3.75"}


def token_order(family) -> str:
    if family.layouts_fn is not None:
        orders = _version_dependent_orders()
        if family.layouts_fn not in orders:
            raise KeyError(f"{family.name}: say in devtools/help_pages.py which token order its layouts_fn reads")
        return orders[family.layouts_fn]
    return "text first" if family.text_first else "image first"


def _families():
    from taca.families import FAMILIES

    return FAMILIES


def families_block() -> str:
    rows = ["| family | ComfyUI model class(es) | ComfyUI versions | token order | what counts as text | left untouched |",
            "|---|---|---|---|---|---|"]
    for family in _families():
        classes = ", ".join(f"`{c}`" for c in family.model_classes)
        rows.append(f"| {family.name} | {classes} | {family_versions(family)} | {token_order(family)} | "
                    f"{family.text_side} | {family.untouched} |")
    return "\n".join(rows) + "\n"


def short_name(family) -> str:
    """The family's name without the variants it lists in parentheses: ``FLUX.1 (dev, schnell, ...)`` -> ``FLUX.1``."""
    return re.sub(r" \([^)]*\)", "", family.name)


def in_words(items: List[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join([", ".join(items[:-1]), items[-1]]) if len(items) > 1 else items[0]


def versions_block() -> str:
    return f"Tested on ComfyUI {in_words(tested_versions())}: every test runs on each version.\n"


def family_list_block() -> str:
    """The families' short names, one line per set of tested ComfyUI versions that has them."""
    by_versions: Dict[str, List[str]] = {}
    for family in _families():
        by_versions.setdefault(family_versions(family), []).append(short_name(family))
    lines = []
    for versions, names in by_versions.items():
        where = "in no tested ComfyUI" if versions == "none tested" else f"ComfyUI {in_words(versions.split(', '))}"
        lines.append(f"- **{where}**: {', '.join(names)}")
    return "\n".join(lines) + "\n"


def joint_calls_block() -> str:
    from taca.families import JOINT_CALLS

    rows = ["| model | family | joint attention calls per model call | made of |", "|---|---|---|---|"]
    for row in JOINT_CALLS:
        made_of = row.made_of() + (f" (not counted: {row.not_counted})" if row.not_counted else "")
        rows.append(f"| {row.model} | {row.family} | {row.calls} | {made_of} |")
    return "\n".join(rows) + "\n"


def description_block() -> str:
    """pyproject.toml's description (what the Comfy Registry and ComfyUI-Manager show), naming every family."""
    families = _families()
    text = (f"TACA (Temperature-Adjusted Cross-modal Attention, arXiv 2506.07986) for {len(families)} MM-DiT model "
            f"families ComfyUI runs: {', '.join(short_name(f) for f in families)}. Exact eq. 10 through ComfyUI's own "
            f"attention kernel, active only in the early denoising steps. Tested on ComfyUI "
            f"{in_words(tested_versions())}.")
    return f"description = {json.dumps(text, ensure_ascii=False)}\n"  # a JSON string is a TOML basic string


GENERATORS = {"families": families_block, "versions": versions_block, "family_list": family_list_block,
              "joint_calls": joint_calls_block, "description": description_block}


def render(text: str, pattern: "re.Pattern[str]" = BLOCK) -> str:
    """``text`` with every generated part (between the markers ``pattern`` finds) rewritten."""
    def replace(match):
        return match.group(1) + GENERATORS[match.group(2)]() + match.group(4)

    return pattern.sub(replace, text)


def render_page(name: str, text: str) -> str:
    """The page ``name`` (relative to the repository), whose text is ``text``, with its generated parts rewritten."""
    return render(text, block_pattern(name))


def main() -> int:
    for name in PAGES:
        path = os.path.join(REPO, name)
        with open(path) as f:
            text = f.read()
        new = render_page(name, text)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
            print("wrote", name)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main())
