"""A repaired model is one artefact (issue 25, item 4): the repaired folder carries the drop its network was fitted
for, ``load_backend`` applies it, and it predicts what ``prompt --policy drop`` with the same options predicts on
the network without the drop; prompt's drop on top does not drop twice; attention capture sees the model as used;
repair reports aligned beside conflicting accuracy.

A random tiny ViT, images with a glyph marker (a markers.json with both groups), a discovery of it with every ranked
candidate used (``flagged_only=False``: a random model relies on nothing, so nothing is flagged otherwise)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from siftlens import analyze
from siftlens.attention import capture
from siftlens.data import ImageSource
from siftlens.errors import ConfigError, ModelLoadError
from siftlens.keypoints import SiftOptions
from siftlens.models import load_backend
from siftlens.models.vit import ViT, ViTConfig, load_vit, save_vit
from siftlens.options import build
from siftlens.shortcuts import DiscoveryConfig, PromptConfig, RepairConfig, discover, prompt, repair
from siftlens.shortcuts.artefact import DISCOVERY, SIDECAR, save_drop
from siftlens.shortcuts.dropping import DroppedBackend, model_pixels
from siftlens.shortcuts.flags import FlagOptions
from siftlens.shortcuts.interventions import forward_drop

# the flag options of the repair, given to prompt the same way; and of a drop of region words only
FLAGS = dict(top_words=2, score_ratio=0.25, flagged_only=False, extent="footprint", dilate=1)
REGION_FLAGS = dict(top_words=1, score_ratio=0.0, flagged_only=False, extent="center", dilate=0)
# folder: (discovery, flag options)
FOLDERS = {"moved": ("disc", FLAGS), "regions": ("disc-regions", REGION_FLAGS)}


@pytest.fixture(scope="module")
def repaired(tmp_path_factory):
    """root: the network (model/ and network/, the latter a copy of the repaired network without its drop), the data,
    a discovery of SIFT words (disc/) and one with region words (disc-regions/), the repaired folder moved away from
    where it was written, with the discovery it was repaired with deleted (moved/: it must hold what it needs), and
    the network with a drop of region words (regions/)."""
    from siftlens.benchmarks.spurious_cifar import glyph

    root = tmp_path_factory.mktemp("artefact")
    torch.manual_seed(0)
    save_vit(ViT(ViTConfig(img_size=(32, 32), patch_size=4, dim=32, depth=2, heads=2, num_classes=2,
                           class_names=["a", "b"])).eval(), root / "model")
    rng = np.random.default_rng(0)
    recs = {}
    for c, g, other in (("a", "checker", "ring"), ("b", "ring", "checker")):
        (root / "data" / c).mkdir(parents=True)
        for i in range(10):
            img = np.clip(rng.integers(90, 160, 3)[None, None] + rng.integers(-8, 9, (32, 32, 3)), 0, 255)
            img = img.astype(np.uint8)
            x0, y0 = (int(v) for v in rng.integers(0, 25, 2))
            aligned = i % 3 != 2
            img[y0 : y0 + 8, x0 : x0 + 8] = glyph(g if aligned else other)
            Image.fromarray(img).save(root / "data" / c / f"{i}.png")
            recs[f"{c}/{i}.png"] = {"label": c, "marker": c if aligned else "ab".replace(c, ""), "aligned": aligned}
    (root / "data" / "markers.json").write_text(json.dumps({"classes": ["a", "b"], "images": recs}))
    for name, regions in (("disc", 0), ("disc-regions", 16)):  # region words of block 1's tokens
        dc = DiscoveryConfig(vocab_size=8, regions=regions, region_layer=1, min_images=1, causal_top=2,
                             causal_images=2, gallery=0)
        discover(str(root / "model"), str(root / "data"), dc, progress=False).save(root / name)
    shutil.copytree(root / "disc", root / "disc-gone")
    rc = build(RepairConfig, dict(candidates=str(root / "disc-gone"), iters=20, batch_size=8, **FLAGS))
    repair(str(root / "model"), str(root / "data"), rc, progress=False).save(root / "fixed")
    shutil.rmtree(root / "disc-gone")
    shutil.move(root / "fixed" / "model", root / "moved")
    shutil.copytree(root / "moved", root / "network", ignore=shutil.ignore_patterns(SIDECAR, DISCOVERY))
    shutil.copytree(root / "network", root / "regions")
    save_drop(root / "regions", root / "disc-regions", FlagOptions(**REGION_FLAGS), SiftOptions())
    return root


def _batch(be, root):
    src = ImageSource(str(root / "data"))
    px = torch.from_numpy(np.stack([be.preprocess(src.load(i)) for i in range(len(src))]))
    return src.names, be.normalize(px)


def _prompt(model, root, folder="moved", policy="drop", **kw):
    disc, flags = FOLDERS[folder]
    cfg = build(PromptConfig, dict(policy=policy, candidates=str(root / disc) if policy == "drop" else None,
                                   batch_size=7, **(flags if policy == "drop" else {}), **kw))
    return prompt(str(model), str(root / "data"), cfg, progress=False).images.set_index("name")


@pytest.mark.parametrize("folder", list(FOLDERS))
def test_the_repaired_folder_is_one_model_that_drops_what_prompt_drops(repaired, folder):
    root = repaired
    disc, flags = FOLDERS[folder]
    side = json.loads((root / folder / SIDECAR).read_text())
    assert side["flags"] == flags and side["drop_mode"] == "group" and side["discovery"] == DISCOVERY
    assert side["sift"] == {"upsample": 0.0, "contrast_threshold": 0.04, "edge_threshold": 10.0}
    be = load_backend(root / folder)
    assert isinstance(be, DroppedBackend) and not isinstance(load_backend(root / "network"), DroppedBackend)
    K = len(be.rule.vocab.centers)
    assert be.describe()["shortcut_drop"]["words"] == side["words"] and side["words"]
    assert all(w < K for w in side["words"]) if folder == "moved" else all(w >= K for w in side["words"])
    ref = _prompt(root / "network", root, folder)  # the network without the drop, prompted with the same options
    partly = (ref["flagged_patches"] > 0) & (ref["removed_patches"] > 0)
    assert partly.sum() >= 5  # the drop removes some patches of many images
    names, x = _batch(be, root)
    with torch.no_grad():
        logits = be.forward(x)
        torch.testing.assert_close(be.model(x), logits, atol=0, rtol=0)  # one model, whichever way it is called
        plain = be.inner.forward(x)
    p = logits.softmax(-1)
    ref = ref.loc[names]
    assert logits.argmax(1).tolist() == ref["pred_after"].tolist()
    np.testing.assert_allclose(p[torch.arange(len(names)), torch.tensor(ref["label_index"].tolist())].numpy(),
                               ref["p_true_after"].to_numpy(), atol=1e-5)
    flagged = torch.tensor((ref["removed_patches"] > 0).tolist())
    assert not torch.allclose(logits[flagged], plain[flagged], atol=1e-4)  # the drop really is applied
    torch.testing.assert_close(logits[~flagged], plain[~flagged], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("folder", list(FOLDERS))
def test_prompt_on_the_folder_applies_on_top_and_does_not_drop_twice(repaired, folder):
    root = repaired
    ref = _prompt(root / "network", root, folder)
    none = _prompt(root / folder, root, folder, policy="none")  # the folder as it is: the model with its drop
    same = _prompt(root / folder, root, folder)  # prompt's drop with the folder's own options: a patch goes once
    for df in (none, same):
        df = df.loc[ref.index]
        assert (df["pred_before"] == ref["pred_after"]).all() and (df["pred_after"] == ref["pred_after"]).all()
        np.testing.assert_allclose(df["p_true_after"], ref["p_true_after"], atol=1e-5)
    # a different policy on top changes the model as used: keep-top removes more
    top = _prompt(root / folder, root, folder, policy="keep-top", q=0.25).loc[ref.index]
    np.testing.assert_allclose(top["p_true_before"], ref["p_true_after"], atol=1e-5)
    assert not np.allclose(top["p_true_after"], top["p_true_before"], atol=1e-4)
    # on top: a patch goes when the request or the folder's rule removes it
    be = load_backend(root / folder)
    _, x = _batch(be, root)
    keep = torch.stack([torch.randperm(be.num_patches, generator=torch.Generator().manual_seed(i))[:32].sort().values
                        for i in range(len(x))])
    asked = torch.ones(len(x), be.num_patches, dtype=torch.bool).scatter(1, keep, False)
    own = be.model.flags(x)
    both = torch.where((asked | own).all(1, keepdim=True), asked, asked | own)
    with torch.no_grad():
        got = be.forward_intervened(x, keep_idx=keep)
        torch.testing.assert_close(got, forward_drop(be.inner, x, both), atol=1e-5, rtol=1e-5)
        more = (both & ~asked).any(1)
        assert more.sum() >= 5
        assert not torch.allclose(got[more], be.inner.forward_intervened(x, keep_idx=keep)[more], atol=1e-4)


def test_the_pixels_the_model_sees_are_recovered_exactly(repaired):
    be = load_backend(repaired / "moved")
    src = ImageSource(str(repaired / "data"))
    px = np.stack([be.preprocess(src.load(i)) for i in range(len(src))])
    px[0] = (np.arange(32 * 32 * 3) % 256).reshape(32, 32, 3)  # every grey level in every channel
    np.testing.assert_array_equal(model_pixels(be, be.normalize(torch.from_numpy(px))), px)


def test_attention_capture_sees_the_model_as_used_on_the_full_grid(repaired):
    root = repaired
    be = load_backend(root / "moved")
    names, x = _batch(be, root)
    got = {}
    with torch.no_grad():
        flags = be.model.flags(x)
        flags &= ~flags.all(1, keepdim=True)  # an image whose every patch is flagged keeps them all
        with capture(be, lambda layer, a: got.__setitem__(layer, a.clone())):
            logits = be.forward(x)
        torch.testing.assert_close(logits, be.forward(x), atol=1e-5, rtol=1e-5)
    T, N = be.num_prefix_tokens, be.num_patches
    for a in got.values():
        assert a.shape == (len(x), be.num_heads, T + N, T + N)
        # a dropped patch gets no attention from any query; its own row is never read
        assert float(a[..., T:][flags[:, None, None, :].expand(-1, a.shape[1], a.shape[2], -1)].abs().max()) == 0.0
    assert flags.any() and sorted(got) == list(range(be.num_layers))
    # so analyze studies the model as used: its predictions, its attention with the dropped patches at zero
    res, net = (analyze(str(root / f), str(root / "data"), progress=False) for f in ("moved", "network"))
    assert res.manifest["model"]["shortcut_drop"]["words"] and "shortcut_drop" not in net.manifest["model"]
    preds = res.images.set_index("name").loc[names, "prediction"].tolist()
    assert preds == [be.class_names[i] for i in logits.argmax(1).tolist()]
    assert not np.allclose(res.summary["mean"], net.summary["mean"], equal_nan=True)


def test_repair_reports_aligned_beside_conflicting_accuracy(repaired, tmp_path):
    root = repaired
    r = subprocess.run([sys.executable, "-m", "siftlens.cli", "repair", "--model", str(root / "model"), "--images",
                        str(root / "data"), "--candidates", str(root / "disc"), "--out", str(tmp_path / "r"),
                        "--top-words", "2", "--no-flagged-only", "--dilate", "1", "--iters", "20", "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "r" / "repair.json").read_text())
    al = rec["alignment_dropped"]
    assert al["aligned"]["n"] == 14 and al["conflicting"]["n"] == 6 and rec["groups_from"].endswith("markers.json")
    groups = rec["accuracy_dropped"]["groups"]
    assert set(groups) == {"a|aligned", "a|conflicting", "b|aligned", "b|conflicting"}
    right = sum(g["accuracy"] * g["n"] for k, g in groups.items() if k.endswith("|conflicting"))
    assert al["conflicting"]["accuracy"] == pytest.approx(right / 6)
    assert rec["accuracy_dropped"]["overall"] == pytest.approx(rec["train_accuracy_dropped"])
    line = r.stdout.splitlines()[0]
    assert f"aligned {al['aligned']['accuracy']:.3f} (n 14)" in line
    assert f"conflicting {al['conflicting']['accuracy']:.3f} (n 6)" in line
    assert (tmp_path / "r" / "model" / SIDECAR).is_file()


def test_retraining_takes_the_network_and_an_altered_folder_fails_in_one_line(repaired, tmp_path):
    root = repaired
    # repair of a repaired folder starts from its network; the new folder carries only the new drop
    rc = build(RepairConfig, dict(candidates=str(root / "disc"), iters=5, batch_size=8, **{**FLAGS, "dilate": 0}))
    res = repair(str(root / "moved"), str(root / "data"), rc, progress=False)
    assert isinstance(res.model, ViT)
    res.save(tmp_path / "again")
    load_vit(tmp_path / "again" / "model")  # the network's own weights, no wrapper in the state dict
    assert load_backend(tmp_path / "again" / "model").rule.flags.dilate == 0
    from siftlens.shortcuts.anchors import _vit

    with pytest.raises(ConfigError, match="repaired model"):
        _vit(str(root / "moved"), "cpu")
    shutil.copytree(root / "moved", tmp_path / "altered")
    side = json.loads((tmp_path / "altered" / SIDECAR).read_text())
    (tmp_path / "altered" / SIDECAR).write_text(json.dumps({**side, "words": side["words"][:-1]}))
    with pytest.raises(ModelLoadError, match="altered"):
        load_backend(tmp_path / "altered")


def test_repair_leaves_a_model_in_which_discovery_flagged_nothing_unchanged(repaired, tmp_path):
    """The random model relies on nothing: its discovery flags no candidate, so repair (discovery groups, flagged
    candidates only) writes the network as it was, without a drop, and says so; sidecar groups still refit, and
    the refitted folder carries no drop."""
    from siftlens.shortcuts.discovery.vocabulary import load_vocabulary

    root = repaired
    assert not any(load_vocabulary(root / "disc").flagged.values())  # the premise: nothing flagged
    before = load_vit(root / "model").state_dict()
    r = subprocess.run([sys.executable, "-m", "siftlens.cli", "repair", "--model", str(root / "model"), "--images",
                        str(root / "data"), "--candidates", str(root / "disc"), "--out", str(tmp_path / "r"),
                        "--iters", "20", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "no shortcut found" in r.stdout and "left unchanged" in r.stdout
    rec = json.loads((tmp_path / "r" / "repair.json").read_text())
    assert rec["unchanged"] is True and rec["images"] == 0 and rec["cells"] == {}
    after = load_vit(tmp_path / "r" / "model").state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not (tmp_path / "r" / "model" / SIDECAR).exists()
    assert not isinstance(load_backend(tmp_path / "r" / "model"), DroppedBackend)
    oracle = repair(str(root / "model"), str(root / "data"),
                    build(RepairConfig, dict(candidates=str(root / "disc"), groups="sidecar", iters=20, batch_size=8)),
                    progress=False)
    assert "unchanged" not in oracle.record and oracle.record["images"] == 20
    assert not torch.equal(oracle.model.head.weight, before["head.weight"])
    assert oracle.record["drop"] is False  # refitted, but with nothing flagged the folder carries no drop
    oracle.save(tmp_path / "o")
    assert not (tmp_path / "o" / "model" / SIDECAR).exists()
    assert not isinstance(load_backend(tmp_path / "o" / "model"), DroppedBackend)
