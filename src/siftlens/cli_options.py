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
