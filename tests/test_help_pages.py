"""The generated parts of the README, docs/, the nodes' help pages and pyproject.toml (devtools/help_pages.py) are
what the generator writes now, and the README is the short, user-first page it is meant to be."""

from __future__ import annotations

import glob
import os
import re

from conftest import REPO
from devtools import help_pages
from taca.families import FAMILIES, JOINT_CALLS

README_MAX_LINES = 200


def read(name: str) -> str:
    with open(os.path.join(REPO, name)) as f:
        return f.read()


def markdown_pages():
    """Every hand-read page of the pack: the README, docs/ and the help pages."""
    return ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))
                                  + glob.glob(os.path.join(REPO, "js", "docs", "*.md")))


def hand_written(name: str) -> str:
    """The page without its generated parts."""
    return help_pages.block_pattern(name).sub(lambda m: m.group(1) + m.group(4), read(name))


def generated_part(name: str, part: str) -> str:
    for match in help_pages.block_pattern(name).finditer(read(name)):
        if match.group(2) == part:
            return match.group(3)
    raise AssertionError(f"{name} has no generated part {part!r}")


def short_name(family) -> str:
    """A family's name up to the variants it lists in parentheses."""
    return family.name.split(" (")[0]


def test_committed_pages_equal_the_generator():
    for name in help_pages.PAGES:
        text = read(name)
        assert help_pages.block_pattern(name).search(text), f"{name} has no generated part"
        assert help_pages.render_page(name, text) == text, (
            f"{name} is stale: run `python -m devtools.help_pages` and commit the result")


def test_a_stale_page_is_found():
    for name in help_pages.PAGES:
        match = help_pages.block_pattern(name).search(read(name))
        stale = read(name).replace(match.group(0), match.group(1) + "stale\n" + match.group(4))
        assert help_pages.render_page(name, stale) != stale, name


def test_patch_model_page_and_support_matrix_name_every_family_class_and_version():
    for name in ("js/docs/TACAPatchModel.md", "docs/support-matrix.md"):
        text = read(name)
        for family in FAMILIES:
            assert f"| {family.name} |" in text, (name, family.name)
            for model_class in family.model_classes:
                assert f"`{model_class}`" in text, (name, model_class)
        for version in help_pages.tested_versions():
            assert version in text, (name, version)


def test_render_rewrites_only_between_the_markers():
    page = ("hand-written\n<!-- generated: versions by x -->\nold line\n<!-- /generated: versions -->\nalso kept\n")
    rendered = help_pages.render(page)
    assert rendered.startswith("hand-written\n<!-- generated: versions by x -->\nTested on ComfyUI ")
    assert rendered.endswith("<!-- /generated: versions -->\nalso kept\n") and "old line" not in rendered


def test_render_rewrites_only_between_the_toml_markers():
    page = 'name = "x"\n# generated: description by y\ndescription = "old"\n# /generated: description\nversion = "1"\n'
    rendered = help_pages.render_page("pyproject.toml", page)
    assert rendered.startswith('name = "x"\n# generated: description by y\ndescription = "TACA ')
    assert rendered.endswith('\n# /generated: description\nversion = "1"\n') and '"old"' not in rendered
    # the HTML markers of the pages mean nothing in TOML, and the TOML ones nothing in a page
    assert help_pages.render_page("README.md", page) == page


def test_the_matrix_lists_this_comfyui_for_exactly_the_families_it_has():
    """The versions column, read from each runtime's model_base.py, against this ComfyUI's imported classes."""
    import comfy.model_base
    import comfyui_version

    version = comfyui_version.__version__
    for family in FAMILIES:
        has = any(hasattr(comfy.model_base, c) for c in family.model_classes)
        assert (version in help_pages.family_versions(family).split(", ")) == has, family.name


# --- the README ---------------------------------------------------------------------------------------------------


def test_readme_is_at_most_200_lines():
    lines = read("README.md").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_sections_come_in_the_order_a_user_reads_them():
    headings = [h.lower() for h in re.findall(r"^## (.+)$", read("README.md"), re.M)]
    wanted = ["install", "node", "workflow", "supported models", "try it"]
    positions = []
    for word in wanted:
        found = [i for i, h in enumerate(headings) if word in h]
        assert found, f"README.md has no section on {word!r}: {headings}"
        positions.append(found[0])
    assert positions == sorted(positions), headings
    assert "try it" in headings[-1], f"'Try it / develop' must be the README's last section: {headings}"


