"""Packaging (issue 24 item 6): ``siftlens --version``; ``python -m build`` makes an sdist and, from it, a wheel that
hold the C kernel source, the viewer assets, the default model and the demo images; the wheel installs into a
fresh venv (no system site-packages; torch the same version as here, which pip takes from the local wheel) and
``siftlens demo`` runs there, far from this checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

import siftlens

ROOT = Path(__file__).resolve().parents[1]
INSIDE = ["siftlens/core/kernels/layer_sums.c", "siftlens/assets/viewer/explore.js",
          "siftlens/assets/viewer/explore.css",
          "siftlens/assets/models/default/config.json", "siftlens/assets/models/default/model.safetensors",
          "siftlens/assets/demo_images/cat/0000.jpg"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def test_version_flag_prints_the_package_version():
    r = subprocess.run([sys.executable, "-m", "siftlens.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"siftlens {siftlens.__version__}"
    assert "--version" in subprocess.run([sys.executable, "-m", "siftlens.cli", "--help"], capture_output=True,
                                         text=True, timeout=120).stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """``python -m build``: the sdist, then the wheel built from that sdist (so the sdist is complete too)."""
    pytest.importorskip("build", reason="pip install -e '.[dev]'")
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], capture_output=True,
                       text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,), (sdist,) = out.glob("siftlens-*.whl"), out.glob("siftlens-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


@pytest.mark.slow
def test_sdist_and_wheel_hold_the_kernel_source_viewer_model_and_images(dists):
    version = siftlens.__version__
    assert dists["wheel"].name.startswith(f"siftlens-{version}-py3-none-any")
    wheel = set(zipfile.ZipFile(dists["wheel"]).namelist())
    top = f"siftlens-{version}/"
    with tarfile.open(dists["sdist"]) as t:
        sdist = {n.removeprefix(top) for n in t.getnames()}
    for name in INSIDE:
        assert name in wheel, f"the wheel lacks {name}"
        assert f"src/{name}" in sdist, f"the sdist lacks src/{name}"
    images = ROOT / "src" / "siftlens" / "assets" / "demo_images"
    n_images = sum(1 for p in images.rglob("*.jpg"))
    assert sum(n.startswith("siftlens/assets/demo_images/") and n.endswith(".jpg") for n in wheel) == n_images
    for name in ("pyproject.toml", "README.md", "Makefile", "tests/conftest.py", "examples/quickstart.ipynb"):
        assert name in sdist, f"the sdist lacks {name}"
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in wheel | sdist)


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_the_demo(dists, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py, cli = venv / "bin" / "python", venv / "bin" / "siftlens"
    # this venv's pip installs into the fresh one; --no-compile: .pyc files are written on first import instead
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-compile",
                        f"torch=={torch.__version__}", str(dists["wheel"])],
                       capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    env = _env(SIFTLENS_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    r = subprocess.run([str(py), "-c", "import siftlens, importlib.metadata as m; "
                        "print(siftlens.__file__); print(m.version('siftlens'))"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    where, version = r.stdout.split()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where  # the installed copy, not this checkout
    assert version == siftlens.__version__
    r = subprocess.run([str(cli), "--version"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"siftlens {siftlens.__version__}", r.stderr
    r = subprocess.run([str(cli), "demo", "--out", str(tmp_path / "demo"), "--no-progress"], capture_output=True,
                       text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "analysed 200 images" in r.stdout, r.stdout
    page = (tmp_path / "demo" / "report.html").read_text(encoding="utf-8")
    assert 'id="sl-explore-data"' in page and "data:image/png;base64," in page  # the viewer assets were found
    if shutil.which(os.environ.get("CC", "cc")):  # the kernel was built from the wheel's own C source
        assert "kernel unavailable" not in r.stderr, r.stderr
        assert any((tmp_path / "cache").rglob("*.so")), sorted((tmp_path / "cache").rglob("*"))
