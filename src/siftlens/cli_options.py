"""Command-line option types that several ``siftlens`` commands share (typer ``Annotated`` aliases)."""

from __future__ import annotations

from typing import Annotated

import typer

# token dropping, shared by train and pretrain (METHOD.md section 5)
KeepRate = Annotated[float, typer.Option(help="Token dropping: training steps see this share r of the patch tokens "
                                              "(pretrain: of the visible ones); evaluation uses all; 1 = none.")]
KeepPolicy = Annotated[str, typer.Option(help="Which tokens a step keeps: random, or sift (probability ~ "
                                              "(w + eps)^tau, w = keypoints in the patch).")]
KeepTau = Annotated[float, typer.Option(help="sift keep policy: tau > 0 keeps keypoint-rich patches.")]
KeepEps = Annotated[float, typer.Option(help="sift keep policy: added to the keypoint count.")]

# flagged tokens, shared by prompt and repair
Dilate = Annotated[int, typer.Option(help="Grow flagged patches by this many patches (repair: at fitting time; use "
                                          "the same value with `prompt --policy drop`).")]

# siftlens repair
RepairGroups = Annotated[str, typer.Option(help="discovery (label-free pseudo-groups) | sidecar (the markers.json's "
                                                "true groups: an oracle reference) | none.")]
RepairBlocks = Annotated[int, typer.Option(help="Also fine-tune the last K transformer blocks, the final norm and the "
                                                "head (AdamW, flagged tokens dropped); 0 = the head only.")]
RepairEpochs = Annotated[int, typer.Option(help="--blocks > 0: fine-tuning epochs.")]
RepairLr = Annotated[float, typer.Option(help="--blocks > 0: peak learning rate (cosine decay to 0).")]
RepairStart = Annotated[str, typer.Option(help="--blocks > 0: start from the head-only fit (fit) or the old head.")]
