"""``siftlens retrain``'s cost against plain fine-tuning (ERM): the SIFT pass and the dropping step.

    python bench/retrain_step.py [--quick]

``retrain`` is the ERM fine-tuning run again with discovery's flagged tokens removed from every step. It costs
more than the run it repeats in two places, both measured here on CIFAR-10 training images with the shortcut
benchmark's encoder (``experiments/shortcut_benchmark/encoder/model``: 32x32, patch 4, width 128, depth 6) and
recipe (batch 256, 2 epochs), one torch and one OpenCV thread:

1. **The flags** (:class:`~siftlens.shortcuts.retraining.retrain.ShortcutTokens`: SIFT, words, the footprint
   extent grown by one patch), once per image: ``flag_ms_per_image`` (median of ``rounds`` passes). The
   vocabulary is k-means over these images' own descriptors (discovery's ``build_vocabulary``, its default 256
   words) and the flagged set is 26 of its words, spread over it: seed 7's retrain runs on glyphs, imagenet and
   watermark flagged 30, 14 and 26 words and removed 35% of the patch tokens (``dropped_patch_share`` here).
2. **The step** (:func:`siftlens.training.supervised.train_one_epoch`'s body: augmentation, the masks moved with
   the crops and flips, the forward with each image its own number of tokens, loss, backward, AdamW): ``plain``
   (ERM) and ``drop`` (retrain), side by side from the same weights, order rotated per round;
   ``step_overhead`` = median over rounds of drop / plain - 1 (CPU time).

From these, the training cost of a retrain over its ERM run of E epochs, in per-image times, with the flags of
the training and validation images (v = ``validation_share`` of the training set, 0.1 in the benchmark) computed
once (``retrain_over_erm``, as ``train`` does since session 19) or every epoch
(``retrain_over_erm_flags_every_epoch``, as it did before): (E * drop + (1 + v) F) / (E * plain) - 1 and
E * (drop + (1 + v) F) / (E * plain) - 1. The evaluations of the validation images are left out of both.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict

import _common as C

ENCODER = C.ROOT / "experiments" / "shortcut_benchmark" / "encoder" / "model"
FLAGGED_WORDS = 26  # the median of seed 7's retrain runs on glyphs, imagenet and watermark (30, 14, 26)
VALIDATION_SHARE = 0.1  # the benchmark's fine-tuning: 500 validation images per 5,000 training images (2,500 x 2)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer images, a small batch, few rounds")
    a = ap.parse_args(argv)
    C.be_nice()
    import cv2
    import numpy as np
    import torch
    import torch.nn.functional as F

    from siftlens.data import ImageSource, load_labelled_array
    from siftlens.keypoints import SiftOptions
    from siftlens.models.native import NativeBackend
    from siftlens.models.vit import load_vit
    from siftlens.shortcuts import DiscoveryConfig
    from siftlens.shortcuts.discovery.vocabulary import Vocabulary, build_vocabulary
    from siftlens.shortcuts.dropping import DropRule, keypoint_items, model_pixels
    from siftlens.shortcuts.flags import FlagOptions
    from siftlens.shortcuts.retraining.retrain import ShortcutTokens
    from siftlens.training.augment import apply_augment, draw_augment
    from siftlens.training.guidance import forward_dropping
    from siftlens.training.images import normalize
    from siftlens.training.supervised import drop_masks, moved_drop

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    n_img, batch, rounds, epochs = (256, 64, 3, 2) if a.quick else (2048, 256, 7, 2)
    model = load_vit(ENCODER)
    x, _, _ = load_labelled_array(ImageSource(f"{C.CIFAR_ZIP}/cifar10/train", limit=n_img), tuple(model.cfg.img_size))
    mean, std = model.cfg.mean, model.cfg.std
    x_norm = normalize(torch.from_numpy(x), mean, std)

    backend = NativeBackend(model, "cpu")
    sift = SiftOptions()
    items = keypoint_items(model_pixels(backend, x_norm), backend.input_size, sift)
    desc = np.concatenate([it["desc"] for it in items if len(it["desc"])])
    centers = build_vocabulary(desc, DiscoveryConfig())
    classes = [f"c{i}" for i in range(FLAGGED_WORDS)]  # one flagged word per class, spread over the vocabulary
    words = {c: [i * len(centers) // FLAGGED_WORDS] for i, c in enumerate(classes)}
    vocab = Vocabulary(centers, classes, ranked=words, flagged=words)
    rule = DropRule(vocab, FlagOptions(top_words=5, score_ratio=0.25, extent="footprint", dilate=1), sift, "group")

    def flag_all() -> None:
        flagged["drops"] = drop_masks(ShortcutTokens(rule), model, x, "cpu", batch_size=512)

    flagged: dict = {}
    flag_ms = 1e3 * statistics.median(C.timed(flag_all)[1] for _ in range(rounds)) / n_img  # CPU time
    drops = flagged["drops"]  # (n_img, P) bool

    def make(with_drop: bool):
        net = load_vit(ENCODER).train()
        opt = torch.optim.AdamW(net.parameters(), lr=5e-4, weight_decay=0.05)
        gen = torch.Generator().manual_seed(0)
        state = {"step": 0}

        def step() -> None:
            s = state["step"] % (n_img // batch)
            idx = torch.arange(s * batch, (s + 1) * batch)
            aug = draw_augment(batch, 4, gen)
            xb = apply_augment(x_norm[idx], aug, 4)
            y = torch.randint(0, 10, (batch,), generator=gen)
            if with_drop:
                logits = forward_dropping(net, xb, moved_drop(drops[idx], net, aug, 4, "cpu"))
            else:
                logits = net(xb)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state["step"] += 1

        return step

    t = C.side_by_side({"plain": make(False), "drop": make(True)}, rounds=rounds)
    summ = C.summary(t)
    plain_ms = 1e3 * summ["plain"]["cpu"]["median_s"] / batch
    drop_ms = 1e3 * summ["drop"]["cpu"]["median_s"] / batch
    flag_pass = (1 + VALIDATION_SHARE) * flag_ms  # per training image: its flags and its share of the validation's
    once = (epochs * drop_ms + flag_pass) / (epochs * plain_ms) - 1
    every = epochs * (drop_ms + flag_pass) / (epochs * plain_ms) - 1
    res = {
        "settings": {"images": n_img, "batch_size": batch, "rounds": rounds, "epochs": epochs, "torch_threads": 1,
                     "validation_share": VALIDATION_SHARE, "encoder": str(ENCODER.relative_to(C.ROOT)),
                     "flagged_words": len(rule.words), "flag_options": asdict(rule.flags)},
        "flagged_image_share": float(drops.any(1).float().mean()),
        "dropped_patch_share": float(drops.float().mean()),
        "flag_ms_per_image": flag_ms,
        "step_ms_per_image": {"plain": plain_ms, "drop": drop_ms},
        "step_overhead": C.ratio(t, "drop", "plain", "cpu") - 1.0,
        "retrain_over_erm": once,
        "retrain_over_erm_flags_every_epoch": every,
        "timings": summ,
    }
    res["checks"] = [
        C.check("retrain: flags, ms per image (SIFT, words, footprint + 1)", flag_ms, None),
        C.check("retrain: dropping step over plain step (CPU)", res["step_overhead"], None),
        C.check(f"retrain over ERM, {epochs} epochs, flags once", once, None),
        C.check(f"retrain over ERM, {epochs} epochs, flags every epoch", every, None),
    ]
    path = C.write_result("retrain_step", res, a.quick)
    print(C.format_table(res["checks"]))
    print(f"written {path}")
    return res


if __name__ == "__main__":
    C.stable_malloc()
    main()
