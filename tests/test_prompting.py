"""Interventions (drop, keep-top, bias) on native and Hugging Face models, and prompting's bookkeeping."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from siftlens.errors import ConfigError, GeometryError
from siftlens.keypoints import footprint_patches
from siftlens.models.native import NativeBackend
from siftlens.models.vit import ViT, ViTConfig, save_vit
from siftlens.options import build
from siftlens.shortcuts import (
    PromptConfig,
    group_accuracy,
    image_groups,
    prompt,
)
from siftlens.shortcuts.interventions import dilate, forward_bias, forward_drop, keep_top_idx, semantic_bias
from siftlens.shortcuts.prompting import semantic_weights

B = 4


def random_keep(N: int, K: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=g)[:K].sort().values for _ in range(B)])


def drop_mask(N: int, seed: int = 0) -> torch.Tensor:
    """(B, N) bool with a different number of dropped patches per image (0 for the first)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(B, N, dtype=torch.bool)
    for b in range(1, B):
        m[b, torch.randperm(N, generator=g)[: 2 * b]] = True
    return m


# -- native ViT -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_native_drop_equals_key_masking(tiny_vit, fused):
    """Removing tokens with keep_idx == giving their keys -inf in every layer (CLS pooling, registers kept)."""
    be = NativeBackend(tiny_vit)
    tiny_vit.set_fused(fused)
    x = torch.randn(B, 3, 24, 32)
    N = be.num_patches
    keep = random_keep(N, 5)
    bias = torch.full((B, N), float("-inf")).scatter(1, keep, 0.0)
    with torch.no_grad():
        a = be.forward_intervened(x, keep_idx=keep)
        b = be.forward_intervened(x, key_bias=bias)
        plain = be.forward(x)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(a, plain, atol=1e-3)
        # nothing dropped == the plain forward; variable counts: grouped removal == one masked forward
        torch.testing.assert_close(be.forward_intervened(x, keep_idx=torch.arange(N).expand(B, N)), plain,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(be.forward_intervened(x), plain, atol=0, rtol=0)
        m = drop_mask(N)
        g, k = forward_drop(be, x, m, "group"), forward_drop(be, x, m, "mask")
        torch.testing.assert_close(g, k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g[0], plain[0], atol=1e-5, rtol=1e-5)
        for i in range(1, B):
            keep_i = (~m[i]).nonzero().flatten()[None]
            torch.testing.assert_close(g[i : i + 1], be.forward_intervened(x[i : i + 1], keep_idx=keep_i),
                                       atol=1e-5, rtol=1e-5)
    tiny_vit.set_fused(True)


def test_native_mean_pooling_masking_leaves_masked_tokens_out():
    torch.manual_seed(0)
    m = ViT(ViTConfig(img_size=(16, 16), patch_size=4, dim=32, depth=2, heads=2, pool="mean", cls_token=False,
                      num_classes=3)).eval()
    be = NativeBackend(m)
    x = torch.randn(B, 3, 16, 16)
    mask = drop_mask(16, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(forward_drop(be, x, mask, "group"), forward_drop(be, x, mask, "mask"),
                                   atol=1e-5, rtol=1e-5)


def test_bias_with_beta_zero_or_no_keypoints_changes_nothing(tiny_vit):
    be = NativeBackend(tiny_vit)
    x = torch.randn(B, 3, 24, 32)
    N = be.num_patches
    w = torch.rand(B, N) * (torch.rand(B, N) > 0.5)
    with torch.no_grad():
        plain = be.forward(x)
        torch.testing.assert_close(forward_bias(be, x, semantic_bias(w, beta=0.0)), plain, atol=1e-6, rtol=1e-6)
        # no keypoints: no prior; keypoints spread evenly: the prior is neutral, whatever beta
        torch.testing.assert_close(forward_bias(be, x, semantic_bias(torch.zeros(B, N), beta=3.0)), plain,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(forward_bias(be, x, semantic_bias(torch.full((B, N), 2.0), beta=3.0)), plain,
                                   atol=1e-5, rtol=1e-5)
        c = torch.tensor([[0.0, 1.0, 3.0]])
        torch.testing.assert_close(semantic_bias(c, 2.0, 0.1),
                                   2.0 * (torch.log(0.1 + c / 4) - torch.log(torch.tensor(0.1 + 1 / 3))))
        strong = forward_bias(be, x, semantic_bias(w, beta=2.0))
        assert not torch.allclose(strong, plain, atol=1e-4)


def test_bias_only_in_chosen_layers(tiny_vit):
    be = NativeBackend(tiny_vit)
    x = torch.randn(B, 3, 24, 32)
    N = be.num_patches
    bias = torch.randn(B, N) * 3
    with torch.no_grad():
        all_layers = be.forward_intervened(x, key_bias=bias)
        torch.testing.assert_close(be.forward_intervened(x, key_bias=bias, layers=[0, 1]), all_layers)
        torch.testing.assert_close(be.forward_intervened(x, key_bias=bias, layers=[-1, -2]), all_layers)
        last = be.forward_intervened(x, key_bias=bias, layers=[-1])
        assert not torch.allclose(last, all_layers, atol=1e-4)
        # by hand: block 0 without bias, block 1 with it
        t = tiny_vit.embed(x)
        full = torch.cat([torch.zeros(B, be.num_prefix_tokens), bias], 1)[:, None, None]
        t = tiny_vit.blocks[1](tiny_vit.blocks[0](t), full)
        torch.testing.assert_close(tiny_vit.head(tiny_vit.norm(t)[:, 0]), last, atol=1e-5, rtol=1e-5)
    with pytest.raises(GeometryError):
        be.forward_intervened(x, keep_idx=torch.full((B, 2), N))
    with pytest.raises(ConfigError, match="out of range"):
        be.forward_intervened(x, key_bias=bias, layers=[2])


def test_keep_top_keeps_the_right_count_and_the_heaviest_patches():
    w = torch.tensor([[0.0, 5.0, 1.0, 0.0, 3.0, 0.0, 2.0, 0.0], [1.0] * 8])
    g = torch.Generator().manual_seed(0)
    keep = keep_top_idx(w, 0.3, g)  # ceil(0.3 * 8) = 3
    assert keep.shape == (2, 3)
    assert keep[0].tolist() == [1, 4, 6]
    assert (keep[1].diff() > 0).all()  # ascending, distinct
    assert keep_top_idx(w, 1.0).shape == (2, 8) and keep_top_idx(w, 0.01).shape == (2, 1)
    a = keep_top_idx(w, 0.5, torch.Generator().manual_seed(1))
    b = keep_top_idx(w, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ConfigError):
        keep_top_idx(w, 0.0)


def test_dilate_and_footprint_flags():
    m = torch.zeros(1, 12, dtype=torch.bool)
    m[0, 5] = True  # grid 3x4, row 1 col 1
    d = dilate(m, (3, 4), 1).view(3, 4)
    assert d.sum() == 9 and d[:, :3].all() and not d[:, 3].any()
    fp = footprint_patches(np.array([[3.5, 3.5], [9.5, 5.5], [5.5, 5.5]]), np.array([4.0, 0.5, 4.0]), 4, (3, 4))
    assert set(np.flatnonzero(fp).tolist()) == {0, 1, 4, 5, 6}  # rows 0-1 x cols 0-1, then (1, 2)


def test_response_scheme_weighs_keypoints_by_their_response():
    """--scheme response is honoured (it used to fall back to count silently)."""
    it = {"xy": np.array([[1.0, 1.0], [2.0, 2.0], [9.0, 1.0]], np.float32), "size": np.full(3, 2.0, np.float32),
          "response": np.array([0.1, 0.3, 0.5], np.float32), "desc": np.zeros((3, 128), np.uint8)}
    w = semantic_weights(it, np.zeros(3, bool), 8, (2, 2), "response")
    np.testing.assert_allclose(w, [0.4, 0.5, 0.0, 0.0], rtol=1e-6)
    wc = semantic_weights(it, np.zeros(3, bool), 8, (2, 2), "count")
    np.testing.assert_array_equal(wc, [2.0, 1.0, 0.0, 0.0])
    # flagged keypoints do not count
    np.testing.assert_array_equal(semantic_weights(it, np.array([True, False, False]), 8, (2, 2), "count"),
                                  [1.0, 1.0, 0.0, 0.0])


# -- accuracy bookkeeping ---------------------------------------------------------------------------
def test_group_accuracy_on_a_hand_example():
    correct = np.array([1, 1, 0, 1, 0, 0, 1], bool)
    groups = ["cat|aligned", "cat|aligned", "cat|conflicting", "dog|aligned", "dog|conflicting",
              "dog|conflicting", "dog|conflicting"]
    r = group_accuracy(correct, groups)
    assert r["n"] == 7 and r["overall"] == pytest.approx(4 / 7)
    assert r["groups"] == {"cat|aligned": {"n": 2, "accuracy": 1.0}, "cat|conflicting": {"n": 1, "accuracy": 0.0},
                           "dog|aligned": {"n": 1, "accuracy": 1.0},
                           "dog|conflicting": {"n": 3, "accuracy": pytest.approx(1 / 3)}}
    assert r["worst_group"] == {"name": "cat|conflicting", "n": 1, "accuracy": 0.0}
    side = {"images": {"cat/0.png": {"label": "cat", "aligned": False}, "dog/1.png": {"label": "dog", "aligned": True}}}
    assert image_groups(["cat/0.png", "dog/1.png"], ["cat", "dog"], side) == ["cat|conflicting", "dog|aligned"]
    assert image_groups(["cat/0.png"], ["cat"], None) == ["cat"]


# -- Hugging Face -----------------------------------------------------------------------------------
def hf_backend(kind: str = "vit", attn: str = "eager", seed: int = 0):
    transformers = pytest.importorskip("transformers")
    from siftlens.models.hf import HFBackend

    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                  patch_size=8, num_labels=3, attn_implementation=attn)
    if kind == "vit":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(**common))
    else:
        model = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**common))
    return HFBackend(model.eval())


