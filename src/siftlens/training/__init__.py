"""Training the project's ViT: one core, with supervised training and MAE pre-training short loops on top.

    loop.py           where a run runs (process group, device, output folder) and the model in training:
                      per-epoch generator and batches, one optimiser step, resume, end-of-epoch checkpoint
    images.py         an ImageFolder decoded once into memory; channel statistics; normalisation
    augment.py        random crop with padding + horizontal flip, drawn and applied in batches
    keypoint_bank.py  SIFT once per training image (cached, optionally in worker processes), moved with
                      each crop + flip; keypoints per patch
    guidance.py       the Gumbel-top-k sampler of guided masks and guided token dropping (keep-rate r)
    optim.py          AdamW with the one weight-decay rule; warm-up + cosine learning-rate schedule
    checkpoint.py     atomic checkpoints that resume a run exactly
    options.py        the option groups: model shape, optimiser, token dropping, MAE decoder, masking, evaluation
    start.py          the model a run starts from: a new one, or a saved siftlens ViT / MAE (fine-tuning)
    supervised.py     supervised training (``train(model, images, TrainConfig(...))``, CLI ``siftlens train``)
    pretraining.py    MAE pre-training (``pretrain(model, images, PretrainConfig(...))``, CLI ``siftlens pretrain``)
    masking.py        MAE masking policies (random, sift, sift-curriculum, kamim, attmask) and loss weights
    mae_eval.py       k-NN accuracy and linear probe on frozen encoder features
    curves.py         pre-training curves
"""

from __future__ import annotations

from .pretraining import PretrainConfig, PretrainResult, pretrain
from .supervised import TrainConfig, TrainResult, train

__all__ = ["PretrainConfig", "PretrainResult", "TrainConfig", "TrainResult", "pretrain", "train"]
