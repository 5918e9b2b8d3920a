"""The analysis core: the fast path from one layer's attention and the patch weight maps to every metric and
its exact null (docs/method.md; the plain float64 version of the same, one image at a time, is
:mod:`siftlens.reference`, and the tests hold the two equal).

- :mod:`.reductions`: the O(h N^2) passes over a layer's attention (eager PyTorch), and
  :mod:`.fused` with ``kernels/layer_sums.c``: the same passes fused into one per query row (a C kernel
  compiled on first use).
- :mod:`.metrics`: the per-image metrics (SAL, WI, CLS lift and rank correlation, R, distances, entropy).
- :mod:`.nullmodel`: the null models (exact permutation moments, cyclic shifts, Monte Carlo maps).
- :mod:`.stats`: the closed-form permutation moments, normal p-values, bootstrap and BH q-values.

The core imports only the ground floor (errors); the dataset-level runner (:mod:`siftlens.analysis`) is built
on it.
"""
