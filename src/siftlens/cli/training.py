"""The training commands: train (supervised) and pretrain (MAE)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import cli_options as opt
from ._app import app


@app.command()
def train(
    train: Annotated[str, typer.Option(help="Training images in ImageFolder layout: a folder, a zip, or "
                                            "a folder inside a zip (archive.zip/inner/folder).")],
    out: Annotated[Path, typer.Option(help="Output folder: checkpoint.pt, history.json, model/.")],
    val: Annotated[str | None, typer.Option(help="Held-out images (same class folders), evaluated every "
                                                 "epoch.")] = None,
    img_size: Annotated[int, typer.Option(help="Input size; images are resized to it once.")] = 32,
    patch_size: Annotated[int, typer.Option(help="Patch size P; must divide img-size.")] = 4,
    dim: Annotated[int, typer.Option(help="Width D.")] = 128,
    depth: Annotated[int, typer.Option(help="Number of blocks.")] = 6,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    mlp_ratio: Annotated[float, typer.Option(help="MLP hidden width / D.")] = 2.0,
    registers: Annotated[int, typer.Option(help="Register tokens after CLS.")] = 0,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 25,
    batch_size: Annotated[int, typer.Option(help="Global batch size.")] = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.05,
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up, in epochs.")] = 2.0,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing.")] = 0.1,
    pad: Annotated[int, typer.Option(help="Random-crop padding in pixels (0: no crop).")] = 4,
    drop_path: Annotated[float, typer.Option(help="Stochastic depth rate.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for init, shuffling and augmentation.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use at most this many training images.")] = None,
    val_limit: Annotated[int | None, typer.Option(help="Use at most this many held-out images.")] = None,
    keep_rate: opt.KeepRate = 1.0,
    keep_policy: opt.KeepPolicy = "random",
    keep_tau: opt.KeepTau = 1.0,
    keep_eps: opt.KeepEps = 1.0,
    upsample: Annotated[float, typer.Option(help="SIFT upsampling factor u for the sift keep policy; 0 = "
                                                 "automatic.")] = 0.0,
    keypoint_cache: Annotated[str | None, typer.Option(help="Keypoint cache (.npz) shared between runs on the "
                                                            "same images; default out/keypoints.npz.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from out/checkpoint.pt.")] = False,
    stop_after: Annotated[int | None, typer.Option(help="Stop after this many epochs in this invocation; "
                                                        "continue later with --resume.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Train the project's ViT (supervised); weights are saved as safetensors with a JSON config."""
    from ..training.supervised import TrainConfig
    from ..training.supervised import train as run_train

    cfg = TrainConfig(
        train=train, val=val, out=str(out), img_size=img_size, patch_size=patch_size, dim=dim, depth=depth,
        heads=heads, mlp_ratio=mlp_ratio, num_registers=registers, epochs=epochs, batch_size=batch_size,
        lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
        pad=pad, drop_path=drop_path, seed=seed, device=device, threads=threads, limit=limit,
        val_limit=val_limit, keep_rate=keep_rate, keep_policy=keep_policy, keep_tau=keep_tau, keep_eps=keep_eps,
        upsample=upsample, keypoint_cache=keypoint_cache, resume=resume, stop_after=stop_after, progress=progress,
    )
    hist = run_train(cfg)
    last = hist["epochs"][-1] if hist["epochs"] else {}
    if len(hist["epochs"]) < epochs:
        typer.echo(f"stopped after epoch {len(hist['epochs'])}/{epochs}; continue with --resume. last: {last}")
    else:
        typer.echo(f"model saved to {out / 'model'}; final {last}")


