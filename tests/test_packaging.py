"""Registry metadata, the no-op requirements file, and the ComfyUI-free core."""

import os
import re
import subprocess
import sys

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from conftest import COMFYUI, REPO


def load_pyproject():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_pyproject_is_valid_for_the_comfy_registry():
    data = load_pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", project["name"]) and len(project["name"]) < 100
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert os.path.isfile(os.path.join(REPO, project["license"]["file"]))
    assert project["description"]
    assert project["urls"]["Repository"].startswith("https://")
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert comfy[key], key
    assert os.path.isfile(os.path.join(REPO, "assets", "icon.svg"))


def test_declared_minimum_comfyui_matches_the_load_time_check():
    spec = load_pyproject()["tool"]["comfy"]["requires-comfyui"]
    with open(os.path.join(REPO, "__init__.py")) as f:
        declared = re.search(r'MIN_COMFYUI = "([\d.]+)"', f.read()).group(1)
    assert spec == f">={declared}"
    with open(os.path.join(COMFYUI, "comfyui_version.py")) as f:
        tested = re.search(r'__version__ = "([\d.]+)"', f.read()).group(1)
    assert tuple(map(int, tested.split("."))) >= tuple(map(int, declared.split(".")))


def test_declared_minimum_is_the_oldest_comfyui_tested():
    """The runtime matrix starts at the declared minimum, so the minimum is what the tests run on."""
    listed = subprocess.run(["bash", os.path.join(REPO, "scripts", "setup_runtime.sh"), "--list"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert len(listed) >= 2 and listed == sorted(listed, key=lambda v: tuple(map(int, v.split("."))))
    assert load_pyproject()["tool"]["comfy"]["requires-comfyui"] == f">={listed[0]}"


def test_requirements_install_nothing_new():
    with open(os.path.join(REPO, "requirements.txt")) as f:
        lines = [line.strip() for line in f if line.strip() and not line.strip().startswith("#")]
    with open(os.path.join(COMFYUI, "requirements.txt")) as f:
        comfy_reqs = {re.split(r"[<>=!~;\[ ]", line.strip())[0].lower() for line in f
                      if line.strip() and not line.startswith("#")}
    for line in lines:
        assert re.split(r"[<>=!~;\[ ]", line)[0].lower() in comfy_reqs, line
    assert load_pyproject()["project"]["dependencies"] == []


def test_core_modules_import_without_comfyui():
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import taca.attention, taca.families, taca.hooks, taca.kernels, taca.lora, taca.probe_record\n"
            "assert not any(m == 'comfy' or m.startswith('comfy.') or m.startswith('comfy_') for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith('comfy'))\n"
            "print('ok')" % REPO)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.stdout.strip() == "ok", result.stderr


def test_pack_sources_parse_as_python_3_10():
    """The pack runs on Python 3.10-3.13: no syntax newer than 3.10 in anything ComfyUI imports."""
    import ast

    checked = 0
    for folder in ("", "nodes", "taca"):
        directory = os.path.join(REPO, folder)
        for name in sorted(os.listdir(directory)):
            if name.endswith(".py"):
                with open(os.path.join(directory, name)) as f:
                    ast.parse(f.read(), filename=name, feature_version=(3, 10))
                checked += 1
    assert checked >= 6


def test_pyproject_description_names_every_family_and_tested_version():
    """The description the Comfy Registry shows is made from taca.families (devtools/help_pages.py), not retyped."""
    from taca.families import FAMILIES

    description = load_pyproject()["project"]["description"]
    for family in FAMILIES:
        assert family.name.split(" (")[0] in description, family.name
    assert f"{len(FAMILIES)} MM-DiT model families" in description
    listed = subprocess.run(["bash", os.path.join(REPO, "scripts", "setup_runtime.sh"), "--list"],
                            capture_output=True, text=True, check=True).stdout.split()
    for version in listed:
        assert version in description
