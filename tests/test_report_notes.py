"""The report says when a segmenter never learned: a Dice near 0 makes the claims that compare it unreadable."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lawder_core import report
from lawder_core.report import SegScore
from tests.test_report_paper import inputs, seg_summary


def stuck_note(notes: list[str]) -> list[str]:
    return [n for n in notes if "Did not learn at this budget" in n]


def test_a_segmenter_still_predicting_background_is_named_in_the_notes(tmp_path: Path) -> None:
    data = inputs(tmp_path)
    scores = [SegScore("mkunet-t", "real", 0, seg_summary(0.001)), SegScore("mkunet-t-order", "real", 0,
                                                                            seg_summary(0.199)),
              SegScore("mkunet-t", "real+law", 0, seg_summary(0.2)), SegScore("mkunet-t", "real", 1, seg_summary(0.9))]
    notes = stuck_note(report.report_notes(replace(data, segmentation=scores)))
    assert len(notes) == 1
    assert "mkunet-t on real, seed 0: 0.1" in notes[0] and "mkunet-t-order on real, seed 0: 19.9" in notes[0]
    assert "real+law" not in notes[0] and "seed 1" not in notes[0]


def test_no_such_note_when_every_segmenter_learned(tmp_path: Path) -> None:
    assert stuck_note(report.report_notes(inputs(tmp_path))) == []
