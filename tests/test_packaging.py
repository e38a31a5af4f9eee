"""The registry metadata agrees with the repository: URLs, icon, runtime dependencies, what the node pack ships."""

import ast
import pathlib
import sys

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RUNTIME_CODE = [ROOT / "__init__.py", *(ROOT / "nodes").rglob("*.py"), *(ROOT / "ngdm_core").rglob("*.py")]
# What ComfyUI itself provides to a node pack, and torch, which the pack deliberately leaves to the user.
HOST_MODULES = {"comfy", "comfy_api", "comfy_execution", "folder_paths", "server", "node_helpers", "torch"}
DISTRIBUTION_OF = {"PIL": "pillow"}


def test_the_readme_clones_the_repository_the_registry_names():
    repository = PROJECT["project"]["urls"]["Repository"]
    assert f"git clone {repository} " in (ROOT / "README.md").read_text()
    assert PROJECT["project"]["urls"]["Issues"] == f"{repository}/issues"


def test_the_icon_url_points_at_the_committed_icon_within_the_registry_size():
    from PIL import Image

    repository = PROJECT["project"]["urls"]["Repository"]
    raw = repository.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    icon = PROJECT["tool"]["comfy"]["Icon"]
    assert icon.startswith(raw)
    with Image.open(ROOT / icon[len(raw):]) as image:
        assert image.format == "PNG" and image.width <= 800 and image.height <= 400


def test_runtime_dependencies_are_exactly_what_the_runtime_code_imports():
    imported = set()
    for path in RUNTIME_CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {DISTRIBUTION_OF.get(name, name) for name in imported
                   if name not in sys.stdlib_module_names and name not in HOST_MODULES and name != "ngdm_core"}
    assert third_party == set(PROJECT["project"]["dependencies"])


def test_the_node_pack_leaves_out_tests_benchmarks_and_ci():
    ignored = {line.strip() for line in (ROOT / ".comfyignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {"tests/", "benchmarks/", ".ci/"} <= ignored
    assert not ignored & {"nodes/", "ngdm_core/", "web/", "example_workflows/", "__init__.py", "pyproject.toml"}
