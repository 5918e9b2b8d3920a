"""The timm backend on randomly initialised timm models, checked against timm's own AttentionExtract.

timm needs torchvision, which does not work with the CPU torch of the main venv: these tests run in the
separate ``.venv-timm`` made by ``make test-timm``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.timm

timm = pytest.importorskip("timm", reason="timm not installed (needs torchvision); run `make test-timm`")

from timm.utils import AttentionExtract  # noqa: E402

from siftlens.attention import capture  # noqa: E402
from siftlens.errors import AttentionBackendError, ModelLoadError  # noqa: E402
from siftlens.models import load_backend  # noqa: E402
from siftlens.models.timm import TimmBackend  # noqa: E402

B = 3  # batch size of every comparison

# name, create_model kwargs, expected geometry
MODELS = {
    "vit-tiny": ("vit_tiny_patch16_224", {},
                 dict(patch=16, grid=(14, 14), prefix=1, layers=12, heads=3, input=(224, 224))),
    "vit-nonsquare": ("vit_small_patch16_224", dict(img_size=(224, 160), depth=2),
                      dict(patch=16, grid=(14, 10), prefix=1, layers=2, heads=6, input=(224, 160))),
    "dinov2-registers-nonsquare": (
        "vit_small_patch14_reg4_dinov2", dict(img_size=(98, 70), depth=2, embed_dim=64, num_heads=4),
        dict(patch=14, grid=(7, 5), prefix=5, layers=2, heads=4, input=(98, 70))),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", dict(depth=2),
                       dict(patch=16, grid=(14, 14), prefix=2, layers=2, heads=3, input=(224, 224))),
}


def make(key: str, seed: int = 0, **extra) -> TimmBackend:
    name, kwargs, _ = MODELS[key]
    torch.manual_seed(seed)
    return TimmBackend.load(name, **kwargs, **extra)


def timm_reference(backend: TimmBackend, key: str, x: torch.Tensor) -> list[torch.Tensor]:
    """timm's AttentionExtract (fx graph, softmax nodes) on a separate model with the same weights."""
    name, kwargs, _ = MODELS[key]
    ref = timm.create_model(name, pretrained=False, **kwargs).eval()
    ref.load_state_dict(backend.model.state_dict())
    for m in ref.modules():  # the softmax node exists only in the non-fused path
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    with torch.no_grad():
        out = AttentionExtract(ref, method="fx")(x)
    return list(out.values())


def capture_all(backend: TimmBackend, x: torch.Tensor):
    got: dict[int, torch.Tensor] = {}
    with torch.no_grad(), capture(backend, lambda layer, attn: got.__setitem__(layer, attn.clone())) as cap:
        logits = backend.forward(x)
    cap.check()
    return got, logits


def fused_flags(backend: TimmBackend) -> list[bool]:
    return [m.fused_attn for m in backend.model.modules() if hasattr(m, "fused_attn")]


def rgb_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8), "RGB")


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("key", list(MODELS))
def test_geometry_is_read_from_the_model(key):
    backend = make(key)
    g = MODELS[key][2]
    assert backend.patch_size == g["patch"]
    assert backend.grid_size == g["grid"]
    assert backend.num_prefix_tokens == g["prefix"]
    assert backend.num_layers == g["layers"] and backend.num_heads == g["heads"]
    assert backend.input_size == g["input"]
    assert backend.has_cls
    d = backend.describe()
    assert d["backend"] == "timm" and d["grid"] == list(g["grid"])
    json.dumps(d)  # goes into the run manifest


@pytest.mark.parametrize("key", list(MODELS))
def test_captured_attention_equals_timm_attention_extract(key):
    backend = make(key)
    before = fused_flags(backend)
    assert before and all(f == timm.layers.use_fused_attn() for f in before)
    torch.manual_seed(1)
    x = torch.randn(B, 3, *backend.input_size)
    got, logits = capture_all(backend, x)
    ref = timm_reference(backend, key, x)
    g = MODELS[key][2]
    S = g["prefix"] + g["grid"][0] * g["grid"][1]
    assert sorted(got) == list(range(backend.num_layers)) and len(ref) == backend.num_layers
    for layer, attn in got.items():
        assert attn.shape == (B, g["heads"], S, S)
        torch.testing.assert_close(attn, ref[layer], atol=1e-5, rtol=0)
    assert fused_flags(backend) == before
    if backend.model.num_classes == 0:  # a feature model (the DINOv2 pretrain config): no logits
        assert logits is None
    else:
        assert logits.shape == (B, backend.model.num_classes)
        with torch.no_grad():
            torch.testing.assert_close(logits, backend.model(x), atol=1e-5, rtol=0)


