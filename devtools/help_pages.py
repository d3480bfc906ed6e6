"""The generated parts of the nodes' help pages (js/docs/*.md): the supported families and ComfyUI versions.

    .runtime/comfyui-0.33.0/venv/bin/python -m devtools.help_pages     # rewrite the generated parts in place

Each generated part sits between ``<!-- generated: NAME ... -->`` and ``<!-- /generated: NAME -->``; the rest
of each page is written by hand and left as it is. The family table comes from ``taca.families.FAMILIES``, the
versions from ``scripts/setup_runtime.sh --list`` (the runtimes every test runs on), so neither can go stale
(tests/test_help_pages.py checks the committed pages equal what this writes).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Callable, Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS_DIR = os.path.join(REPO, "js", "docs")
PAGES = ("TACAPatchModel.md", "TACALoraLoader.md")
BLOCK = re.compile(r"(<!-- generated: (\w+) [^>]*-->\n)(.*?)(<!-- /generated: \2 -->)", re.S)


def tested_versions() -> List[str]:
    """The ComfyUI versions the tests run on, oldest first."""
    return subprocess.run(["bash", os.path.join(REPO, "scripts", "setup_runtime.sh"), "--list"],
                          capture_output=True, text=True, check=True).stdout.split()


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

    rows = ["| family | ComfyUI model class(es) | token order | what counts as text |", "|---|---|---|---|"]
    for family in FAMILIES:
        classes = ", ".join(f"`{c}`" for c in family.model_classes)
        rows.append(f"| {family.name} | {classes} | {token_order(family)} | {family.text_side} |")
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
        path = os.path.join(DOCS_DIR, name)
        with open(path) as f:
            text = f.read()
        new = render(text)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
            print("wrote", os.path.relpath(path, REPO))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main())
