"""The Hugging Face backend on tiny random models saved to disk and loaded back through ``load_backend``.

Every attention comparison is against the model's own ``output_attentions=True`` on the whole batch.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from siftlens.attention import capture  # noqa: E402
from siftlens.errors import AttentionBackendError, GeometryError, ModelLoadError  # noqa: E402
from siftlens.models import load_backend  # noqa: E402
from siftlens.models.backend import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from siftlens.models.hf import HFBackend  # noqa: E402

B = 3  # batch size of every comparison
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, attn_implementation="eager")


def _pil_processor(name: str):
    """The PIL/NumPy image processor (transformers 5 names it ``<Name>Pil``; 4.x has only ``<Name>``)."""
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


@dataclass
class Spec:
    model_type: str
    model_cls: str
    config: dict
    prefix: int
    grid: tuple[int, int]
    processor: tuple[str, dict] | None = None
    saved_cls: str | None = None  # class written to disk when it differs from the one loaded back

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


VIT = dict(TINY, intermediate_size=64, patch_size=8)
DINO = dict(TINY, mlp_ratio=2, patch_size=8, image_size=32)

SPECS = {
    "vit-classifier": Spec(
        "vit", "ViTForImageClassification", dict(VIT, image_size=32, num_labels=3), 1, (4, 4),
        ("ViTImageProcessor", {"size": {"height": 32, "width": 32}})),
    "vit-nonsquare": Spec(
        "vit", "ViTModel", dict(VIT, image_size=(32, 48)), 1, (4, 6),
        ("ViTImageProcessor", {"size": {"height": 32, "width": 48}})),
    # resize to 43x43 then crop 32x32: HF's floor offset (5) differs from a rounded one (6)
    "deit-teacher": Spec(
        "deit", "DeiTForImageClassificationWithTeacher", dict(VIT, image_size=32, num_labels=4), 2, (4, 4),
        ("DeiTImageProcessor", {"size": {"height": 43, "width": 43},
                                "crop_size": {"height": 32, "width": 32}})),
    "deit-classifier": Spec(
        "deit", "DeiTForImageClassification", dict(VIT, image_size=(48, 32), num_labels=2), 2, (6, 4),
        ("DeiTImageProcessor", {"size": {"height": 48, "width": 32}, "do_center_crop": False})),
    "deit-base": Spec("deit", "DeiTModel", dict(VIT, image_size=32), 2, (4, 4)),
    # DINOv2 resamples its position embeddings, so a non-square crop of a square-config model is valid
    "dinov2-classifier": Spec(
        "dinov2", "Dinov2ForImageClassification", dict(DINO, num_labels=3), 1, (4, 6),
        ("BitImageProcessor", {"size": {"shortest_edge": 40}, "resample": 3,
                               "crop_size": {"height": 32, "width": 48}})),
    "dinov2-base": Spec("dinov2", "Dinov2Model", DINO, 1, (4, 4)),
    "dinov2-registers": Spec(
        "dinov2_with_registers", "Dinov2WithRegistersModel", dict(DINO, num_register_tokens=4), 5, (4, 4),
        ("BitImageProcessor", {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}})),
    "dinov2-registers-classifier": Spec(
        "dinov2_with_registers", "Dinov2WithRegistersForImageClassification",
        dict(DINO, num_register_tokens=2, num_labels=3), 3, (4, 4)),
    "vitmae-encoder": Spec(
        "vit_mae", "ViTMAEModel", dict(VIT, image_size=32), 1, (4, 4),
        ("ViTImageProcessor", {"size": {"height": 32, "width": 32}})),
    # the usual MAE checkpoint: the pre-training model, whose encoder is loaded as ViTMAEModel
    "vitmae-pretraining": Spec(
        "vit_mae", "ViTMAEModel",
        dict(VIT, image_size=32, decoder_hidden_size=16, decoder_num_hidden_layers=1,
             decoder_num_attention_heads=2, decoder_intermediate_size=32),
        1, (4, 4), saved_cls="ViTMAEForPreTraining"),
}


def _config(spec: Spec):
    cfg_cls = getattr(transformers, spec.model_cls.split("For")[0].replace("Model", "") + "Config")
    return cfg_cls(**spec.config)


def _classes(spec: Spec):
    cls = getattr(transformers, spec.model_cls, None)
    saved = getattr(transformers, spec.saved_cls or spec.model_cls, None)
    if cls is None or saved is None:
        pytest.skip(f"this transformers has no {spec.saved_cls or spec.model_cls}")
    return cls, saved


def save_model(spec: Spec, folder: Path, seed: int = 0):
    """Save a random model (and its processor) to ``folder``; returns the in-memory reference model."""
    _, saved_cls = _classes(spec)
    torch.manual_seed(seed)
    model = saved_cls(_config(spec)).eval()
    model.save_pretrained(folder)
    if spec.processor is not None:
        name, kwargs = spec.processor
        _pil_processor(name)(**kwargs).save_pretrained(folder)
    return model


def reference(model, x: torch.Tensor, spec: Spec):
    """The model's own forward on x (B, 3, H, W): attentions (one (B, h, S, S) per layer) and logits."""
    if spec.saved_cls == "ViTMAEForPreTraining":
        model = model.vit
    kwargs = {}
    if spec.model_type == "vit_mae":
        model.config.mask_ratio = 0.0
        kwargs["noise"] = torch.arange(spec.num_patches, dtype=torch.float32).expand(x.shape[0], -1)
    with torch.no_grad():
        out = model(pixel_values=x, output_attentions=True, **kwargs)
    if spec.model_type == "vit_mae":
        assert not out.mask.any()
        assert torch.equal(out.ids_restore, torch.arange(out.ids_restore.shape[1]).expand_as(out.ids_restore))
    return out.attentions, getattr(out, "logits", None)