def test_fused_flags_and_hooks_are_restored_also_after_an_error():
    backend = make("vit-nonsquare")
    backend.model.blocks[1].attn.fused_attn = False  # a mixed state must come back exactly as it was
    before = fused_flags(backend)
    modules = [m for m, _ in backend.probes()]
    x = torch.randn(B, 3, *backend.input_size)
    with capture(backend, lambda layer, attn: None):
        assert not any(fused_flags(backend))
        assert all(len(m._forward_hooks) == 1 for m in modules)
        backend.forward(x)
    assert fused_flags(backend) == before
    assert all(not m._forward_hooks for m in modules)
    with pytest.raises(ZeroDivisionError), capture(backend, lambda layer, attn: 1 / 0):
        backend.forward(x)
    assert fused_flags(backend) == before
    assert all(not m._forward_hooks for m in modules)


def test_fused_attention_without_the_switch_fails_loudly(monkeypatch):
    backend = make("vit-nonsquare")
    if not timm.layers.use_fused_attn():
        pytest.skip("timm's fused attention is disabled in this environment")
    monkeypatch.setattr(backend, "eager", contextlib.nullcontext)
    with capture(backend, lambda layer, attn: None) as cap:
        backend.forward(torch.randn(1, 3, *backend.input_size))
    with pytest.raises(AttentionBackendError):
        cap.check()


@pytest.mark.parametrize("key, overlay", [
    ("vit-tiny", None),
    ("vit-nonsquare", None),
    ("dinov2-registers-nonsquare", dict(crop_mode="squash", crop_pct=0.8, interpolation="bilinear")),
])
def test_preprocess_and_normalize_equal_timm_eval_transform(key, overlay):
    extra = {"pretrained_cfg_overlay": overlay} if overlay else {}
    backend = make(key, **extra)
    cfg = timm.data.resolve_data_config(args={"input_size": (3, *backend.input_size)}, model=backend.model)
    transform = timm.data.create_transform(**cfg, is_training=False)
    imgs = [rgb_image(300, 200, 0), rgb_image(150, 260, 1), rgb_image(101, 97, 2)]
    pixels = np.stack([backend.preprocess(im) for im in imgs])
    assert pixels.dtype == np.uint8 and pixels.shape == (3, *backend.input_size, 3)
    ours = backend.normalize(torch.from_numpy(pixels))
    theirs = torch.stack([transform(im) for im in imgs])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", ["safetensors", "pth-model", "pth-state_dict", "pth-plain"])
def test_weights_load_from_a_file(fmt, tmp_path):
    source = make("deit-distilled", seed=0)
    sd = source.model.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        wrapper = fmt.split("-")[1]
        torch.save(sd if wrapper == "plain" else {wrapper: sd, "epoch": 3}, path)
    loaded = make("deit-distilled", seed=123, weights=str(path))
    assert str(path) in loaded.source
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(B, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward(x), source.forward(x), atol=1e-6, rtol=0)


def test_bad_weights_fail_with_one_line(tmp_path):
    with pytest.raises(ModelLoadError, match="not found") as e:
        make("deit-distilled", weights=str(tmp_path / "missing.safetensors"))
    one_line(e)
    other = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=3)
    torch.save(other.state_dict(), tmp_path / "deeper.pth")
    with pytest.raises(ModelLoadError, match="unexpected") as e:
        make("deit-distilled", weights=str(tmp_path / "deeper.pth"))
    one_line(e)
    wider = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=2, embed_dim=96)
    torch.save(wider.state_dict(), tmp_path / "wider.pth")
    with pytest.raises(ModelLoadError, match="size mismatch") as e:
        make("deit-distilled", weights=str(tmp_path / "wider.pth"))
    one_line(e)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError) as e:
        make("deit-distilled", weights=str(tmp_path / "junk.safetensors"))
    one_line(e)


def test_unknown_model_and_missing_timm(monkeypatch):
    with pytest.raises(ModelLoadError, match="no model") as e:
        TimmBackend.load("vit_does_not_exist_patch16")
    one_line(e)
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(ModelLoadError, match="pip install timm") as e:
        TimmBackend.load("vit_tiny_patch16_224")
    one_line(e)


def test_load_backend_resolves_timm_names(tmp_path):
    """With --weights, a local file; without, timm's pretrained weights (tests/test_hub.py, offline cache)."""
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), tmp_path / "w.pth")
    backend = load_backend("timm:vit_tiny_patch16_224", weights=str(tmp_path / "w.pth"))
    assert isinstance(backend, TimmBackend)
    assert backend.source == f"timm:vit_tiny_patch16_224 ({tmp_path / 'w.pth'})"
    assert backend.forward(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_importing_siftlens_does_not_import_timm():
    code = (
        "import sys, siftlens, siftlens.attention, siftlens.models, siftlens.models.timm; "
        "assert 'timm' not in sys.modules, 'timm imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
