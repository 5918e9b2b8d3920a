"""Model objects in the API: a transformers PreTrainedModel (with or without an image processor), a timm model
(``make test-timm``), a siftlens ViT; anything else is one line listing what is accepted."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pandas as pd
import pytest
import torch

from siftlens.errors import ModelLoadError
from siftlens.models import load_backend
from siftlens.models.native import NativeBackend

DEMO = Path(str(files("siftlens") / "assets" / "demo_images"))
FAST = dict(n_boot=30, limit=3, overlays=0, explore=0)


def _hf_vit(folder: Path | None = None):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=32, patch_size=8, num_labels=10)
    model = transformers.ViTForImageClassification(cfg).eval()
    proc_cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    proc = proc_cls(size={"height": 32, "width": 32}, image_mean=[0.3, 0.4, 0.5], image_std=[0.2, 0.25, 0.3])
    if folder is not None:
        model.save_pretrained(folder)
        proc.save_pretrained(folder)
    return model, proc


def test_hf_object_with_its_processor_analyses_like_its_folder(tmp_path):
    from siftlens.analysis import analyze

    model, proc = _hf_vit(tmp_path / "vit")
    be = load_backend(model, processor=proc)
    assert be.model is model and be.describe()["preprocessor"]["from"] == "image processor"
    pair = load_backend((model, proc))
    folder = load_backend(str(tmp_path / "vit"))
    assert pair.mean == be.mean == folder.mean and be.std == folder.std
    res = analyze((model, proc), str(DEMO), out=tmp_path / "obj", progress=False, **FAST)
    ref = analyze(str(tmp_path / "vit"), str(DEMO), out=tmp_path / "dir", progress=False, **FAST)
    pd.testing.assert_frame_equal(res.summary, ref.summary)
    run = json.loads((tmp_path / "obj" / "run.json").read_text())
    assert run["model"]["spec"].startswith("object:ViTForImageClassification")


def test_hf_object_finds_the_processor_where_it_was_loaded_from(tmp_path):
    transformers = pytest.importorskip("transformers")
    _hf_vit(tmp_path / "vit")
    loaded = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "vit"))
    be = load_backend(loaded)
    assert be.describe()["preprocessor"]["from"] == "preprocessor_config.json"
    fresh, _ = _hf_vit()
    assert load_backend(fresh).describe()["preprocessor"] == "defaulted"  # nothing to read it from: recorded


def test_hf_multimodal_object_uses_its_vision_tower():
    transformers = pytest.importorskip("transformers")
    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = transformers.CLIPModel(transformers.CLIPConfig(vision_config=dict(tiny, image_size=32, patch_size=8),
                                                           text_config=dict(tiny, num_hidden_layers=1)))
    be = load_backend(model)
    assert be.vision is model.vision_model and be.num_prefix_tokens == 1 and be.describe()["family"] == "CLIP vision"
    assert be.forward(torch.randn(2, 3, 32, 32)) is None


def test_siftlens_vit_object(tiny_vit, tmp_path):
    from siftlens.analysis import analyze

    be = load_backend(tiny_vit)
    assert isinstance(be, NativeBackend) and be.source == "object:ViT" and be.model is tiny_vit
    assert load_backend(be) is be
    res = analyze(tiny_vit, str(DEMO), out=tmp_path / "o", progress=False, **dict(FAST, limit=2))
    assert len(res.summary) > 0


@pytest.mark.parametrize("obj", [torch.nn.Linear(2, 2), object(), "not/a/hub id!"])
def test_unsupported_objects_are_one_line_listing_what_is_accepted(obj):
    with pytest.raises(ModelLoadError) as e:
        load_backend(obj)
    msg = str(e.value)
    assert "\n" not in msg
    if not isinstance(obj, str):
        for accepted in ("PreTrainedModel", "timm VisionTransformer", "siftlens ViT", "hub id"):
            assert accepted in msg


def test_an_hf_object_of_another_family_says_which_are_supported():
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=32))
    with pytest.raises(ModelLoadError, match="not supported; siftlens supports"):
        load_backend(bert)


@pytest.mark.timm
def test_timm_object_uses_its_pretrained_cfg():
    timm = pytest.importorskip("timm", reason="timm not installed (needs torchvision); run `make test-timm`")
    from siftlens.models.timm import TimmBackend

    torch.manual_seed(0)
    model = timm.create_model("test_vit.r160_in1k", pretrained=False).eval()
    be = load_backend(model)
    assert isinstance(be, TimmBackend) and be.model is model
    assert be.source == "object:timm:test_vit.r160_in1k"
    assert be.input_size == (160, 160) and be.crop_pct == model.pretrained_cfg["crop_pct"]
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(be.forward(x), model(x))