@app.command()
def pretrain(
    train: Annotated[str, typer.Option(help="Training images in ImageFolder layout (folder, zip, or "
                                            "archive.zip/inner/folder); labels are used only for evaluation.")],
    out: Annotated[Path, typer.Option(help="Output folder: checkpoint.pt, history.json, curves.png, encoder/, "
                                           "mae/, keypoints.npz.")],
    val: Annotated[str | None, typer.Option(help="Held-out images (same class folders) for the reconstruction "
                                                 "loss, k-NN accuracy and the linear probe.")] = None,
    policy: Annotated[str, typer.Option(help="Masking policy: random | sift | sift-curriculum | kamim | "
                                             "attmask (the encoder's own CLS attention as the guide).")] = "random",
    tau: Annotated[float, typer.Option(help="sift: mask patches with probability ~ (w + eps)^tau (w = keypoints "
                                            "in the patch); tau > 0 hides keypoint-rich patches.")] = 1.0,
    tau_max: Annotated[float, typer.Option(help="sift-curriculum: tau ramps linearly from 0 to this.")] = 1.0,
    eps: Annotated[float, typer.Option(help="Added to the keypoint count before ^tau.")] = 1.0,
    lam: Annotated[float, typer.Option(help="Loss weight of a masked patch: 1 + lam * N * c_p (c_p: its share "
                                            "of the image's keypoints); 0 = plain MAE loss.")] = 0.0,
    kamim_temp: Annotated[float, typer.Option(help="kamim: temperature T of the weights exp(density / T).")]
    = 0.25,
    mask_ratio: Annotated[float, typer.Option(help="Fraction of patches masked.")] = 0.75,
    norm_pix: Annotated[bool, typer.Option(help="Targets: each patch's pixels normalised by its own mean and "
                                                "variance.")] = False,
    loss: Annotated[str, typer.Option(help="Per-pixel error: mse (MAE) or l1 (SimMIM / KAMIM).")] = "mse",
    img_size: Annotated[int, typer.Option(help="Input size; images are resized to it once.")] = 32,
    patch_size: Annotated[int, typer.Option(help="Patch size P; must divide img-size.")] = 4,
    dim: Annotated[int, typer.Option(help="Encoder width D.")] = 128,
    depth: Annotated[int, typer.Option(help="Encoder blocks.")] = 6,
    heads: Annotated[int, typer.Option(help="Encoder attention heads.")] = 4,
    decoder_dim: Annotated[int, typer.Option(help="Decoder width.")] = 128,
    decoder_depth: Annotated[int, typer.Option(help="Decoder blocks.")] = 2,
    feature: Annotated[str, typer.Option(help="Encoder feature for k-NN and probe: mean (patch tokens) or cls.")]
    = "mean",
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 20,
    batch_size: Annotated[int, typer.Option(help="Global batch size.")] = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, betas 0.9/0.95).")] = 1e-3,
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up, in epochs.")] = 2.0,
    pad: Annotated[int, typer.Option(help="Random-crop padding in pixels (0: no crop).")] = 4,
    eval_every: Annotated[int, typer.Option(help="Evaluate on --val every this many epochs (and at the end).")]
    = 1,
    knn_train_limit: Annotated[int, typer.Option(help="Training images in the k-NN memory bank and the probe's "
                                                      "training set.")] = 5000,
    upsample: Annotated[float, typer.Option(help="SIFT upsampling factor u; 0 = automatic (128 / img-size, at "
                                                 "least 1).")] = 0.0,
    keypoint_cache: Annotated[str | None, typer.Option(help="Keypoint cache (.npz) shared between runs on the "
                                                            "same images; default out/keypoints.npz.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for init, shuffling, augmentation and masks.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use at most this many training images.")] = None,
    val_limit: Annotated[int | None, typer.Option(help="Use at most this many held-out images.")] = None,
    keep_rate: opt.KeepRate = 1.0,
    keep_policy: opt.KeepPolicy = "random",
    keep_tau: opt.KeepTau = 1.0,
    keep_eps: opt.KeepEps = 1.0,
    resume: Annotated[bool, typer.Option(help="Continue from out/checkpoint.pt (exactly).")] = False,
    stop_after: Annotated[int | None, typer.Option(help="Stop after this many epochs in this invocation; "
                                                        "continue later with --resume.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Masked-autoencoder pre-training of the project's ViT with random or SIFT-guided masking."""
    from ..pretrain.engine import PretrainConfig
    from ..pretrain.engine import pretrain as run_pretrain

    cfg = PretrainConfig(
        train=train, val=val, out=str(out), policy=policy, tau=tau, tau_max=tau_max, eps=eps, lam=lam,
        kamim_temp=kamim_temp, mask_ratio=mask_ratio, norm_pix=norm_pix, loss=loss, img_size=img_size,
        patch_size=patch_size, dim=dim, depth=depth, heads=heads, decoder_dim=decoder_dim,
        decoder_depth=decoder_depth, feature=feature, epochs=epochs, batch_size=batch_size, lr=lr,
        warmup_epochs=warmup_epochs, pad=pad, eval_every=eval_every, knn_train_limit=knn_train_limit,
        upsample=upsample, keypoint_cache=keypoint_cache, seed=seed, device=device, threads=threads, limit=limit,
        val_limit=val_limit, keep_rate=keep_rate, keep_policy=keep_policy, keep_tau=keep_tau, keep_eps=keep_eps,
        resume=resume, stop_after=stop_after, progress=progress,
    )
    hist = run_pretrain(cfg)
    last = hist["epochs"][-1] if hist["epochs"] else {}
    if len(hist["epochs"]) < epochs:
        typer.echo(f"stopped after epoch {len(hist['epochs'])}/{epochs}; continue with --resume. last: {last}")
    else:
        typer.echo(f"encoder saved to {out / 'encoder'}; final {last}")