def test_readme_keeps_the_demo_and_test_commands_in_its_last_section():
    """The commands the scripts and CI call the README's: scripts/demo.sh, and the one .ci/run executes."""
    last = read("README.md").split("\n## ")[-1]
    ci = re.search(r"^exec (bash scripts/\S+)", read(".ci/run"), re.M).group(1)
    for command in ("bash scripts/demo.sh", ci):
        assert os.path.isfile(os.path.join(REPO, command.split()[1])), command
        assert re.search(rf"^{re.escape(command)}\s*(#|$)", last, re.M), f"README's last section lacks `{command}`"


def test_readme_embeds_the_demo_pictures():
    text = read("README.md")
    for path in glob.glob(os.path.join(REPO, "js", "docs", "*.png")):
        assert f"]({os.path.relpath(path, REPO)})" in text, path


def test_readme_links_every_help_page_and_docs_page():
    text = read("README.md")
    pages = glob.glob(os.path.join(REPO, "js", "docs", "*.md")) + glob.glob(os.path.join(REPO, "docs", "*.md"))
    assert len(pages) >= 8
    for path in pages:
        assert f"]({os.path.relpath(path, REPO)}" in text, path


def test_readme_lists_every_family_and_links_the_support_matrix():
    listed = generated_part("README.md", "family_list")
    for family in FAMILIES:
        assert short_name(family) in listed, family.name
    for version in help_pages.tested_versions():
        assert version in listed
    assert len(listed.splitlines()) <= len(help_pages.tested_versions()), "the README's list is meant to be short"
    assert "](docs/support-matrix.md)" in read("README.md")
    assert "| family |" not in read("README.md"), "the support table belongs in docs/support-matrix.md"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_of_every_page_resolve():
    checked = 0
    for name in markdown_pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", read(name)):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(REPO, os.path.dirname(name), path)) if path else (
                os.path.join(REPO, name))
            assert os.path.exists(resolved), f"{name}: {target} does not exist"
            if anchor:
                with open(resolved) as f:
                    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", f.read(), re.M)}
                assert anchor in anchors, f"{name}: {target} names no heading of {path or name}"
            checked += 1
    assert checked >= 15


# --- joint attention calls per model call --------------------------------------------------------------------------


def test_joint_calls_table_adds_up_and_names_supported_families():
    families = {family.name for family in FAMILIES}
    assert len({row.model for row in JOINT_CALLS}) == len(JOINT_CALLS)
    for row in JOINT_CALLS:
        assert row.family in families, row
        assert sum(count for count, _ in row.blocks) == row.calls, row


def test_help_page_and_support_matrix_give_every_model_its_joint_calls():
    for name in ("js/docs/TACAPatchModelAdvanced.md", "docs/support-matrix.md"):
        lines = generated_part(name, "joint_calls").splitlines()
        for row in JOINT_CALLS:
            line = [line for line in lines if line.startswith(f"| {row.model} |")]
            assert len(line) == 1, (name, row.model)
            cells = [cell.strip() for cell in line[0].strip("|").split("|")]
            assert str(row.calls) in cells and row.family in cells, (name, line[0])
            for count, kind in row.blocks:
                assert f"{count} {kind}" in line[0], (name, line[0])


def test_advanced_node_tooltip_gives_every_model_its_joint_calls(pack_nodes):
    tooltip = pack_nodes["TACAPatchModelAdvanced"].INPUT_TYPES()["required"]["blocks"][1]["tooltip"]
    for row in JOINT_CALLS:
        # "FLUX.1 57" or, for models with the same count, "FLUX.1 and Chroma 57"
        assert re.search(rf"{re.escape(row.model)}( and [^,]+?)? {row.calls}\b", tooltip), (row.model, tooltip)


def test_joint_calls_are_written_nowhere_by_hand():
    """Outside the generated parts no page, and no node, types a model's joint call count again."""
    sources = [os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "nodes", "*.py"))]
    for name in markdown_pages() + sources:
        text = hand_written(name) if name.endswith(".md") else read(name)
        for row in JOINT_CALLS:
            typed = re.search(rf"{re.escape(row.model)}[^\d|\n]{{0,40}}\b{row.calls}\b", text)
            assert not typed, f"{name} types {typed.group(0)!r}: generate it from taca.families.JOINT_CALLS"
            for count, kind in row.blocks:
                if count != row.calls:
                    assert f"{count} {kind.split('-')[0]}" not in text, (name, count, kind)
