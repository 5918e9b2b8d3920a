"""dist_rel's null is the delta-method approximation (issue 22, item 5): the code, the method page and the
report's notes say what is exact and what is approximate."""

from __future__ import annotations

from pathlib import Path

import siftlens.core.stats as stats
from siftlens.report.html import GLOSSARY


def test_stats_does_not_claim_that_everything_is_exact():
    doc = stats.__doc__
    assert "Everything here is exact" not in doc
    assert "dist_rel" in doc and "delta-method" in doc and "approximat" in doc


def test_method_page_and_report_notes_call_dist_rel_approximate():
    method = (Path(__file__).parents[1] / "docs" / "method.md").read_text()
    assert "one approximate null moment" in method
    notes = " ".join(text for _, text in GLOSSARY)
    assert "dist_rel" in notes and "delta method" in notes