def capture_all(backend, x: torch.Tensor):
    got: dict[int, torch.Tensor] = {}
    with torch.no_grad(), capture(backend, lambda layer, attn: got.__setitem__(layer, attn.clone())) as cap:
        logits = backend.forward(x)
    cap.check()
    return got, logits


def rgb_image(width: int = 62, height: int = 45, seed: int = 0) -> Image.Image:
    """A non-square RGB photo-like image: smooth gradients plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], -1)
    arr = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


@pytest.mark.parametrize("name", list(SPECS))
def test_geometry_attention_and_logits_match_the_model(name, tmp_path):
    spec = SPECS[name]
    ref_model = save_model(spec, tmp_path)
    backend = load_backend(str(tmp_path))
    assert isinstance(backend, HFBackend)
    assert backend.patch_size == 8
    assert backend.grid_size == spec.grid
    assert backend.input_size == (spec.grid[0] * 8, spec.grid[1] * 8)
    assert backend.num_prefix_tokens == spec.prefix
    assert backend.num_layers == 2 and backend.num_heads == 4
    assert type(backend.model).__name__ == spec.model_cls
    d = backend.describe()
    assert d["model_type"] == spec.model_type and d["hf_class"] == spec.model_cls
    json.dumps(d)  # goes into the run manifest
    if "ForImageClassification" in spec.model_cls:
        assert backend.class_names == [f"LABEL_{i}" for i in range(spec.config["num_labels"])]
    else:
        assert backend.class_names is None

    torch.manual_seed(1)
    x = torch.randn(B, 3, *backend.input_size)
    ref_attn, ref_logits = reference(ref_model, x, spec)
    got, logits = capture_all(backend, x)
    S = spec.prefix + spec.grid[0] * spec.grid[1]
    assert sorted(got) == list(range(backend.num_layers)) == list(range(len(ref_attn)))
    for layer, attn in got.items():
        assert attn.shape == (B, 4, S, S)
        torch.testing.assert_close(attn, ref_attn[layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(attn.sum(-1), torch.ones(B, 4, S), atol=1e-5, rtol=0)
    if ref_logits is None:
        assert logits is None
    else:
        assert logits.shape == (B, spec.config["num_labels"])
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


def test_deit_with_teacher_forward_is_the_averaged_logits(tmp_path):
    ref_model = save_model(SPECS["deit-teacher"], tmp_path)
    backend = load_backend(str(tmp_path))
    x = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        out = ref_model(pixel_values=x)
        torch.testing.assert_close(backend.forward(x), (out.cls_logits + out.distillation_logits) / 2)


def test_vitmae_keeps_every_patch_in_order(tmp_path):
    """With the identity noise the encoder sees all N patches in row-major order, not a random shuffle."""
    save_model(SPECS["vitmae-pretraining"], tmp_path)
    backend = load_backend(str(tmp_path))
    assert backend.model.config.mask_ratio == 0.0
    x = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        out = backend.model(pixel_values=x, **backend.model_kwargs(x))
        again = backend.model(pixel_values=x, **backend.model_kwargs(x))
    assert out.last_hidden_state.shape == (B, 1 + 16, 32)
    assert torch.equal(out.ids_restore, torch.arange(16).expand(B, 16))
    torch.testing.assert_close(out.last_hidden_state, again.last_hidden_state, atol=0, rtol=0)


def test_hooks_are_removed_after_the_block_and_after_an_error(tmp_path):
    save_model(SPECS["vit-classifier"], tmp_path)
    backend = load_backend(str(tmp_path))
    x = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        backend.model(pixel_values=x, output_attentions=True)  # transformers may install its own hooks here
    modules = [m for m, _ in backend.probes()]
    before = [dict(m._forward_hooks) for m in modules]

    with capture(backend, lambda layer, attn: None):
        assert all(len(m._forward_hooks) == len(b) + 1 for m, b in zip(modules, before, strict=True))
        backend.forward(x)
    assert [dict(m._forward_hooks) for m in modules] == before
    assert all(not m._forward_hooks_with_kwargs for m in modules)

    with pytest.raises(ZeroDivisionError), capture(backend, lambda layer, attn: 1 / 0):
        backend.forward(x)
    assert [dict(m._forward_hooks) for m in modules] == before
    assert backend.model.config._attn_implementation == "eager"


def test_eager_switches_from_sdpa_and_restores_it(tmp_path, monkeypatch):
    ref_model = save_model(SPECS["vit-classifier"], tmp_path)
    backend = load_backend(str(tmp_path))
    backend.model.set_attn_implementation("sdpa")
    assert backend.model.config._attn_implementation == "sdpa"
    x = torch.randn(B, 3, 32, 32)
    ref_attn, _ = reference(ref_model, x, SPECS["vit-classifier"])
    got, _ = capture_all(backend, x)
    for layer, attn in got.items():
        torch.testing.assert_close(attn, ref_attn[layer], atol=1e-5, rtol=0)
    assert backend.model.config._attn_implementation == "sdpa"
    # without the switch, SDPA returns no weights and the capture fails loudly instead of returning nothing
    monkeypatch.setattr(backend, "eager", contextlib.nullcontext)
    with pytest.raises(AttentionBackendError), capture(backend, lambda layer, attn: None):
        backend.forward(x)


@pytest.mark.parametrize("name", ["vit-nonsquare", "deit-teacher", "dinov2-classifier"])
def test_preprocess_and_normalize_equal_the_image_processor(name, tmp_path):
    spec = SPECS[name]
    save_model(spec, tmp_path)
    backend = load_backend(str(tmp_path))
    processor = _pil_processor(spec.processor[0]).from_pretrained(str(tmp_path))
    imgs = [rgb_image(62, 45, 0), rgb_image(45, 70, 1), rgb_image(33, 33, 2)]
    pixels = np.stack([backend.preprocess(im) for im in imgs])
    assert pixels.dtype == np.uint8 and pixels.shape == (3, *backend.input_size, 3)
    ours = backend.normalize(torch.from_numpy(pixels))
    theirs = processor(images=imgs, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)


def test_missing_preprocessor_is_defaulted_and_recorded(tmp_path):
    save_model(SPECS["deit-base"], tmp_path)
    backend = load_backend(str(tmp_path))
    assert backend.describe()["preprocessor"] == "defaulted"
    assert backend.mean == IMAGENET_MEAN and backend.std == IMAGENET_STD
    px = backend.preprocess(rgb_image(62, 45))
    assert px.shape == (32, 32, 3) and px.dtype == np.uint8
    json.dumps(backend.describe())


def _one_line_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("spec", ["/nonexistent/vit-folder", "google/vit-base-patch16-224"])
def test_missing_folder_and_uncached_hub_names_fail_with_one_line(spec, tmp_path, monkeypatch):
    from _hub import offline_hub

    offline_hub(tmp_path / "hf", monkeypatch)  # an empty cache, offline: nothing reaches the network
    with pytest.raises(ModelLoadError) as e:
        load_backend(spec)
    _one_line_error(e)
    with pytest.raises(ModelLoadError) as e:
        HFBackend.load(spec)
    msg = _one_line_error(e)
    if spec.startswith("google/"):
        assert "not in the local cache" in msg and "HF_HOME" in msg and "HF_HUB_OFFLINE" in msg


def test_folder_without_weights_fails_with_one_line(tmp_path):
    _config(SPECS["vit-classifier"]).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        load_backend(str(tmp_path))
    _one_line_error(e)


def test_incomplete_checkpoint_is_refused_not_randomly_filled(tmp_path):
    from safetensors.torch import load_file, save_file

    save_model(SPECS["vit-classifier"], tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(str(f))
    dropped = next(k for k in sd if "layer.1." in k and "attention" in k)
    del sd[dropped]
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing") as e:
        load_backend(str(tmp_path))
    _one_line_error(e)


def test_unsupported_model_type(tmp_path):
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not supported") as e:
        load_backend(str(tmp_path))
    _one_line_error(e)


def test_image_size_not_divisible_by_patch_is_a_geometry_error(tmp_path):
    transformers.ViTConfig(**dict(VIT, image_size=30)).save_pretrained(tmp_path)
    with pytest.raises(GeometryError, match="not divisible") as e:
        load_backend(str(tmp_path))
    _one_line_error(e)


def test_preprocessor_size_must_match_the_models_input(tmp_path):
    save_model(SPECS["vit-classifier"], tmp_path)
    _pil_processor("ViTImageProcessor")(size={"height": 40, "width": 40}).save_pretrained(tmp_path)
    with pytest.raises(GeometryError, match="40x40") as e:
        load_backend(str(tmp_path))
    _one_line_error(e)