def hf_manual_drop(be, x, keep):
    """Reference built from the model's own modules: embeddings, gather, layers, norm, classifier."""
    base = be.model.base_model
    T = be.num_prefix_tokens
    emb = base.embeddings(x)
    patches = torch.gather(emb[:, T:], 1, keep[..., None].expand(-1, -1, emb.shape[-1]))
    h = torch.cat([emb[:, :T], patches], 1)
    for layer in base.layers:
        h = layer(h)
    h = base.layernorm(h)
    if hasattr(be.model, "distillation_classifier"):
        return (be.model.cls_classifier(h[:, 0]) + be.model.distillation_classifier(h[:, 1])) / 2
    return be.model.classifier(h[:, 0])


@pytest.mark.parametrize("kind, attn", [("vit", "eager"), ("vit", "sdpa"), ("deit", "eager")])
def test_hf_interventions_match_native_semantics(kind, attn):
    be = hf_backend(kind, attn)
    x = torch.randn(B, 3, 32, 32)
    N = be.num_patches
    with torch.no_grad():
        plain = be.forward(x)
        torch.testing.assert_close(be.forward_intervened(x), plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(be.forward_intervened(x, keep_idx=torch.arange(N).expand(B, N)), plain,
                                   atol=1e-5, rtol=1e-5)
        keep = random_keep(N, 3, seed=1)
        dropped = be.forward_intervened(x, keep_idx=keep)
        torch.testing.assert_close(dropped, hf_manual_drop(be, x, keep), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(dropped, plain, atol=1e-4)
        bias = torch.full((B, N), float("-inf")).scatter(1, keep, 0.0)
        torch.testing.assert_close(be.forward_intervened(x, key_bias=bias), dropped, atol=1e-5, rtol=1e-5)
        m = drop_mask(N, seed=3)
        torch.testing.assert_close(forward_drop(be, x, m, "group"), forward_drop(be, x, m, "mask"),
                                   atol=1e-5, rtol=1e-5)
        w = torch.rand(B, N)
        torch.testing.assert_close(forward_bias(be, x, semantic_bias(w, beta=0.0)), plain, atol=1e-5, rtol=1e-5)
    # hooks are gone afterwards
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in be.model.modules())


def test_hf_bias_lands_on_the_logits_of_the_chosen_layers():
    from siftlens.attention import capture

    be = hf_backend("vit", "eager")
    x = torch.randn(B, 3, 32, 32)
    N, T = be.num_patches, be.num_prefix_tokens
    bias = torch.zeros(B, N)
    bias[:, :5] = float("-inf")
    bias[:, 5] = 2.0
    got = {}
    with torch.no_grad(), capture(be, lambda l, a: got.__setitem__(l, a.clone())):
        be.forward_intervened(x, key_bias=bias, layers=[1])
    assert (got[1][..., T : T + 5] == 0).all() and (got[0][..., T : T + 5] > 0).all()
    with torch.no_grad(), capture(be, lambda l, a: got.__setitem__(l, a.clone())):
        be.forward(x)
    # layer 0 saw no bias: its attention equals the plain model's
    ref0 = got[0]
    with torch.no_grad(), capture(be, lambda l, a: got.__setitem__(l, a.clone())):
        be.forward_intervened(x, key_bias=bias, layers=[1])
    torch.testing.assert_close(got[0], ref0)


# -- prompting end to end ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prompt_setup(tmp_path_factory):
    """A random tiny native model, a labelled folder with a sidecar, and a discovery output to flag words."""
    from siftlens.benchmarks.spurious_cifar import glyph
    from siftlens.shortcuts import DiscoveryConfig, discover

    root = tmp_path_factory.mktemp("prompt")
    torch.manual_seed(0)
    model = ViT(ViTConfig(img_size=(32, 32), patch_size=4, dim=32, depth=2, heads=2, num_classes=2,
                          class_names=["a", "b"]))
    save_vit(model.eval(), root / "model")
    rng = np.random.default_rng(0)
    recs = {}
    for c, g, other in (("a", "checker", "ring"), ("b", "ring", "checker")):
        (root / "data" / c).mkdir(parents=True)
        for i in range(8):
            img = np.clip(rng.integers(90, 160, 3)[None, None] + rng.integers(-8, 9, (32, 32, 3)), 0, 255)
            img = img.astype(np.uint8)
            x0, y0 = (int(v) for v in rng.integers(0, 25, 2))
            mk = c if i % 2 == 0 else ("b" if c == "a" else "a")
            img[y0 : y0 + 8, x0 : x0 + 8] = glyph(g if mk == c else other)
            Image.fromarray(img).save(root / "data" / c / f"{i}.png")
            recs[f"{c}/{i}.png"] = {"label": c, "marker": mk, "box": [x0, y0, x0 + 8, y0 + 8], "aligned": mk == c}
    (root / "data" / "markers.json").write_text(json.dumps({"classes": ["a", "b"], "images": recs}))
    res = discover(str(root / "model"), str(root / "data"), DiscoveryConfig(vocab_size=8, min_images=1, causal_top=2,
                                                                           causal_images=2, gallery=0),
                   progress=False)
    res.save(root / "disc")
    return root


@pytest.mark.parametrize("policy", ["none", "drop", "keep-top", "bias"])
def test_prompt_bookkeeping(prompt_setup, policy, monkeypatch):
    root = prompt_setup
    # the random model relies on nothing, so its discovery flags nothing: the bookkeeping is tested with the ranked
    # candidates (--no-flagged-only), which always flag some patches
    cfg = build(PromptConfig, dict(policy=policy, candidates=str(root / "disc") if policy != "none" else None,
                                   top_words=2, batch_size=5, q=0.25, flagged_only=False))
    kept = []  # what the model really received: the patch tokens kept, per image of every keep_idx forward
    real = ViT.forward_features

    def spy(self, x, keep_idx=None, *a, **kw):
        if keep_idx is not None:
            kept.extend([keep_idx.shape[1]] * len(x))
        return real(self, x, keep_idx, *a, **kw)

    monkeypatch.setattr(ViT, "forward_features", spy)
    res = prompt(str(root / "model"), str(root / "data"), cfg, progress=False)
    df = res.images
    assert len(df) == 16 and set(df["group"]) == {"a|aligned", "a|conflicting", "b|aligned", "b|conflicting"}
    assert res.before["overall"] == pytest.approx(df["correct_before"].mean())
    assert res.before["groups"]["a|aligned"]["n"] == 4
    worst = min(g["accuracy"] for g in res.after["groups"].values())
    assert res.after["worst_group"]["accuracy"] == worst
    changed = ~np.isclose(df["p_true_after"], df["p_true_before"], rtol=0, atol=1e-6)
    if policy == "none":
        assert (df["pred_before"] == df["pred_after"]).all() and not changed.any()
    if policy == "bias":  # a finite bias on the keys moves every image's probabilities, and removes nothing
        assert changed.all() and (df["removed_patches"] == 0).all()
    if policy in ("drop", "keep-top"):
        # the bookkeeping counts what the model was really given (one kept-token count per image per forward)
        assert sorted(kept) == sorted((64 - df["removed_patches"]).tolist())
        assert (changed == (df["removed_patches"] > 0)).all()  # an image changes exactly when tokens go
    if policy == "drop":
        assert (df["flagged_patches"] > 0).any() and (df["removed_patches"] == df["flagged_patches"]).all()
    if policy == "keep-top":
        assert (df["removed_patches"] == 64 - 16).all()
    # a plain forward gives the "before" predictions
    from siftlens.models import load_backend

    be = load_backend(str(root / "model"))
    from siftlens.data import ImageSource

    src = ImageSource(str(root / "data"))
    px = torch.from_numpy(np.stack([be.preprocess(src.load(i)) for i in range(len(src))]))
    with torch.no_grad():
        pred = be.forward(be.normalize(px)).argmax(1).numpy()
    assert dict(zip(src.names, pred.tolist(), strict=True)) == dict(zip(df["name"], df["pred_before"], strict=True))


def test_prompt_config_errors_and_cli(prompt_setup, tmp_path):
    root = prompt_setup
    with pytest.raises(ConfigError, match="--candidates"):
        PromptConfig(policy="drop").validate()
    with pytest.raises(ConfigError, match="--policy"):
        PromptConfig(policy="erase").validate()
    # the response scheme runs end to end, and its weights differ from the count scheme's
    cfgs = {s: build(PromptConfig, dict(policy="bias", scheme=s, batch_size=8, beta=4.0))
            for s in ("count", "response")}
    got = {s: prompt(str(root / "model"), str(root / "data"), c, progress=False) for s, c in cfgs.items()}
    assert got["response"].summary["config"]["scheme"] == "response"
    assert not np.allclose(got["response"].images["p_true_after"], got["count"].images["p_true_after"])
    r = subprocess.run([sys.executable, "-m", "siftlens.cli", "prompt", "--model", str(root / "model"), "--images",
                        str(root / "data"), "--out", str(tmp_path / "p"), "--policy", "drop", "--candidates",
                        str(root / "disc" / "discovery.json"), "--top-words", "2", "--extent", "footprint",
                        "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "accuracy     before" in r.stdout and "worst group" in r.stdout
    s = json.loads((tmp_path / "p" / "prompting.json").read_text())
    assert s["kind"] == "siftlens-prompting" and s["after"]["n"] == 16 and s["groups_from"].endswith("markers.json")
    r = subprocess.run([sys.executable, "-m", "siftlens.cli", "prompt", "--model", str(root / "model"), "--images",
                        str(root / "data"), "--out", str(tmp_path / "q"), "--candidates", str(tmp_path / "nope.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_hf_dinov2_registers_drop_and_bias_match_a_manual_forward():
    """Registers (T = 3), mean-pooled head, attention_mask passed by keyword: drop and per-layer bias."""
    transformers = pytest.importorskip("transformers")
    from siftlens.models.hf import HFBackend

    torch.manual_seed(0)
    cfg = transformers.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 mlp_ratio=2, image_size=32, patch_size=8, num_labels=3,
                                                 num_register_tokens=2, attn_implementation="eager")
    be = HFBackend(transformers.Dinov2WithRegistersForImageClassification(cfg).eval())
    T, N = be.num_prefix_tokens, be.num_patches
    assert T == 3
    x = torch.randn(B, 3, 32, 32)
    keep = random_keep(N, 6, seed=4)
    bias = torch.randn(B, N) * 2

    def manual(keep=None, bias=None, layers=()):
        base = be.model.base_model
        h = base.embeddings(x)
        if keep is not None:
            h = torch.cat([h[:, :T], torch.gather(h[:, T:], 1, keep[..., None].expand(-1, -1, h.shape[-1]))], 1)
        full = None
        if bias is not None:
            kb = bias if keep is None else torch.gather(bias, 1, keep)
            full = torch.cat([torch.zeros(B, T), kb], 1)[:, None, None]
        for i, layer in enumerate(base.encoder.layer):
            h = layer(h, full if i in layers else None)
        h = base.layernorm(h)
        return be.model.classifier(torch.cat([h[:, 0], h[:, T:].mean(1)], 1))

    with torch.no_grad():
        torch.testing.assert_close(be.forward_intervened(x), be.forward(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(be.forward_intervened(x, keep_idx=keep), manual(keep=keep), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(be.forward_intervened(x, key_bias=bias, layers=[0]), manual(bias=bias, layers=(0,)),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(be.forward_intervened(x, keep_idx=keep, key_bias=bias),
                                   manual(keep=keep, bias=bias, layers=(0, 1)), atol=1e-5, rtol=1e-5)


def test_one_keypoint_dataset_one_skip_rule(tiny_vit, tmp_path):
    """The analysis and the shortcut commands read images through the one KeypointDataset: same skip rule (an
    image smaller than one patch is skipped, with its reason), same keypoints; the shortcut commands add
    descriptors, the analysis its weight maps."""
    from siftlens.analysis import AnalysisConfig
    from siftlens.data import ImageSource
    from siftlens.keypoints import SiftParams
    from siftlens.loading import KeypointDataset

    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "a" / "big.png")
    Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(tmp_path / "a" / "tiny.png")
    src, be, sift = ImageSource(str(tmp_path)), NativeBackend(tiny_vit), SiftParams(upsample=2.0)
    shortcut = KeypointDataset(src, be, None, sift, descriptors=True)
    analysis = KeypointDataset(src, be, AnalysisConfig(), sift)
    big, tiny = src.names.index("a/big.png"), src.names.index("a/tiny.png")
    assert "smaller than one 8-pixel patch" in shortcut[tiny]["skip"]
    assert analysis[tiny]["skip"] == shortcut[tiny]["skip"]
    s, a = shortcut[big], analysis[big]
    np.testing.assert_array_equal(s["xy"], a["xy"])
    assert s["desc"].shape == (len(s["xy"]), 128) and s["desc"].dtype == np.uint8 and "weights" not in s
    assert a["weights"].shape == (12,) and "desc" not in a
