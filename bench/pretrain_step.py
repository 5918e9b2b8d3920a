"""MAE pre-training step: random masking against SIFT-guided masking.

    python bench/pretrain_step.py [--quick]

One training step exactly as :func:`siftlens.pretrain` runs it (its loop body):
:func:`siftlens.training.pretraining.batch_inputs` (augmentation, mask noise and, for the guided policies, the
cached keypoints moved with the crop and flip, counted per patch and turned into mask scores or loss
weights), the MAE forward and loss, backward, gradient clipping and the AdamW step. The model is the
default pre-training configuration (32x32, patch 4, width 128, depth 6, 4 heads, MLP 2, decoder 2 x 128,
mask ratio 0.75) on CIFAR-10 training images; SIFT runs once beforehand (the engine caches it too).

Policies: ``random`` (no keypoints touched), ``sift`` (tau = 1), ``kamim`` (random masks, keypoint-density
loss weights), each with its own model and optimiser from the same initial weights, stepped side by side
(order rotated per round). Overhead = median over rounds of step(policy) / step(random) - 1, on process
CPU time with one torch thread. Target: guided overhead <= 3 %. The engine's own timing of the keypoint and
masking work inside ``batch_inputs`` is recorded per step too (``keypoints_and_masking_ms_per_step``).
"""

from __future__ import annotations

import argparse

import _common as C


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small batch, few rounds")
    a = ap.parse_args(argv)
    C.be_nice()
    import cv2
    import numpy as np
    import torch

    from siftlens.data import ImageSource, load_labelled_array
    from siftlens.keypoints import SiftParams
    from siftlens.models.mae import MAE, MAEConfig
    from siftlens.models.vit import ViTConfig
    from siftlens.options import build
    from siftlens.training.keypoint_bank import KeypointBank
    from siftlens.training.pretraining import PretrainConfig, batch_inputs

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    batch, steps, rounds, n_img = (64, 1, 3, 256) if a.quick else (256, 2, 7, 2048)
    src = ImageSource(f"{C.CIFAR_ZIP}/cifar10/train", limit=n_img)
    x, _, _ = load_labelled_array(src, (32, 32))
    bank = KeypointBank.detect(x, SiftParams(upsample=4.0))
    mean = tuple(float(m) for m in x.reshape(-1, 3).mean(0) / 255.0)
    std = tuple(float(s) for s in x.reshape(-1, 3).std(0) / 255.0)
    x_t = torch.from_numpy(x)

    def make(policy: str):
        pc = build(PretrainConfig, {"policy": policy, "batch_size": batch})
        sh, d = pc.shape, pc.decoder
        enc = ViTConfig(img_size=(32, 32), patch_size=sh.patch_size, num_classes=0, dim=sh.dim, depth=sh.depth,
                        heads=sh.heads, mlp_ratio=sh.mlp_ratio, pool=pc.evaluation.feature, mean=mean, std=std)
        torch.manual_seed(0)
        model = MAE(enc, MAEConfig(decoder_dim=d.decoder_dim, decoder_depth=d.decoder_depth,
                                   decoder_heads=d.decoder_heads, mask_ratio=pc.masking.mask_ratio)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=pc.optim.weight_decay)
        gen = torch.Generator().manual_seed(0)
        use_bank = bank if policy != "random" else None
        state = {"step": 0, "prep_s": 0.0}

        def step() -> None:
            for _ in range(steps):
                s = state["step"] % (len(x) // batch)
                idx = torch.arange(s * batch, (s + 1) * batch)
                b = batch_inputs(pc, model, x_t, idx, use_bank, gen, pc.masking.tau)
                state["prep_s"] += b.prep_seconds  # the engine's own timing of keypoints + masking (wall clock)
                loss = model(b.x, b.scores, b.weights)[0]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                state["step"] += 1

        step.state = state
        return step

    policies = ("random", "sift", "kamim")
    fns = {p: make(p) for p in policies}
    t = C.side_by_side(fns, rounds=rounds)
    summ = C.summary(t)
    res = {
        "settings": {"batch_size": batch, "steps_per_timing": steps, "rounds": rounds, "torch_threads": 1,
                     "images": len(x), "mean_keypoints": float(np.mean(bank.count))},
        "images_per_s": {p: batch * steps / summ[p]["wall"]["median_s"] for p in policies},
        "images_per_s_cpu": {p: batch * steps / summ[p]["cpu"]["median_s"] for p in policies},
        "overhead_cpu": {p: C.ratio(t, p, "random", "cpu") - 1.0 for p in policies[1:]},
        "overhead_wall": {p: C.ratio(t, p, "random", "wall") - 1.0 for p in policies[1:]},
        "timings": summ,
        "keypoints_and_masking_ms_per_step": {p: 1e3 * f.state["prep_s"] / f.state["step"] for p, f in fns.items()},
    }
    res["checks"] = [
        C.check("pretrain: images/s, random masking (CPU time)", res["images_per_s_cpu"]["random"], None),
        C.check("pretrain: guided (sift) step overhead vs random", res["overhead_cpu"]["sift"], 0.03),
        C.check("pretrain: guided (kamim) step overhead vs random", res["overhead_cpu"]["kamim"], 0.03),
    ]
    path = C.write_result("pretrain_step", res, a.quick)
    print(C.format_table(res["checks"]))
    print(f"written {path}")
    return res


if __name__ == "__main__":
    main()
