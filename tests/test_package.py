import ast
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_pack_root_imports_outside_comfyui():
    spec = importlib.util.spec_from_file_location("drm_pack_under_test", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert not hasattr(module, "comfy_entrypoint")  # no ComfyUI here: no extension, no error
        assert "comfy" not in sys.modules or sys.modules["comfy"] is not None
    finally:
        for name in [n for n in sys.modules if n.startswith(spec.name)]:
            del sys.modules[name]


def test_pack_root_loaded_as_a_lone_file_offers_no_nodes_and_does_not_fail(tmp_path):
    """pytest imports the root __init__.py without a parent package when the checkout's name is no identifier."""
    lone = tmp_path / "pack_root.py"  # a file not named __init__.py is loaded without a package
    shutil.copy(ROOT / "__init__.py", lone)
    spec = importlib.util.spec_from_file_location("pack_root", lone)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not hasattr(module, "comfy_entrypoint") and not hasattr(module, "NODE_CLASS_MAPPINGS")


def test_pytest_runs_in_a_checkout_whose_folder_name_is_no_identifier(tmp_path):
    """The README clones into drm-stepwise-guidance/: pytest there must collect, not fail on the root __init__.py."""
    clone = tmp_path / "drm-stepwise-guidance"
    (clone / "tests").mkdir(parents=True)
    for name in ("__init__.py", "pyproject.toml"):
        shutil.copy(ROOT / name, clone / name)
    shutil.copytree(ROOT / "nodes", clone / "nodes")
    (clone / "tests" / "test_probe.py").write_text("def test_probe():\n    assert True\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly"], cwd=clone,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


def _imported_packages(folder: Path) -> set[str]:
    """Top-level modules imported anywhere in `folder`'s .py files (absolute imports only)."""
    names = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_pyproject_registry_metadata_and_packages():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert "comfyui" not in project["name"].lower()
    assert project["version"].count(".") == 2 and project["description"] and project["license"]
    assert "urls" not in project and "PublisherId" not in comfy  # no public home yet: no placeholder addresses
    assert {"DisplayName", "requires-comfyui"} <= set(comfy)
    license_text = (ROOT / "LICENSE").read_text()
    assert project["license"]["text"] == "Apache-2.0" and "Apache License" in license_text[:200]
    assert "Version 2.0" in license_text[:200]
    # training imports tomllib (3.11+); on 3.10 the tomli backport must come with the training extra
    assert project["requires-python"] == ">=3.10"
    assert any(d.startswith("tomli") and "python_version < '3.11'" in d for d in project["optional-dependencies"]["train"])
    include = meta["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(p.startswith("nodes") for p in include)  # ComfyUI owns the top-level name `nodes`


def test_node_requirements_are_what_the_nodes_import():
    """requirements.txt (what ComfyUI-Manager installs into ComfyUI's Python) = third-party imports of nodes/ and
    drm_core/, minus torch (ComfyUI's own build must never be replaced) and ComfyUI's own modules."""
    comfy_modules = {"comfy", "comfy_extras", "comfy_api", "folder_paths", "latent_preview", "nodes", "server"}
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    imported = (_imported_packages(ROOT / "nodes") | _imported_packages(ROOT / "drm_core")) - stdlib - comfy_modules
    imported -= {"drm_core"}
    pip_names = {"PIL": "pillow"}
    wanted = {pip_names.get(name, name) for name in imported} - {"torch"}
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    listed = {line.split(">")[0].split("=")[0].split("<")[0].strip().lower() for line in lines if line}
    assert listed == wanted, f"requirements.txt lists {sorted(listed)}; nodes/ and drm_core/ import {sorted(wanted)}"
    deps = {d.split(">")[0].split("=")[0].strip().lower() for d in tomllib.loads(
        (ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert deps == wanted | {"torch"}


def test_drm_core_stays_independent_of_comfy_training_and_peft():
    for path in (ROOT / "drm_core").glob("*.py"):
        text = path.read_text()
        for banned in ("import comfy", "from comfy", "import peft", "from peft", "import accelerate",
                       "from training", "import training", "print("):
            assert banned not in text, f"{path.name} contains {banned!r}"
