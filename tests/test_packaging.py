"""Packaging and the native build's configure step."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_subpackages_come_from_the_stage_folders():
    import shrinkrt.calib, shrinkrt.evaluate, shrinkrt.export, shrinkrt.runtime

    for mod, folder in [(shrinkrt.calib, "calib"), (shrinkrt.export, "export"),
                        (shrinkrt.runtime, "runtime"), (shrinkrt.evaluate, "evaluate")]:
        assert Path(mod.__file__).resolve() == ROOT / folder / "__init__.py"


def test_wheel_maps_stage_folders_into_shrinkrt(tmp_path):
    """What `pip install .` installs: the same modules under shrinkrt/."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("shrinkrt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("calib", "export", "runtime", "evaluate"):
        for src in (ROOT / folder).glob("*.py"):
            assert f"shrinkrt/{folder}/{src.name}" in names
    assert "shrinkrt/cli.py" in names
    assert not any(n.startswith(("tests/", "calib/", "runtime/")) for n in names)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_configures_without_cuda_or_tensorrt(tmp_path):
    env = dict(os.environ, CUDACXX="/nonexistent/nvcc")
    env.pop("TensorRT_ROOT", None)
    r = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "shrinkrt: no CUDA compiler found: skipping CUDA targets" in r.stdout
    assert "shrinkrt: TensorRT headers not found" in r.stdout


@pytest.mark.parametrize("folder", ["benchmarks", "tests"])
def test_script_folders_shadow_no_installed_module(folder):
    """`python benchmarks/latency.py` puts benchmarks/ first on sys.path, so a script there named like an
    installed package replaces it for every import: benchmarks/kernels.py once hid Hugging Face's
    `kernels`, which transformers imports when it loads a tokenizer, and README command 1 failed."""
    import importlib.machinery

    here = (ROOT / folder).resolve()
    path = [p for p in sys.path if p and Path(p).resolve() not in (here, ROOT)]
    names = sorted(f.stem for f in here.glob("*.py"))
    assert names, f"no scripts in {folder}/"
    shadowing = [n for n in names if n in sys.stdlib_module_names
                 or importlib.machinery.PathFinder.find_spec(n, path) is not None]
    assert shadowing == [], f"{folder}/ scripts named like installed modules: {shadowing}"
