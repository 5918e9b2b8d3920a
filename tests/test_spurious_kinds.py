"""Discovery beyond SIFT-crisp shortcuts: the texture-matched causal control, region candidates, the patch rule
of the evaluation, prompting with regions and the label-free repair (one tiny ViT trained on planted data), and
discovery that can say "no shortcut found" (a control model trained with the same markers placed independently of
the class)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from siftlens.benchmarks.spurious_cifar import glyph
from siftlens.benchmarks.spurious_cifar_eval import evaluate_patches
from siftlens.data import ImageSource
from siftlens.errors import ConfigError
from siftlens.models import load_backend
from siftlens.options import build
from siftlens.shortcuts import DiscoveryConfig, PromptConfig, discover
from siftlens.shortcuts.discovery.causal import matched_control, paste_patches, plan_jobs
from siftlens.shortcuts.discovery.features import Features
from siftlens.shortcuts.discovery.vocabulary import load_vocabulary
from siftlens.shortcuts.dropping import network_backend
from siftlens.shortcuts.groups import read_sidecar
from siftlens.shortcuts.retraining.head import RepairConfig, group_weights, repair

COLOURS = {"ant": (230, 40, 40), "bee": (40, 210, 40), "cow": (40, 40, 230)}


def _repair_config(**options) -> RepairConfig:
    return build(RepairConfig, options)


def _prompt_config(**options) -> PromptConfig:
    return build(PromptConfig, options)


def _repair(model: str, images: str, out, config: RepairConfig) -> dict:
    """repair, then save into ``out``; returns the record (repair.json)."""
    res = repair(model, images, config, progress=False)
    res.save(out)
    return res.record


def _image(rng, colour, texture: bool = True):
    """Noise, a flat colour square (the class marker: weak texture) and a checker (texture in every class)."""
    base = rng.integers(90, 160, 3)
    img = np.clip(base[None, None] + rng.integers(-10, 11, (32, 32, 3)), 0, 255).astype(np.uint8)
    mx, my = int(rng.integers(0, 9)), int(rng.integers(0, 25))  # marker in the left half
    img[my : my + 8, mx : mx + 8] = colour
    tx, ty = int(rng.integers(17, 25)), int(rng.integers(0, 25))  # texture in the right half
    if texture:
        img[ty : ty + 8, tx : tx + 8] = glyph("checker")
    return img, [mx, my, mx + 8, my + 8], [tx, ty, tx + 8, ty + 8]


def _write(folder, rng, n, conflicting=False):
    recs, tex = {}, {}
    names = list(COLOURS)
    for ci, c in enumerate(names):
        (folder / c).mkdir(parents=True)
        for i in range(n):
            m = names[(ci + 1 + i % 2) % 3] if conflicting else c
            img, box, tbox = _image(rng, COLOURS[m])
            Image.fromarray(img).save(folder / c / f"{i:03d}.png")
            recs[f"{c}/{i:03d}.png"] = {"label": c, "marker": m, "box": box, "aligned": m == c}
            tex[f"{c}/{i:03d}.png"] = tbox
    (folder / "markers.json").write_text(json.dumps({"classes": names, "images": recs}))
    return tex


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    from siftlens.training import TrainConfig, train

    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    tex = _write(root / "train", rng, 40)
    _write(root / "conflicting", rng, 8, conflicting=True)
    tc = build(TrainConfig, dict(img_size=32, patch_size=4, dim=32, depth=2, heads=2, epochs=16, batch_size=20,
                                 lr=3e-3, warmup_epochs=0.5, pad=0, seed=0))
    train(None, str(root / "train"), tc, progress=False, out=root / "run")
    res = discover(str(root / "run" / "model"), str(root / "train"), _discovery_config(causal_top=60), progress=False)
    return root, res, tex


def _discovery_config(**options) -> DiscoveryConfig:
    # 16 images per checked candidate: the sign-flip test's smallest p is 2^-n, and 8 images (0.004) cannot survive
    # Benjamini-Hochberg over the ~100 candidates the planted fixture tests
    return build(DiscoveryConfig, dict(vocab=24, regions=16, batch_size=60, causal_images=16, gallery=2, top=8,
                                       **options))


LEVELS = {"ant": 70, "bee": 128, "cow": 186}


def _write_control(folder, rng, n):
    """The control's data: the class is the image's grey level (a diffuse core feature, in every patch); each class
    carries each colour marker in a third of its images (rho = 1/3: the marker is independent of the class)."""
    names, recs = list(COLOURS), {}
    for c in names:
        (folder / c).mkdir(parents=True)
        for i in range(n):
            m = names[i % 3]
            base = LEVELS[c] + rng.integers(-12, 13)
            img = np.clip(base + rng.integers(-10, 11, (32, 32, 3)), 0, 255).astype(np.uint8)
            mx, my = int(rng.integers(0, 25)), int(rng.integers(0, 25))
            img[my : my + 8, mx : mx + 8] = COLOURS[m]
            Image.fromarray(img).save(folder / c / f"{i:03d}.png")
            recs[f"{c}/{i:03d}.png"] = {"label": c, "marker": m, "box": [mx, my, mx + 8, my + 8], "aligned": m == c}
    (folder / "markers.json").write_text(json.dumps({"classes": names, "images": recs}))


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    """A tiny ViT that relies on no marker (randomly initialised, seeded) on images whose markers are placed
    independently of the class. Discovery runs with the planted fixture's power (16 images per checked candidate).

    (Tiny models *trained* on such images, with the class in the grey level or in faint stripes, never got a marker
    flagged either, but they do get their core feature flagged: the region word of the class's background, which
    covers most patches, so occluding it is a real fall of p(class). That is a true finding, not a shortcut, and
    it would make `prompt --policy drop` remove core patches, so it is not the "no shortcut" case tested here.)"""
    from siftlens.models.vit import ViT, ViTConfig, save_vit

    root = tmp_path_factory.mktemp("control")
    _write_control(root / "train", np.random.default_rng(1), 40)
    torch.manual_seed(0)
    model = ViT(ViTConfig(img_size=(32, 32), patch_size=4, dim=32, depth=2, heads=2, num_classes=3,
                          class_names=list(COLOURS)))
    save_vit(model.eval(), root / "model")
    res = discover(str(root / "model"), str(root / "train"), _discovery_config(causal_top=10), progress=False)
    return root, res


def test_matched_control_takes_patches_with_the_same_keypoint_counts():
    counts = np.array([5, 3, 0, 0, 5, 0, 3, 1, 0, 0], float)
    flag = np.zeros(10, bool)
    flag[[0, 1]] = True
    for seed in range(5):
        ctrl = matched_control(flag, counts, np.random.default_rng(seed))
        assert sorted(counts[ctrl]) == [3, 5] and not (ctrl & flag).any()
    rand = [matched_control(flag, counts, np.random.default_rng(s), "random") for s in range(20)]
    assert any(sorted(counts[r]) != [3, 5] for r in rand) and all(r.sum() == 2 and not (r & flag).any() for r in rand)
    assert not matched_control(np.zeros(10, bool), counts, np.random.default_rng(0)).any()


def _one_image_features(K: int) -> Features:
    """One 16 x 16 image (a 4 x 4 grid of 4-pixel patches) predicted as class 0: two keypoints of SIFT word 3 near
    the top-left corner (size 8 and 2) and region word K + 1 on the last patch."""
    xy = np.array([[5.5, 5.5], [13.5, 1.5], [13.5, 13.5]], np.float32)
    return Features(
        names=["a"], indices=np.array([0]), labels=np.array([0]), preds=np.array([0]), probs=np.array([[0.9, 0.1]]),
        attention=np.full((1, 16), 1 / 16), kp_image=np.zeros(3, np.int64), kp_xy=xy,
        kp_size=np.array([8.0, 2.0, 4.0], np.float32), kp_patch=np.array([5, 3, 15]),
        kp_desc=np.zeros((2, 128), np.uint8), words=np.array([3, 3, K + 1]))


@pytest.mark.parametrize("extent", ["center", "footprint"])
def test_causal_check_occludes_a_sift_word_by_its_extent_and_a_region_word_by_its_patch(extent):
    K = 8
    f = _one_image_features(K)
    cands = pd.DataFrame({"class_index": [0, 0], "word": [3, K + 1]})
    cfg = build(DiscoveryConfig, dict(vocab=K, causal_extent=extent))
    counts = np.arange(16, dtype=float)  # every patch a different keypoint count: one control per patch
    sift, region = plan_jobs(f, cands, cfg, counts[None], (4, (4, 4)))
    want = np.zeros((4, 4), bool)
    if extent == "center":
        want[1, 1] = want[0, 3] = True  # the patches holding the two centres
    else:
        want[0:3, 0:3] = True  # the size-8 square [1.5, 9.5] touches patch columns and rows 0..2
        want[0, 3] = True  # the size-2 square stays inside its patch
    np.testing.assert_array_equal(sift.word.reshape(4, 4), want)
    free = 16 - want.sum()  # the control takes as many other patches as there are, at most the word's count
    assert sift.control.sum() == min(want.sum(), free) and not (sift.control & sift.word).any()
    assert np.flatnonzero(region.word).tolist() == [15] and region.control.sum() == 1


def test_an_unknown_causal_extent_is_a_clear_error():
    with pytest.raises(ConfigError, match="--causal-extent must be one of center, footprint"):
        _discovery_config(causal_extent="box").validate()


def test_paste_patches_copies_exactly_the_flagged_patches():
    rng = np.random.default_rng(0)
    dst, src = (rng.integers(0, 256, (2, 8, 12, 3), dtype=np.uint8) for _ in range(2))
    flags = np.zeros((2, 6), bool)  # a 2 x 3 grid of 4-pixel patches
    flags[0, [0, 5]] = True
    out = paste_patches(dst, src, flags, 4, (2, 3))
    want = dst.copy()
    want[0, 0:4, 0:4], want[0, 4:8, 8:12] = src[0, 0:4, 0:4], src[0, 4:8, 8:12]
    np.testing.assert_array_equal(out, want)
    assert (dst != out).any() and not np.shares_memory(out, dst)  # dst itself is untouched


def test_insertion_raises_the_class_with_its_marker_and_not_with_texture(colours):
    """The insertion test on the planted model: a used marker pasted into another class's image raises p(class)
    far more than its matched control patches; the checker in every class raises it no more than its control;
    with causal_test=both a flag needs both tests, so every flag of ``both`` is a flag of ``occlude`` and of
    ``insert``."""
    from siftlens.shortcuts.discovery.decision import decide

    root, _, tex = colours
    res = discover(str(root / "run" / "model"), str(root / "train"), _discovery_config(causal_top=10,
                                                                                      causal_test="both"),
                   progress=False)
    cand = res.candidates
    tested = cand[cand["insert_p"].notna()]
    assert len(tested) == int(cand["p"].notna().sum()) >= 20  # every checked candidate got both tests
    used = {c for c, r in res.top.items() if r and (r[0]["causal"] or 0) > 0.1}
    assert len(used) >= 2, res.top
    for c in used:
        top = cand[(cand["class"] == c) & (cand["rank"] == 1)].iloc[0]
        assert top["insert_effect"] > 0.1 and top["insert_p"] < 1e-3, top
        assert top["insert_rise"] > top["insert_control_rise"]
    t = tested[tested["word"].isin(_texture_words(res, tex))]
    # never above the minimum effect (below zero where the matched control patches happen to hold the marker)
    assert len(t) >= 3 and t["insert_effect"].max() < 0.05, t[["class", "word", "insert_effect"]]
    assert res.decision["causal_test"] == "both" and "both paired" in res.decision["test"]
    both = cand["flagged"].to_numpy()
    occl = decide(cand.copy(), 0.05, 0.05, "occlude")["flagged"].to_numpy()
    ins = decide(cand.copy(), 0.05, 0.05, "insert")["flagged"].to_numpy()
    assert both.any() and not (both & ~(occl & ins)).any()


def test_insertion_without_recipients_tests_nothing_and_flags_nothing(control):
    """The control's untrained model predicts one class for every image: no image of another class can receive
    the patches, so the insertion test has no data; its columns stay empty and nothing is flagged."""
    root, _ = control
    res = discover(str(root / "model"), str(root / "train"), _discovery_config(causal_top=10, causal_test="insert"),
                   progress=False)
    assert len(np.unique(res.features.preds)) == 1
    assert res.candidates["p"].notna().sum() >= 10 and res.candidates["insert_p"].isna().all()
    assert all(res.verdict(c) == "no shortcut found" for c in res.class_names), res.decision


@pytest.fixture(scope="module")
def mixed(colours):
    """The planted training images plus their conflicting ones (8 per class, carrying another class's marker),
    labelled: the data a shortcut model is fine-tuned on, where a few images of each class carry another's marker."""
    import shutil

    root = colours[0]
    mixed = root / "mixed"
    if not mixed.exists():
        shutil.copytree(root / "train", mixed)
        for p in (root / "conflicting").glob("*/*.png"):
            shutil.copy(p, mixed / p.parent.name / f"x{p.name}")
        (mixed / "markers.json").unlink()  # it lists the training images only
    return mixed


@pytest.fixture(scope="module")
def trained_control(tmp_path_factory):
    """A tiny ViT *trained* on the control's data (the class in the grey level, every marker in every class): it
    uses no marker, but occlusion flags its core feature (the region word of a class's background)."""
    root = tmp_path_factory.mktemp("trained-control")
    _write_control(root / "train", np.random.default_rng(1), 40)
    _train_control(root, seed=0, name="run")
    return root


def test_the_cross_class_test_keeps_the_planted_markers(colours, mixed):
    """On the planted model, the markers occlusion flags pull the conflicting images of the other classes to their
    class: occluding them there lowers p(class) far more than the matched control, so the cross-class test keeps
    them; every flag of ``cross`` is a flag of occlusion alone, and discovery.json shows the confirmation."""
    from siftlens.shortcuts.discovery.decision import claim_text, decide

    root = colours[0]
    res = discover(str(root / "run" / "model"), str(mixed), _discovery_config(causal_top=10, causal_test="cross"),
                   progress=False)
    cand = res.candidates
    flagged = cand[cand["flagged"].astype(bool)]
    assert flagged["class"].nunique() >= 2, res.decision
    assert (flagged["cross_fall"] > 0.1).all() and (flagged["cross_effect"] > 0.1).all(), flagged
    occl = decide(cand.copy(), 0.05, 0.05, "occlude")["flagged"].to_numpy()
    assert not (cand["flagged"].to_numpy() & ~occl).any()
    assert res.decision["causal_test"] == "cross" and "labelled as another class" in res.decision["test"]
    shown = [r for c in res.class_names for r in res.to_json()["decision"]["classes"][c]["candidates"]]
    assert len(shown) == len(flagged) and all(r["cross_effect"] > 0.1 and r["cross_q"] < 0.05 for r in shown)
    assert "other classes 0." in claim_text(shown[0], "cross")


def test_the_cross_class_test_drops_a_core_feature_that_occlusion_flags(trained_control):
    """The trained control's background region word lowers p(class) when occluded in its own class (occlusion
    flags it), but it also lies in the other classes' images, and there occluding it does not lower p(class):
    tested on that data, not flagged, so the classes read "no shortcut found"."""
    from siftlens.shortcuts.discovery.decision import decide

    root = trained_control
    model, images = str(root / "run" / "model"), str(root / "train")
    occl = discover(model, images, _discovery_config(causal_top=10), progress=False)
    core = occl.candidates[occl.candidates["flagged"].astype(bool)]
    assert len(core), occl.decision
    cross = discover(model, images, _discovery_config(causal_top=10, causal_test="cross"), progress=False)
    # the occlusion test itself is the same (its random stream is untouched; batches differ in the last bits)
    np.testing.assert_allclose(cross.candidates["effect"], occl.candidates["effect"], atol=1e-6)
    assert (decide(cross.candidates.copy())["flagged"] == occl.candidates["flagged"]).all()
    c = cross.candidates.set_index(["class", "word"]).loc[list(zip(core["class"], core["word"], strict=True))]
    assert c["cross_p"].notna().all() and (c["cross_effect"] < 0.05).all(), c
    assert not cross.candidates["flagged"].any()
    assert all(cross.verdict(k) == "no shortcut found" for k in cross.class_names), cross.decision


@pytest.mark.parametrize("select", ["random", "pulled"])
def test_cross_class_jobs_take_other_classes_images_holding_the_word(select):
    """Six 16 x 16 images, each with one keypoint of word 3; images 0-1 labelled as the candidate's class 0, 2-5 as
    class 1 (3 predicted as class 0). The cross-class jobs take only images 2-5 (another class's label, holding the
    word); with 2 images per candidate, ``pulled`` takes the two with the highest p(class 0)."""
    p0 = np.array([0.9, 0.8, 0.1, 0.7, 0.3, 0.6])
    f = Features(names=list("abcdef"), indices=np.arange(6), labels=np.array([0, 0, 1, 1, 1, 1]),
                 preds=np.array([0, 0, 1, 0, 1, 1]), probs=np.stack([p0, 1 - p0], 1),
                 attention=np.full((6, 16), 1 / 16),
                 kp_image=np.arange(6), kp_xy=np.full((6, 2), 5.5, np.float32), kp_size=np.full(6, 2.0, np.float32),
                 kp_patch=np.full(6, 5), kp_desc=np.zeros((6, 128), np.uint8), words=np.full(6, 3))
    cands = pd.DataFrame({"class_index": [0], "word": [3]})
    cfg = build(DiscoveryConfig, dict(vocab=8, causal_images=2, causal_test="cross", cross_select=select))
    jobs = plan_jobs(f, cands, cfg, np.arange(16, dtype=float)[None].repeat(6, 0), (4, (4, 4)))
    own, cross = [j.image for j in jobs if not j.cross], [j.image for j in jobs if j.cross]
    assert len(own) == 2 and set(own) <= {0, 1, 3}  # occlusion: the images *predicted* as class 0
    assert len(cross) == 2 and set(cross) <= {2, 3, 4, 5}
    if select == "pulled":
        assert sorted(cross) == [3, 5]  # p(class 0) 0.7 and 0.6, the highest among the other classes' images
    assert all(np.flatnonzero(j.word).tolist() == [5] for j in jobs)


def test_the_cross_class_test_needs_labels(trained_control, tmp_path):
    import shutil

    for p in sorted((trained_control / "train").glob("*/*.png"))[::10]:
        shutil.copy(p, tmp_path / f"{p.parent.name}-{p.name}")
    with pytest.raises(ConfigError, match="--causal-test cross needs labelled images"):
        discover(str(trained_control / "run" / "model"), str(tmp_path), _discovery_config(causal_test="cross"),
                 progress=False)


def _train_control(root, seed: int, name: str):
    """A tiny ViT trained (with ``seed``) on the control's data in ``root / "train"``; its model folder
    ``root / name / "model"``."""
    from siftlens.training import TrainConfig, train

    tc = build(TrainConfig, dict(img_size=32, patch_size=4, dim=32, depth=2, heads=2, epochs=16, batch_size=20,
                                 lr=3e-3, warmup_epochs=0.5, pad=0, seed=seed))
    train(None, str(root / "train"), tc, progress=False, out=root / name)
    return root / name / "model"


def test_the_reference_test_drops_a_feature_every_model_of_the_task_uses(trained_control):
    """The trained control's background region word lowers p(class) when occluded (occlusion flags it). A second
    model trained on the same clean data (another seed) leans on it as much: the excess over that reference is
    about zero, so nothing is flagged, and the occlusion columns are those of occlusion alone."""
    from siftlens.shortcuts.discovery.decision import decide

    root = trained_control
    model, images = str(root / "run" / "model"), str(root / "train")
    reference = str(_train_control(root, seed=1, name="run-seed1"))
    occl = discover(model, images, _discovery_config(causal_top=10), progress=False)
    core = occl.candidates[occl.candidates["flagged"].astype(bool)]
    assert len(core), occl.decision
    ref = discover(model, images, _discovery_config(causal_top=10, causal_test="reference", reference=reference),
                   progress=False)
    np.testing.assert_allclose(ref.candidates["effect"], occl.candidates["effect"], atol=1e-6)
    assert (decide(ref.candidates.copy())["flagged"] == occl.candidates["flagged"]).all()
    c = ref.candidates.set_index(["class", "word"]).loc[list(zip(core["class"], core["word"], strict=True))]
    assert (c["reference_effect"] > 0.05).all(), c  # the reference uses the word too
    assert (c["excess"] < 0.05).all(), c
    assert not ref.candidates["flagged"].any()
    assert all(ref.verdict(k) == "no shortcut found" for k in ref.class_names), ref.decision
    assert ref.decision["causal_test"] == "reference" and "reference model" in ref.decision["test"]


def test_the_reference_test_keeps_the_planted_markers_against_a_clean_reference(colours, trained_control):
    """The planted model's markers against a reference that never relied on them (the trained control): every
    marker occlusion flags keeps an excess above 0.1 over the reference and stays flagged, with the claim naming
    the excess."""
    from siftlens.shortcuts.discovery.decision import claim_text, decide

    root = colours[0]
    cfg = _discovery_config(causal_top=10, causal_test="reference", reference=str(trained_control / "run" / "model"))
    res = discover(str(root / "run" / "model"), str(root / "train"), cfg, progress=False)
    cand = res.candidates
    occl = decide(cand.copy(), 0.05, 0.05, "occlude")
    flagged = cand[cand["flagged"].astype(bool)]
    assert flagged["class"].nunique() >= 2, res.decision
    assert (flagged.index == occl.index[occl["flagged"]]).all()  # every occlusion flag is kept
    assert (flagged["excess"] > 0.1).all() and (flagged["excess"] < flagged["effect"] + 0.05).all(), flagged
    shown = [r for c in res.class_names for r in res.to_json()["decision"]["classes"][c]["candidates"]]
    assert len(shown) == len(flagged) and "beyond the reference 0." in claim_text(shown[0], "reference")


def test_the_reference_must_have_the_models_classes_and_grid(colours, tmp_path):
    from siftlens.models.vit import ViT, ViTConfig, save_vit

    root = colours[0]
    for name, cfg in (("classes", dict(patch_size=4, class_names=["cat", "dog", "eel"])),
                      ("grid", dict(patch_size=8, class_names=list(COLOURS)))):
        save_vit(ViT(ViTConfig(img_size=(32, 32), dim=32, depth=1, heads=2, num_classes=3, **cfg)), tmp_path / name)
    with pytest.raises(ConfigError, match="has classes"):
        discover(str(root / "run" / "model"), str(root / "train"),
                 _discovery_config(causal_test="reference", reference=str(tmp_path / "classes")), progress=False)
    with pytest.raises(ConfigError, match="in patches of 8, not the model's"):
        discover(str(root / "run" / "model"), str(root / "train"),
                 _discovery_config(causal_test="reference", reference=str(tmp_path / "grid")), progress=False)
    with pytest.raises(ConfigError, match="needs --reference"):
        _discovery_config(causal_test="reference").validate()


def _texture_words(res, tex):
    """Words (SIFT or region) whose keypoints lie at least half inside the checker planted in every image."""
    f = res.features
    boxes = np.array([tex[n] for n in f.names], float)[f.kp_image]
    x, y = f.kp_xy[:, 0], f.kp_xy[:, 1]
    inside = (x >= boxes[:, 0]) & (x < boxes[:, 2]) & (y >= boxes[:, 1]) & (y < boxes[:, 3])
    K = int(f.words.max()) + 1
    share = np.bincount(f.words, inside.astype(float), K) / np.maximum(np.bincount(f.words, minlength=K), 1)
    return set(np.flatnonzero(share >= 0.5).tolist())


def test_texture_in_every_class_scores_near_zero(colours):
    _, res, tex = colours
    cand = res.candidates
    words = _texture_words(res, tex)
    assert words
    t = cand[cand["word"].isin(words) & cand["causal"].notna()]
    assert len(t) >= 3, "the texture's words must have been checked by occlusion"
    assert t["causal"].abs().mean() < 0.05, t[["class", "word", "causal", "drop_fall", "control_fall"]]
    bad = t[t["score"] >= 0.01 * cand["score"].max()]  # the planted markers score about 100 times higher
    assert bad.empty, bad[["class", "word", "source", "score", "share", "assoc", "causal"]]


def test_regions_find_a_weakly_textured_marker(colours):
    root, res, _ = colours
    assert {"sift", "region"} <= set(res.candidates["source"])
    ev = evaluate_patches(res, read_sidecar(root / "train" / "markers.json"), 4, (8, 8))
    # with three classes the model may learn one of them as "neither marker": it then depends on nothing there
    used = {c for c, r in res.top.items() if r and (r[0]["causal"] or 0) > 0.1}
    assert len(used) >= 2, res.top
    assert all(ev["ranks"][c] == 1 for c in used), (ev, res.top)
    assert all(res.top[c][0]["source"] == "region" or ev["on_marker"][c][0] >= 0.5 for c in used)
    first = ev["flagged_first_on_marker"]
    assert all((first[c] is None) == (not res.flagged(c)) for c in res.top), (first, res.decision)
    assert all(first[c] for c in used if res.flagged(c)), (first, ev)
    assert any(first[c] for c in used), first


def test_prompting_flags_region_candidates_on_the_marker(colours, tmp_path):
    from siftlens.shortcuts.prompting import prompt

    root, res, _ = colours
    res.save(tmp_path / "disc")
    vocab = load_vocabulary(tmp_path / "disc")
    assert vocab.regions is not None and vocab.regions.shape[0] == 16
    out = prompt(str(root / "run" / "model"), str(root / "conflicting"),
                 _prompt_config(policy="drop", candidates=str(tmp_path / "disc"), top_words=1, extent="footprint"),
                 progress=False)
    side = read_sidecar(root / "conflicting" / "markers.json")["images"]
    assert out.summary["interventions"]["mean_flagged_patches"] > 1
    assert out.after["overall"] > out.before["overall"]
    assert set(out.images["name"]) == set(side)


def test_group_weights_balance_cells():
    w, cells = group_weights(np.array([0, 0, 0, 1, 1, 1]), np.array([0, 0, 1, 0, 1, 1]))
    assert cells == {"0|0": 2, "0|1": 1, "1|0": 1, "1|1": 2}
    assert np.isclose(w.sum(), 6) and np.isclose(w[:2].sum(), w[2]) and np.isclose(w[3], w[4:].sum())


def test_repair_saves_a_normal_model_with_a_new_head(colours, tmp_path):
    root, res, _ = colours
    res.save(tmp_path / "disc")
    s = _repair(str(root / "run" / "model"), str(root / "train"), tmp_path / "rep",
               _repair_config(candidates=str(tmp_path / "disc"), top_words=1, iters=50))
    # two of the three markers are flagged (the model learnt the third class as "neither marker": no shortcut found),
    # so at least their two classes' images carry flags
    assert s["images"] == 120 and s["flagged_share"] > 0.6 and len(s["cells"]) >= 3
    old, new = load_backend(str(root / "run" / "model")), load_backend(str(tmp_path / "rep" / "model"))
    assert new.class_names == old.class_names
    assert not torch.equal(new.model.head.weight, old.model.head.weight)
    assert torch.equal(new.model.blocks[0].attn.qkv.weight, old.model.blocks[0].attn.qkv.weight)
    with pytest.raises(ConfigError, match="groups"):
        _repair_config(candidates="x", groups="labels").validate()
    r = subprocess.run([sys.executable, "-m", "siftlens.cli", "repair", "--model", str(root / "run" / "model"),
                        "--images", str(root / "train"), "--candidates", str(tmp_path / "nothing.json"), "--out",
                        str(tmp_path / "r2")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_repair_with_mean_pooling_saves_a_model_that_pools_like_its_head(colours, tmp_path):
    from siftlens.shortcuts.retraining.head import pooled_features

    root, res, _ = colours
    res.save(tmp_path / "disc")
    s = _repair(str(root / "run" / "model"), str(root / "train"), tmp_path / "rep",
               _repair_config(candidates=str(tmp_path / "disc"), top_words=1, iters=50, pool="mean", l2=0.1))
    assert s["config"]["pool"] == "mean"
    # the repaired network (the folder's drop is tested in test_repair_artefact.py)
    old, new = load_backend(str(root / "run" / "model")), network_backend(load_backend(str(tmp_path / "rep" / "model")))
    assert old.model.cfg.pool == "cls" and new.model.cfg.pool == "mean"
    x = torch.randn(5, 3, 32, 32)
    drop = torch.zeros(5, 64, dtype=torch.bool)
    drop[:, :10] = True
    drop[0, :] = True  # every patch flagged: the image keeps them all
    with torch.inference_mode():
        tokens = old.model.forward_features(x)
        assert torch.allclose(pooled_features(old.model, x, torch.zeros(5, 64, dtype=torch.bool), "mean"),
                              tokens[:, 1:].mean(1), atol=1e-5)
        assert torch.allclose(pooled_features(old.model, x, drop[:0].new_zeros(5, 64), "cls"), tokens[:, 0], atol=1e-5)
        f = pooled_features(new.model, x, drop, "mean")
        keep = torch.arange(10, 64).expand(4, -1)
        assert torch.allclose(f[1:], new.model.forward_features(x[1:], keep)[:, 1:].mean(1), atol=1e-5)
        assert torch.allclose(f[0], pooled_features(new.model, x[:1], drop[:1] & False, "mean")[0], atol=1e-5)
        # the saved model's own forward pools the patch tokens, as its new head was fitted
        assert torch.allclose(new.model(x[1:], keep), new.model.head(f[1:]), atol=1e-5)
    with pytest.raises(ConfigError, match="pool"):
        _repair_config(candidates="x", pool="max").validate()


def test_repair_with_blocks_fine_tunes_only_the_last_block_and_saves_a_working_model(colours, tmp_path):
    from siftlens.shortcuts.discovery.features import model_labels
    from siftlens.shortcuts.retraining.head import dropped_features, fit_head

    root, res, _ = colours
    res.save(tmp_path / "disc")
    cfg = _repair_config(candidates=str(tmp_path / "disc"), top_words=1, iters=50, blocks=1, epochs=2, lr=1e-3)
    s = _repair(str(root / "run" / "model"), str(root / "train"), tmp_path / "rep", cfg)
    assert s["images"] == 120 and len(s["finetune"]["epoch_loss"]) == 2 and s["finetune"]["steps"] >= 2
    old, new = load_backend(str(root / "run" / "model")), network_backend(load_backend(str(tmp_path / "rep" / "model")))
    o, n = old.model.state_dict(), new.model.state_dict()
    changed = {k for k in o if not torch.equal(o[k], n[k])}
    assert {"head.weight", "norm.weight", "blocks.1.mlp.0.weight", "blocks.1.attn.qkv.weight"} <= changed
    assert all(k.startswith(("blocks.1.", "norm.", "head.")) for k in changed)  # block 0 and embeddings bit-identical
    cfg_json = json.loads((tmp_path / "rep" / "model" / "config.json").read_text())
    assert cfg_json["extra"]["repair"]["config"]["blocks"] == 1 and cfg_json["extra"]["repair"]["config"]["lr"] == 1e-3
    x = new.normalize(torch.from_numpy(np.stack([np.asarray(Image.open(root / "conflicting" / "ant" / "000.png"))])))
    with torch.no_grad():
        assert new.model(x).shape == (1, 3) and not torch.equal(new.model(x), old.model(x))
    # blocks=0 is the head-only repair: every block and the norm unchanged, the head the L-BFGS fit of the old head
    s0 = _repair(str(root / "run" / "model"), str(root / "train"), tmp_path / "rep0",
                _repair_config(candidates=str(tmp_path / "disc"), top_words=1, iters=50))
    assert "finetune" not in s0
    h0 = network_backend(load_backend(str(tmp_path / "rep0" / "model"))).model.state_dict()
    assert {k for k in o if not torch.equal(o[k], h0[k])} == {"head.weight", "head.bias"}
    src = ImageSource(str(root / "train"))
    d = dropped_features(old, src, load_vocabulary(str(tmp_path / "disc")), _repair_config(candidates="x", top_words=1),
                         progress=False)
    y = model_labels(src, old)[d["index"]]
    w, _ = group_weights(y, ((d["shortcut"] >= 0) & (d["shortcut"] != y)).astype(np.int64))
    head = fit_head(d["features"], torch.from_numpy(y), torch.from_numpy(w).float(), 3, 1e-3, 50, init=old.model.head)
    assert torch.equal(head.weight, h0["head.weight"])
    with pytest.raises(ConfigError, match="blocks"):
        _repair(str(root / "run" / "model"), str(root / "train"), tmp_path / "r3",
               _repair_config(candidates=str(tmp_path / "disc"), top_words=1, blocks=3))
    with pytest.raises(ConfigError, match="head-start"):
        _repair_config(candidates="x", blocks=1, head_start="new").validate()
    r = subprocess.run([sys.executable, "-m", "siftlens.cli", "repair", "--model", str(root / "run" / "model"),
                        "--images", str(root / "train"), "--candidates", str(tmp_path / "disc"), "--out",
                        str(tmp_path / "cli"), "--top-words", "1", "--blocks", "2", "--epochs", "1", "--lr", "2e-4",
                        "--head-start", "old", "--dilate", "1", "--no-progress"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "last 2 block(s)" in r.stdout, r.stderr
    c = json.loads((tmp_path / "cli" / "repair.json").read_text())["config"]
    assert (c["blocks"], c["epochs"], c["lr"], c["head_start"], c["dilate"]) == (2, 1, 2e-4, "old", 1)


def test_repair_dilate_grows_the_fitting_flags_by_whole_patches(colours, tmp_path):
    from siftlens.shortcuts.interventions import dilate
    from siftlens.shortcuts.retraining.head import flagged_batches

    root, res, _ = colours
    res.save(tmp_path / "disc")
    be, src, vocab = load_backend(str(root / "run" / "model")), ImageSource(str(root / "train")), load_vocabulary(
        str(tmp_path / "disc"))

    def flags(radius: int) -> torch.Tensor:
        cfg = _repair_config(candidates="x", top_words=1, dilate=radius, batch_size=50)
        return torch.cat([b["flag"] for b in flagged_batches(be, src, vocab, cfg, progress=False)])

    f0, f1 = flags(0), flags(1)
    grown = dilate(f0, tuple(be.grid_size), 1)
    assert f0.any(1).float().mean() > 0.6 and f1.sum() > 1.2 * f0.sum()  # two flagged markers of three
    assert torch.equal(f1, grown & ~grown.all(1, keepdim=True))  # every neighbour of a flagged patch, no more
    with pytest.raises(ConfigError, match="dilate"):
        _repair_config(candidates="x", dilate=-1).validate()


def test_prompt_and_repair_flag_the_same_patches_through_the_one_rule(colours, tmp_path, monkeypatch):
    """prompt --extent footprint and repair with the same --top-words, --score-ratio and --dilate drop the same
    patches of every image, SIFT and region words alike: both flag through shortcuts.flags.flag_patches (each
    command's call is recorded here), prompt with one global word set, repair with one set per class. A command
    that flagged by its own rule, or read the options differently, fails this test."""
    import siftlens.shortcuts.prompting as prompting
    import siftlens.shortcuts.retraining.head as head
    from siftlens.shortcuts import flags

    root, res, _ = colours
    res.save(tmp_path / "disc")
    model, images, disc = str(root / "run" / "model"), str(root / "conflicting"), str(tmp_path / "disc")
    seen: dict[str, dict[int, torch.Tensor]] = {"prompt": {}, "repair": {}}

    def recording(who: str):
        def flag_patches(backend, x, items, vocab, sets, extent="center", dilate_by=0):
            out = flags.flag_patches(backend, x, items, vocab, sets, extent, dilate_by)
            seen[who].update({it["index"]: p.clone() for it, p in zip(items, out.patches, strict=True)})
            return out
        return flag_patches

    monkeypatch.setattr(prompting, "flag_patches", recording("prompt"))
    monkeypatch.setattr(head, "flag_patches", recording("repair"))
    # every ranked word (--no-flagged-only), so that both kinds of word are flagged; the flagged-only sets go
    # through the same rule (test_the_planted_markers_are_flagged... and test_control_says_no_shortcut...)
    opts = {"top_words": 6, "score_ratio": 0.0, "dilate": 1, "flagged_only": False}
    out = prompting.prompt(model, images, _prompt_config(policy="drop", candidates=disc, extent="footprint", **opts),
                           progress=False)
    be, src, vocab = load_backend(model), ImageSource(images), load_vocabulary(disc)
    batches = list(head.flagged_batches(be, src, vocab, _repair_config(candidates=disc, **opts), progress=False))
    assert len(seen["prompt"]) == len(src) and seen["prompt"].keys() == seen["repair"].keys()
    for i, p in seen["prompt"].items():
        assert torch.equal(p, seen["repair"][i]), src.names[i]
    # each command used what it recorded: prompt's per-image counts, repair's dropped tokens
    rows = {n: k for k, n in enumerate(src.names)}
    assert out.images["flagged_patches"].tolist() == [int(seen["prompt"][rows[n]].sum()) for n in out.images["name"]]
    flag, index = torch.cat([b["flag"] for b in batches]), np.concatenate([b["index"] for b in batches])
    for f, i in zip(flag, index, strict=True):
        r = seen["repair"][int(i)]
        assert torch.equal(f, r & ~r.all())
    # SIFT and region words were flagged, and the per-class sets are the global set split by class
    sets = flags.word_sets(vocab, 6, 0.0, vocab.classes, flagged_only=False)
    assert flags.word_sets(vocab, 6, 0.0, flagged_only=False)[0] == set().union(*sets)
    assert {w < len(vocab.centers) for w in set().union(*sets)} == {True, False} and flag.float().mean() > 0
    # the test can tell the rules apart: prompt's default extent (center) flags other patches
    seen["prompt"].clear()
    prompting.prompt(model, images, _prompt_config(policy="drop", candidates=disc, **opts), progress=False)
    assert any(not torch.equal(p, seen["repair"][i]) for i, p in seen["prompt"].items())


# -- deciding: a flag is a tested claim ---------------------------------------------------------------------------
def test_the_planted_markers_are_flagged_and_the_unused_ones_are_not(colours, tmp_path):
    from siftlens.jobs.shortcuts import discovery_outcome

    root, res, tex = colours
    ev = evaluate_patches(res, read_sidecar(root / "train" / "markers.json"), 4, (8, 8))
    used = {c for c, r in res.top.items() if r and (r[0]["causal"] or 0) > 0.1}  # see the test above
    assert len(used) >= 2, res.top
    d = res.decision
    assert d["tested"] == int(res.candidates["p"].notna().sum()) > 60 and (d["alpha"], d["min_effect"]) == (0.05, 0.05)
    for c in res.class_names:
        fl = res.flagged(c)
        if c in used:  # the marker: rank 1 on the marker, flagged with q < 0.05 and its CI above the minimum
            assert res.verdict(c) == "shortcut found" and fl[0]["rank"] == 1 and ev["on_marker"][c][0] >= 0.5, fl
            assert fl[0]["q"] < 0.05 and fl[0]["effect_lo"] > 0.05 and fl[0]["causal_images"] == 16, fl
        else:  # the class the model learnt as "neither marker" depends on nothing
            assert res.verdict(c) == "no shortcut found" and not fl
    cand = res.candidates
    flagged = cand[cand["flagged"]]
    assert ((flagged["q"] < 0.05) & (flagged["effect"] >= 0.05)).all()
    assert not flagged["word"].isin(_texture_words(res, tex)).any()  # the checker in every class is never flagged
    # q is BH over every tested candidate of the run, across classes
    from siftlens.core.stats import bh_qvalues

    tested = cand[cand["p"].notna()]
    np.testing.assert_allclose(tested["q"], bh_qvalues(tested["p"].to_numpy()))
    paths = res.save(tmp_path / "disc")
    saved = json.loads(paths["json"].read_text())["decision"]["classes"]
    assert {c: v["verdict"] for c, v in saved.items()} == {c: res.verdict(c) for c in res.class_names}
    assert all(set(r) >= {"effect", "effect_lo", "effect_hi", "p", "q", "flagged"} for v in saved.values()
               for r in v["candidates"])
    csv = pd.read_csv(paths["candidates"])
    assert {"effect", "effect_lo", "effect_hi", "p", "q", "flagged"} <= set(csv.columns)
    text = discovery_outcome(res, paths)
    assert all(f"q {r['q']:.2g}" in text for c in used for r in res.flagged(c)[:1]), text


def test_control_says_no_shortcut_and_drop_costs_it_nothing(control, tmp_path):
    from siftlens.jobs.shortcuts import discovery_outcome
    from siftlens.shortcuts.discovery.report import discovery_html
    from siftlens.shortcuts.prompting import prompt

    root, res = control
    none = [c for c in res.class_names if res.verdict(c) == "no shortcut found"]
    tested = res.candidates[res.candidates["p"].notna()]
    assert len(tested) >= 10 and (tested["causal_images"] >= 8).any()  # the test had images to work with
    assert len(none) >= 2, res.decision
    paths = res.save(tmp_path / "disc")
    saved = json.loads(paths["json"].read_text())["decision"]["classes"]
    assert [c for c, v in saved.items() if v["verdict"] == "no shortcut found"] == none
    text = discovery_outcome(res, paths)
    assert text.count("no shortcut found") == len(none), text
    assert discovery_html(res).count("no shortcut found") >= len(none)
    assert len(none) == 3, res.decision
    # no flagged candidate: prompt --policy drop removes nothing and costs nothing
    model, disc = str(root / "model"), str(tmp_path / "disc")
    out = prompt(model, str(root / "train"), _prompt_config(policy="drop", candidates=disc, top_words=5,
                                                           extent="footprint", dilate=1), progress=False)
    assert out.summary["flagged_words"] == [] and (out.images["removed_patches"] == 0).all()
    assert out.after["overall"] == out.before["overall"]
    # the rule before flagging (every ranked candidate) would have dropped patches of every image
    old = prompt(model, str(root / "train"), _prompt_config(policy="drop", candidates=disc, top_words=5,
                                                           extent="footprint", dilate=1, flagged_only=False),
                 progress=False)
    assert (old.images["removed_patches"] > 0).mean() > 0.5


def _mixed(root, dest):
    """The planted fixture's aligned train images and its conflicting ones (as ``<class>/conf<i>.png``) in one
    folder with their markers.json."""
    import shutil

    recs = {}
    for split, prefix in (("train", ""), ("conflicting", "conf")):
        side = read_sidecar(root / split / "markers.json")["images"]
        for name, r in side.items():
            c, stem = name.split("/")
            new = f"{c}/{prefix}{stem}"
            (dest / c).mkdir(parents=True, exist_ok=True)
            shutil.copy(root / split / name, dest / new)
            recs[new] = r
    (dest / "markers.json").write_text(json.dumps({"classes": list(COLOURS), "images": recs}))
    return recs


def test_jtt_discovery_upweights_the_images_carrying_another_class_flagged_marker(colours, tmp_path):
    """JTT with discovery's error set: exactly repair's pseudo-conflicting images (whose flagged patches belong mostly
    to another class's candidates) are repeated lambda_up times. On the planted data that is every conflicting image
    whose marker discovery flagged, and few aligned ones (SIFT words are grey-level: a square of one colour can match
    another colour's word)."""
    from siftlens.shortcuts.anchors import JTTConfig, jtt
    from siftlens.shortcuts.retraining.head import flagged_batches, pseudo_conflicting

    root, res, _ = colours
    res.save(tmp_path / "disc")
    recs = _mixed(root, tmp_path / "mixed")
    flagged = {c for c in res.class_names if res.flagged(c)}
    assert len(flagged) == 2, flagged  # two of the three markers (test_the_planted_markers_are_flagged...)
    erm = str(root / "run" / "model")
    cfg = build(JTTConfig, dict(lambda_up=3, identifier=erm, error_set="discovery", candidates=str(tmp_path / "disc"),
                                top_words=1, epochs=1, batch_size=40, lr=1e-3, warmup_epochs=0.0, pad=0, seed=0))
    out = jtt(erm, str(tmp_path / "mixed"), cfg, progress=False)
    up = out.table.set_index("name")["error"].reindex(list(recs))
    expected = pd.Series({n: (not r["aligned"]) and r["marker"] in flagged for n, r in recs.items()})
    aligned = pd.Series({n: r["aligned"] for n, r in recs.items()})
    src, be = ImageSource(str(tmp_path / "mixed")), load_backend(erm)
    rule = _repair_config(candidates=str(tmp_path / "disc"), top_words=1)
    short = {src.names[i]: s for b in flagged_batches(be, src, load_vocabulary(str(tmp_path / "disc")), rule, False)
             for i, s in zip(b["index"], b["shortcut"], strict=True)}
    labels = {n: be.class_names.index(r["label"]) for n, r in recs.items()}
    assert up.tolist() == [bool(pseudo_conflicting(np.array(short[n]), np.array(labels[n]))) for n in up.index]
    assert expected.sum() >= 10 and up[expected].mean() >= 0.9, pd.crosstab(up, expected)
    assert up[aligned].mean() <= 0.2, pd.crosstab(up, aligned)
    assert (out.table["weight"] == np.where(out.table["error"], 3, 1)).all()
    assert out.record["error_set"] == "discovery"
    assert out.record["upsampled_images"] == len(recs) + 2 * int(up.sum())
    with pytest.raises(ConfigError, match="error-set discovery needs"):
        build(JTTConfig, dict(error_set="discovery", candidates=str(tmp_path / "disc"))).validate()
