import importlib.util
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pack_root_imports_outside_comfyui():
    spec = importlib.util.spec_from_file_location("drm_pack_under_test", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert isinstance(module.NODE_CLASS_MAPPINGS, dict)
        assert "comfy" not in sys.modules or sys.modules["comfy"] is not None
    finally:
        for name in [n for n in sys.modules if n.startswith(spec.name)]:
            del sys.modules[name]


def test_pyproject_registry_metadata_and_packages():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert "comfyui" not in project["name"].lower()
    assert project["version"].count(".") == 2 and project["description"] and project["license"]
    assert "Repository" in project["urls"]
    assert {"PublisherId", "DisplayName", "requires-comfyui"} <= set(comfy)
    deps = " ".join(project["dependencies"])
    for name in ("torch", "diffusers", "transformers", "safetensors", "numpy", "pillow"):
        assert name in deps
    include = meta["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(p.startswith("nodes") for p in include)  # ComfyUI owns the top-level name `nodes`


def test_drm_core_stays_independent_of_comfy_training_and_peft():
    for path in (ROOT / "drm_core").glob("*.py"):
        text = path.read_text()
        for banned in ("import comfy", "from comfy", "import peft", "from peft", "import accelerate",
                       "from training", "import training", "print("):
            assert banned not in text, f"{path.name} contains {banned!r}"
