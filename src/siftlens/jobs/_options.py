"""How a job runs, apart from what it computes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class JobOptions:
    """How a job runs, apart from what it computes.

    weights: a weights file for ``timm:<name>`` models; report: also render the job's HTML report (the
    analysis and discovery jobs have one); progress: show progress bars.
    """

    weights: str | None = None
    report: bool = True
    progress: bool = True
