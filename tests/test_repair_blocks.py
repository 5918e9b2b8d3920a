"""Block fine-tuning for ``siftlens repair --blocks K`` (siftlens.shortcuts.retraining.blocks) on a tiny random ViT:
the split forward equals the model's own forward with the same tokens dropped, only the last blocks, the final norm
and the head train, and the weighted loss is the one minimised."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from siftlens.errors import ConfigError
from siftlens.models.backend import keep_groups
from siftlens.models.vit import ViT, ViTConfig
from siftlens.shortcuts.retraining.blocks import (
    TuneSettings,
    finetune,
    frozen_tokens,
    minibatches,
    tuned_logits,
    tuned_predictions,
)
from siftlens.training.optim import lr_at


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = ViT(ViTConfig(img_size=(16, 16), patch_size=4, num_classes=3, dim=16, depth=3, heads=2)).eval()
    x = torch.randn(12, 3, 16, 16)
    drop = torch.zeros(12, 16, dtype=torch.bool)
    drop[:4, :3] = True  # 13 kept patches
    drop[4:6, 5] = True  # 15
    drop[6] = True  # every patch flagged: keeps all 16, like images 7..11
    return model, x, drop


def test_keep_groups_groups_images_by_kept_count(tiny):
    _, _, drop = tiny
    got = {int(k.shape[1]): (rows.tolist(), k) for rows, k in keep_groups(drop)}
    assert sorted(got) == [13, 15, 16]
    assert got[13][0] == [0, 1, 2, 3] and torch.equal(got[13][1][0], torch.arange(3, 16))
    assert got[15][0] == [4, 5] and 5 not in got[15][1][0].tolist()
    assert got[16][0] == [6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("blocks", [1, 3])
def test_split_forward_equals_the_models_forward_with_the_tokens_dropped(tiny, blocks):
    model, x, drop = tiny
    toks = frozen_tokens(model, x, drop, blocks)
    assert [len(t) for t in toks] == [14] * 4 + [16] * 2 + [17] * 6  # CLS + kept patches
    want_pred = np.full(12, -1)
    with torch.no_grad():
        for rows, keep in keep_groups(drop):
            want = model(x[rows], keep)
            got = tuned_logits(model, torch.stack([toks[r] for r in rows.tolist()]), blocks, "model")
            assert torch.allclose(got, want, atol=1e-5)
            want_pred[rows.numpy()] = want.argmax(1).numpy()
    assert (tuned_predictions(model, toks, blocks, "model", batch_size=5) == want_pred).all()
    with pytest.raises(ConfigError, match="blocks"):
        frozen_tokens(model, x, drop, 4)


def test_minibatches_share_a_length_and_cover_every_image_once():
    lengths = np.array([5, 5, 7, 5, 7, 9, 5, 5])
    bs = minibatches(lengths, 2, np.random.default_rng(0))
    assert sorted(np.concatenate(bs).tolist()) == list(range(8))
    assert all(len(b) <= 2 and len(set(lengths[b])) == 1 for b in bs)


def test_finetune_trains_only_the_last_blocks_norm_and_head(tiny):
    model, x, drop = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    toks = frozen_tokens(model, x, drop, 1)
    y = torch.arange(12) % 3
    out = finetune(model, toks, y, torch.ones(12), TuneSettings(blocks=1, epochs=3, lr=1e-2, batch_size=4),
                   progress=False)
    assert len(out["epoch_loss"]) == 3 and out["steps"] == 3 * 4  # lengths 14 (4 images), 16 (2), 17 (6)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("blocks.2.", "norm.", "head.")) for k in changed)
    assert {"head.weight", "norm.weight"} <= changed and any(k.startswith("blocks.2.") for k in changed)
    assert not any(p.requires_grad for p in model.parameters())


def test_finetune_minimises_the_weighted_loss(tiny):
    """Random labels, weight only on the first half: the model learns those images, not the others."""
    model, x, _ = tiny
    x = torch.randn(24, 3, 16, 16)
    toks = frozen_tokens(model, x, torch.zeros(24, 16, dtype=torch.bool), 2)
    y = torch.from_numpy(np.random.default_rng(1).integers(0, 3, 24))
    w = torch.cat([torch.ones(12), torch.zeros(12)])
    out = finetune(model, toks, y, w, TuneSettings(blocks=2, epochs=40, lr=3e-3, l2=0.0, batch_size=8),
                   progress=False)
    assert out["epoch_loss"][-1] < 0.5 * out["epoch_loss"][0]
    hit = tuned_predictions(model, toks, 2, "model") == y.numpy()
    assert hit[:12].mean() == 1.0 and hit[12:].mean() < 0.75


def test_learning_rate_warms_up_then_decays_to_zero():
    """finetune's schedule is training.optim's: 10% warm-up steps, cosine decay to 0."""
    lrs = [lr_at(i, 100, 10, 1e-3, 0.0) for i in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False)) and lrs[-1] < 1e-6 + 1e-3 * 1e-3


def test_finetune_decays_by_the_one_weight_decay_rule(tiny, monkeypatch):
    """repair --blocks uses training.optim's rule: the trained weight matrices decay, their biases and the norms
    do not, and nothing frozen is handed to the optimiser."""
    model, x, drop = tiny
    made = []
    real = torch.optim.AdamW

    def spy(groups, **kw):
        made.append(groups)
        return real(groups, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    toks = frozen_tokens(model, x, drop, 1)
    finetune(model, toks, torch.zeros(12, dtype=torch.long), torch.ones(12), TuneSettings(blocks=1, epochs=1),
             progress=False)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in made[0]}
    assert decay[0.01] == {"blocks.2.attn.qkv.weight", "blocks.2.attn.proj.weight", "blocks.2.mlp.0.weight",
                           "blocks.2.mlp.2.weight", "head.weight"}
    assert "norm.weight" in decay[0.0] and "blocks.2.norm1.bias" in decay[0.0] and "head.bias" in decay[0.0]
    assert all(n.startswith(("blocks.2.", "norm.", "head.")) for n in decay[0.0] | decay[0.01])
