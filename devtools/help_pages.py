"""The generated parts of the README and the nodes' help pages (js/docs/*.md): the support matrix and versions.

    .runtime/comfyui-0.33.0/venv/bin/python -m devtools.help_pages     # rewrite the generated parts in place

Each generated part sits between ``<!-- generated: NAME ... -->`` and ``<!-- /generated: NAME -->``; the rest
of each page is written by hand and left as it is. The family table comes from ``taca.families.FAMILIES``, the
versions from ``scripts/setup_runtime.sh --list`` (the runtimes every test runs on), and which of those versions
has a family from the class names in each runtime's ``comfy/model_base.py``, so none of it can go stale
(tests/test_help_pages.py checks the committed pages equal what this writes).
"""

from __future__ import annotations

import ast
import functools
import os
import re
import subprocess
import sys
from typing import Callable, Dict, FrozenSet, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# pages with generated parts, relative to the repository
PAGES = ("README.md", "js/docs/TACAPatchModel.md", "js/docs/TACAPatchModelAdvanced.md", "js/docs/TACALoraLoader.md",
         "js/docs/TACAAttentionProbe.md", "js/docs/TACAProbeReport.md")
BLOCK = re.compile(r"(<!-- generated: (\w+) [^>]*-->\n)(.*?)(<!-- /generated: \2 -->)", re.S)


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


def families_block() -> str:
    from taca.families import FAMILIES

    rows = ["| family | ComfyUI model class(es) | ComfyUI versions | token order | what counts as text | left untouched |",
            "|---|---|---|---|---|---|"]
    for family in FAMILIES:
        classes = ", ".join(f"`{c}`" for c in family.model_classes)
        rows.append(f"| {family.name} | {classes} | {family_versions(family)} | {token_order(family)} | "
                    f"{family.text_side} | {family.untouched} |")
    return "\n".join(rows) + "\n"


def versions_block() -> str:
    versions = tested_versions()
    listed = " and ".join([", ".join(versions[:-1]), versions[-1]]) if len(versions) > 1 else versions[0]
    return f"Tested on ComfyUI {listed}: every test runs on each version.\n"


GENERATORS = {"families": families_block, "versions": versions_block}


def render(text: str) -> str:
    """``text`` with every generated part rewritten."""
    def replace(match):
        return match.group(1) + GENERATORS[match.group(2)]() + match.group(4)

    return BLOCK.sub(replace, text)


def main() -> int:
    for name in PAGES:
        path = os.path.join(REPO, name)
        with open(path) as f:
            text = f.read()
        new = render(text)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
            print("wrote", name)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main())
