"""The generated parts of the nodes' help pages (devtools/help_pages.py) are what the generator writes now."""

from __future__ import annotations

import os

from conftest import REPO
from devtools import help_pages
from taca.families import FAMILIES


def test_committed_help_pages_equal_the_generator():
    for name in help_pages.PAGES:
        with open(os.path.join(REPO, name)) as f:
            text = f.read()
        assert help_pages.BLOCK.search(text), f"{name} has no generated part"
        assert help_pages.render(text) == text, (
            f"{name} is stale: run `python -m devtools.help_pages` and commit the result")


def test_patch_model_page_names_every_family_class_and_version():
    with open(os.path.join(REPO, "js", "docs", "TACAPatchModel.md")) as f:
        text = f.read()
    for family in FAMILIES:
        assert f"| {family.name} |" in text
        for model_class in family.model_classes:
            assert f"`{model_class}`" in text
    for version in help_pages.tested_versions():
        assert version in text


def test_render_rewrites_only_between_the_markers():
    page = ("hand-written\n<!-- generated: versions by x -->\nold line\n<!-- /generated: versions -->\nalso kept\n")
    rendered = help_pages.render(page)
    assert rendered.startswith("hand-written\n<!-- generated: versions by x -->\nTested on ComfyUI ")
    assert rendered.endswith("<!-- /generated: versions -->\nalso kept\n") and "old line" not in rendered


def test_the_matrix_lists_this_comfyui_for_exactly_the_families_it_has():
    """The versions column, read from each runtime's model_base.py, against this ComfyUI's imported classes."""
    import comfy.model_base
    import comfyui_version

    version = comfyui_version.__version__
    for family in FAMILIES:
        has = any(hasattr(comfy.model_base, c) for c in family.model_classes)
        assert (version in help_pages.family_versions(family).split(", ")) == has, family.name
