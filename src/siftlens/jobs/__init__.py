"""Whole jobs: load, run, save, report. The command line calls these functions and nothing else.

This is the one package that joins the steps with each other and with their rendering: the analysis with
:mod:`siftlens.report`, discovery with :mod:`siftlens.shortcuts.discovery.report`, the SpuriousCIFAR evaluation
with discovery, prompting with its output files. Nothing in the library imports it (only :mod:`siftlens.cli`).
Each job returns its result and the paths it wrote; the ``*_outcome`` functions give the few lines the CLI
prints about them. The jobs live by family: :mod:`.analysis`, :mod:`.shortcuts` and :mod:`.training`.
"""

from ._options import JobOptions
from .analysis import (
    analysis_outcome,
    compare_outcome,
    demo_images_dir,
    run_analysis,
    run_compare,
    run_demo,
    run_merge,
    shard_outcome,
)
from .shortcuts import (
    discovery_outcome,
    make_spurious,
    prompt_outcome,
    repair_outcome,
    retrain_outcome,
    run_discovery,
    run_prompt,
    run_repair,
    run_retrain,
    spurious_outcome,
)
from .training import pretrain_outcome, run_pretrain, run_train, train_outcome

__all__ = ["JobOptions", "analysis_outcome", "compare_outcome", "demo_images_dir", "discovery_outcome", "make_spurious",
           "prompt_outcome", "repair_outcome", "run_analysis", "run_compare", "run_demo", "run_discovery", "run_merge",
           "run_prompt", "run_repair", "run_retrain", "retrain_outcome", "shard_outcome", "spurious_outcome",
           "pretrain_outcome", "run_pretrain", "run_train", "train_outcome"]
