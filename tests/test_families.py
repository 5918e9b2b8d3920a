"""The CLIP, SigLIP, SigLIP2, BEiT and Data2Vec-vision families on tiny random models saved and loaded back offline.

Capture is compared with the model's own ``output_attentions=True``; token drop and attention bias with forwards
written out from the library's own modules; preprocessing with the library's image processor. Swin is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from siftlens.attention import capture  # noqa: E402
from siftlens.errors import ModelLoadError  # noqa: E402
from siftlens.models import load_backend  # noqa: E402
from siftlens.models.hf import HFBackend  # noqa: E402

B = 3
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=8)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
BEIT = dict(TINY, image_size=32, use_absolute_position_embeddings=False, use_relative_position_bias=True,
            use_mean_pooling=True, layer_scale_init_value=0.5)


def _pil(name: str):
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


@dataclass
class Spec:
    cls: str  # class saved to disk
    config: object  # a callable returning the config
    prefix: int
    loaded: str  # class load_backend gives back
    processor: tuple[str, dict] | None = None
    classifier: bool = False


def _clip(**kw):
    return transformers.CLIPConfig(vision_config=dict(TINY, image_size=32), text_config=TEXT, **kw)


def _siglip(**kw):
    return transformers.SiglipConfig(vision_config=dict(TINY, image_size=32), text_config=TEXT, **kw)


def _siglip2(**kw):
    return transformers.Siglip2Config(vision_config=dict(TINY, num_patches=16), text_config=TEXT, **kw)


CLIP_PP = ("CLIPImageProcessor", {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}})
SIGLIP_PP = ("SiglipImageProcessor", {"size": {"height": 32, "width": 32}})
SIGLIP2_PP = ("Siglip2ImageProcessor", {"patch_size": 8, "max_num_patches": 16})
BEIT_PP = ("BeitImageProcessor", {"size": {"height": 32, "width": 32}, "do_center_crop": False})

SPECS = {
    "clip-vision": Spec("CLIPVisionModel", lambda: transformers.CLIPVisionConfig(**TINY, image_size=32), 1,
                        "CLIPVisionModel", CLIP_PP),
    "clip-whole": Spec("CLIPModel", _clip, 1, "CLIPVisionModel", CLIP_PP),
    "clip-classifier": Spec("CLIPForImageClassification", lambda: _clip(num_labels=3), 1,
                            "CLIPForImageClassification", CLIP_PP, classifier=True),
    "siglip-vision": Spec("SiglipVisionModel", lambda: transformers.SiglipVisionConfig(**TINY, image_size=32), 0,
                          "SiglipVisionModel", SIGLIP_PP),
    "siglip-whole": Spec("SiglipModel", _siglip, 0, "SiglipVisionModel", SIGLIP_PP),
    "siglip-classifier": Spec("SiglipForImageClassification", lambda: _siglip(num_labels=3), 0,
                              "SiglipForImageClassification", SIGLIP_PP, classifier=True),
    "siglip2-whole": Spec("Siglip2Model", _siglip2, 0, "Siglip2VisionModel", SIGLIP2_PP),
    "siglip2-classifier": Spec("Siglip2ForImageClassification", lambda: _siglip2(num_labels=3), 0,
                               "Siglip2ForImageClassification", SIGLIP2_PP, classifier=True),
    "beit-classifier": Spec("BeitForImageClassification", lambda: transformers.BeitConfig(**BEIT, num_labels=3), 1,
                            "BeitForImageClassification", BEIT_PP, classifier=True),
    "beit-shared-bias": Spec(
        "BeitModel", lambda: transformers.BeitConfig(**dict(BEIT, use_relative_position_bias=False,
                                                            use_shared_relative_position_bias=True,
                                                            use_absolute_position_embeddings=True)),
        1, "BeitModel", BEIT_PP),
    "data2vec-classifier": Spec("Data2VecVisionForImageClassification",
                                lambda: transformers.Data2VecVisionConfig(**BEIT, num_labels=3), 1,
                                "Data2VecVisionForImageClassification", BEIT_PP, classifier=True),
}


def save(spec: Spec, folder: Path, seed: int = 0):
    """A random model (relative position tables randomised: they start at zero) and its processor."""
    torch.manual_seed(seed)
    model = getattr(transformers, spec.cls)(spec.config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 1.0)
    model.save_pretrained(folder)
    if spec.processor is not None:
        name, kwargs = spec.processor
        _pil(name)(**kwargs).save_pretrained(folder)
    return model


def vision_part(model):
    return model.vision_model if hasattr(model, "vision_model") else model


def library_forward(model, x, backend):
    """The model's own forward with output_attentions=True, fed the way its processor feeds it."""
    kw = backend.model_inputs(x)
    if kw.get("pixel_attention_mask", 0) is None:
        kw["pixel_attention_mask"] = torch.ones(x.shape[0], backend.num_patches, dtype=torch.int32)
    target = model if backend.is_classifier else vision_part(model)
    with torch.no_grad():
        out = target(**kw, output_attentions=True)
    return out.attentions, getattr(out, "logits", None)


