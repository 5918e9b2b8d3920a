"""``--device``: a device this machine cannot run on is a one-line error, never torch's traceback."""

from __future__ import annotations

import subprocess
import sys
from importlib.resources import files

import pytest
import torch

from siftlens.devices import resolve_device
from siftlens.errors import ConfigError, SiftlensError
from siftlens.models import load_backend
from siftlens.models.native import NativeBackend

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: nothing to refuse")


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


@no_cuda
def test_load_backend_on_missing_cuda_is_one_line_config_error():
    with pytest.raises(ConfigError) as e:
        load_backend("default", device="cuda")
    msg = one_line(e)
    assert isinstance(e.value, SiftlensError)
    assert "'cuda'" in msg and "not available" in msg and "--device cpu" in msg
    with pytest.raises(ConfigError) as e:
        load_backend("default", device="cuda:1")
    assert "'cuda:1'" in one_line(e)


@no_cuda
def test_backend_constructor_refuses_missing_cuda(tiny_vit):
    with pytest.raises(ConfigError) as e:
        NativeBackend(tiny_vit, device="cuda")
    assert "cuda" in one_line(e)
    with pytest.raises(ConfigError):
        NativeBackend(tiny_vit, device=torch.device("cuda"))


@pytest.mark.parametrize("spec", ["gpu", "", "cuda:x", "meta", "GPU:0"])
def test_malformed_or_unusable_device_strings(spec):
    with pytest.raises(ConfigError) as e:
        resolve_device(spec)
    msg = one_line(e)
    assert "use cpu" in msg


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_missing_mps_is_one_line_config_error():
    with pytest.raises(ConfigError) as e:
        load_backend("default", device="mps")
    assert "'mps'" in one_line(e) and "--device cpu" in one_line(e)


def test_cpu_resolves_and_backend_runs_there(tiny_vit):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    b = load_backend("default", device="cpu")
    assert b.device == torch.device("cpu")
    assert next(b.model.parameters()).device.type == "cpu"
    assert NativeBackend(tiny_vit, device="cpu").device == torch.device("cpu")


@no_cuda
def test_cli_analyze_with_missing_cuda_exits_2_with_one_line(tmp_path):
    demo = str(files("siftlens") / "assets" / "demo_images")
    r = subprocess.run(
        [sys.executable, "-m", "siftlens.cli", "analyze", "--model", "default", "--images", demo,
         "--out", str(tmp_path / "o"), "--device", "cuda", "--no-report", "--limit", "2", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error:") and "cuda" in lines[0] and "--device cpu" in lines[0]
