"""One training core; supervised training and MAE pre-training (:mod:`siftlens.pretrain.engine`) are short
loops on top of it.

    loop.py        where a run runs (process group, device, output folder) and the model in training:
                   per-epoch generator and batches, one optimiser step, resume, end-of-epoch checkpoint
    images.py      an ImageFolder decoded once into memory; channel statistics; normalisation
    augment.py     random crop with padding + horizontal flip, drawn and applied in batches
    keypoints.py   SIFT once per training image (cached, optionally in worker processes), moved with each
                   crop + flip; keypoints per patch
    guidance.py    the Gumbel-top-k sampler of guided masks and guided token dropping (keep-rate r)
    optim.py       AdamW with the one weight-decay rule; warm-up + cosine learning-rate schedule
    checkpoint.py  atomic checkpoints that resume a run exactly
    supervised.py  supervised training of the project's ViT (``train(TrainConfig(...))``, CLI ``siftlens train``)
"""

from __future__ import annotations

from .supervised import TrainConfig, train

__all__ = ["TrainConfig", "train"]