def captured(backend, x):
    got = {}
    with torch.no_grad(), capture(backend, lambda layer, a: got.__setitem__(layer, a.clone())) as cap:
        logits = backend.forward(x)
    cap.check()
    return got, logits


@pytest.mark.parametrize("name", list(SPECS))
def test_capture_and_logits_equal_the_library(name, tmp_path):
    spec = SPECS[name]
    save(spec, tmp_path)
    # the library returns attention weights in its eager implementation only
    ref = getattr(transformers, spec.cls).from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    be = load_backend(str(tmp_path))
    assert isinstance(be, HFBackend) and type(be.model).__name__ == spec.loaded
    assert be.num_prefix_tokens == spec.prefix and be.has_cls == (spec.prefix > 0)
    assert be.grid_size == (4, 4) and be.patch_size == 8 and be.num_layers == 2 and be.num_heads == 4
    d = be.describe()
    json.dumps(d)
    assert d["preprocessor"] != "defaulted"
    assert ("cls_row" in d) == (spec.prefix == 0)
    torch.manual_seed(1)
    x = torch.randn(B, 3, 32, 32)
    ref_attn, ref_logits = library_forward(ref, x, be)
    got, logits = captured(be, x)
    S = spec.prefix + 16
    assert sorted(got) == [0, 1] and len(ref_attn) == 2
    for layer, attn in got.items():
        assert attn.shape == (B, 4, S, S)
        torch.testing.assert_close(attn, ref_attn[layer], atol=1e-5, rtol=0)
    if spec.classifier:
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    else:
        assert logits is None


def _gather(h, keep, T):
    return torch.cat([h[:, :T], torch.gather(h[:, T:], 1, keep[..., None].expand(-1, -1, h.shape[-1]))], 1)


def _token_index(keep, T):
    return torch.cat([torch.arange(T).expand(keep.shape[0], T), keep + T], 1)


def manual(be, x, keep=None, bias=None, layers=()):
    """The classifier's forward written out from its own modules: tokens gathered after the embeddings, the
    relative position bias gathered with them, the key bias (B, N) added to the chosen layers' masks."""
    root, T, m = be.vision, be.num_prefix_tokens, be.model
    kw = be.model_inputs(x)
    if be.family.naflex:
        h = root.embeddings(kw["pixel_values"], kw["spatial_shapes"])
    else:
        h = root.embeddings(x)
    if isinstance(h, tuple):  # Data2Vec-vision: (tokens, patch grid)
        h = h[0]
    idx = _token_index(keep if keep is not None else torch.arange(be.num_patches).expand(x.shape[0], -1), T)
    if keep is not None:
        h = _gather(h, keep, T)
    kb = None
    if bias is not None:
        kb = torch.cat([torch.zeros(x.shape[0], T), bias if keep is None else torch.gather(bias, 1, keep)], 1)
        kb = kb[:, None, None]
    if hasattr(root, "pre_layrnorm"):
        h = root.pre_layrnorm(h)
    if be.family.relative_bias:
        layers_ = root.encoder.layer if be.family.legacy else root.layers
        for i, layer in enumerate(layers_):
            rel = layer.attention.attention.relative_position_bias if be.family.legacy else layer.relative_position_bias
            rb = rel((4, 4), False, dim_size=None).expand(x.shape[0], -1, -1, -1)
            S = idx.shape[1]
            rb = torch.gather(rb, 2, idx[:, None, :, None].expand(-1, rb.shape[1], S, rb.shape[3]))
            rb = torch.gather(rb, 3, idx[:, None, None, :].expand(-1, rb.shape[1], S, S))
            mask = rb + kb if (kb is not None and i in layers) else rb
            h = _legacy_layer(layer, h, mask) if be.family.legacy else _beit_layer(layer, h, mask)
        return m.classifier(root.pooler(root.layernorm(h)))
    for i, layer in enumerate(root.encoder.layers):
        h = layer(h, kb if (kb is not None and i in layers) else None)
    if be.model_type == "clip":
        return m.classifier(h[:, 1:].mean(1))
    return m.classifier(root.post_layernorm(h).mean(1))


def _beit_layer(layer, h, mask):
    a, _ = layer.attention(layer.layernorm_before(h), attention_mask=mask)
    h = h + layer.lambda_1 * a
    return h + layer.lambda_2 * layer.mlp(layer.layernorm_after(h))


def _legacy_layer(layer, h, mask):
    """Data2Vec-vision's layer with the attention scores written out: q k^T / sqrt(d) + mask, softmax, values."""
    sa, x = layer.attention.attention, layer.layernorm_before(h)
    Bx, S, _ = x.shape
    d = sa.attention_head_size
    q, k, v = (lin(x).view(Bx, S, -1, d).transpose(1, 2) for lin in (sa.query, sa.key, sa.value))
    probs = (q @ k.transpose(-1, -2) / d**0.5 + mask).softmax(-1)
    ctx = (probs @ v).transpose(1, 2).reshape(Bx, S, -1)
    h = h + layer.lambda_1 * layer.attention.output(ctx, x)
    return h + layer.lambda_2 * layer.output(layer.intermediate(layer.layernorm_after(h)))


@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if s.classifier])
def test_drop_and_bias_equal_a_forward_from_the_libraries_modules(name, tmp_path):
    save(SPECS[name], tmp_path)
    be = load_backend(str(tmp_path))
    N = be.num_patches
    torch.manual_seed(2)
    x = torch.randn(B, 3, 32, 32)
    keep = torch.stack([torch.randperm(N)[:7].sort().values for _ in range(B)])
    bias = torch.randn(B, N) * 2
    with torch.no_grad():
        plain = be.forward(x)
        torch.testing.assert_close(manual(be, x), plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(be.forward_intervened(x), plain, atol=1e-5, rtol=1e-5)
        dropped = be.forward_intervened(x, keep_idx=keep)
        torch.testing.assert_close(dropped, manual(be, x, keep=keep), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(dropped, plain, atol=1e-4)
        torch.testing.assert_close(be.forward_intervened(x, key_bias=bias, layers=[0]),
                                   manual(be, x, bias=bias, layers=(0,)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(be.forward_intervened(x, keep_idx=keep, key_bias=bias),
                                   manual(be, x, keep=keep, bias=bias, layers=(0, 1)), atol=1e-5, rtol=1e-5)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in be.model.modules())


@pytest.mark.parametrize("name", ["clip-classifier", "siglip-classifier", "beit-classifier"])
def test_a_minus_inf_bias_removes_keys_in_the_chosen_layer_only(name, tmp_path):
    save(SPECS[name], tmp_path)
    be = load_backend(str(tmp_path))
    T = be.num_prefix_tokens
    bias = torch.zeros(B, be.num_patches)
    bias[:, :5] = float("-inf")
    got = {}
    with torch.no_grad(), capture(be, lambda layer, a: got.__setitem__(layer, a.clone())):
        be.forward_intervened(torch.randn(B, 3, 32, 32), key_bias=bias, layers=[1])
    assert (got[1][..., T : T + 5] == 0).all() and (got[0][..., T : T + 5] > 0).all()


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize("name", ["clip-whole", "siglip-whole", "siglip2-whole", "beit-classifier"])
def test_preprocessing_equals_the_image_processor(name, tmp_path):
    spec = SPECS[name]
    save(spec, tmp_path)
    be = load_backend(str(tmp_path))
    proc = _pil(spec.processor[0]).from_pretrained(str(tmp_path))
    # SigLIP2 (NaFlex) keeps each image's aspect ratio; siftlens's one square grid equals it on square images
    imgs = [_image(45, 45, 0), _image(40, 40, 1)] if "siglip2" in name else [_image(62, 45, 0), _image(45, 70, 1)]
    pixels = torch.from_numpy(np.stack([be.preprocess(im) for im in imgs]))
    ours = be.model_inputs(be.normalize(pixels))["pixel_values"]
    theirs = proc(images=imgs, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)


def test_swin_is_refused_in_one_line(tmp_path):
    cfg = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                  window_size=4)
    model = transformers.SwinModel(cfg).eval()
    model.save_pretrained(tmp_path)
    for spec in (str(tmp_path), model):
        with pytest.raises(ModelLoadError) as e:
            load_backend(spec)
        msg = str(e.value)
        assert "\n" not in msg and "not supported: window attention has no global token-to-token map" in msg
