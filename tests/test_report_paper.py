"""The report quotes the paper only from `lawder_core/paper.py`, the one table of the abstract's numbers, and no
text of lawder's attributes to the paper what its abstract does not say."""

from __future__ import annotations

import re
from pathlib import Path

from lawder_core import paper, report
from lawder_core.report import ReportInputs, SegScore
from lawder_core.viz import colour_bar_labels

ROOT = Path(__file__).resolve().parents[1]
# Settings that are lawder's own and that the abstract never states: no text may attribute them to the paper.
NOT_IN_THE_ABSTRACT = re.compile(r"200-epoch|200 epochs|SD 1\.5 ControlNet")


def seg_summary(dice: float) -> dict:
    return {"foreground_mean": {"Dice": dice}, "mean": {"foreground": {"Dice": dice}}}


def inputs(tmp_path: Path) -> ReportInputs:
    synthesis = {w: {"fid": {"fid": fid, "kid": 0.1}, "adherence": {"dice_mean": 0.5, "segmenter": {"run": "r"}},
                     "metadata": {}} for w, fid in (("uniform", 300.0), ("law", 280.0))}
    segmentation = [SegScore(model, data, 0, seg_summary(0.4 + 0.01 * i))
                    for i, (model, data) in enumerate((m, d) for m in ("mkunet-t", "mkunet-t-order")
                                                      for d in ("real", "real+uniform", "real+law"))]
    profiles = {m: {"profile": {"params": p, "gmacs": 0.05, "gflops": 0.1}}
                for m, p in (("mkunet-t", 27384), ("mkunet-t-order", 42953))}
    return ReportInputs(out=tmp_path, setup="setup", law_runs={}, synthetic={}, synthesis=synthesis,
                        segmentation=segmentation, profiles=profiles)


def paper_cells(table: report.Table) -> list[str]:
    _, header, rows = table
    columns = [i for i, name in enumerate(header) if name.startswith("paper")]
    return [row[i] for row in rows for i in columns if row[i]]


def numbers(text: str) -> list[float]:
    return [float(n) for n in re.findall(r"[-+]?\d+(?:\.\d+)?", text)]


def test_the_reports_paper_column_is_the_one_table(tmp_path):
    data = inputs(tmp_path)
    tables = [report.synthesis_table(data), report.synthetic_data_table(data), report.order_table(data)]
    cells = [cell for table in tables for cell in paper_cells(table)]
    quoted = [n for cell in cells if not cell.endswith("%") for n in numbers(cell)]
    table_values = {number.value for number in paper.PAPER.values()}
    assert set(quoted) == table_values  # every number printed is the table's, and every one of its numbers is shown
    # the one derived figure, LAW's FID change, is computed from the table's two FIDs
    change = 100 * (paper.value("fid_law") - paper.value("fid_uniform")) / paper.value("fid_uniform")
    assert f"{change:+.1f} %" in cells
    # the abstract's own digits: 65.60, not 65.6
    assert {"65.60", "52.28", "83.2 vs 78.3", "75.3", "81.3"} <= set(cells)


def test_the_notes_say_where_the_paper_numbers_come_from(tmp_path):
    notes = " ".join(report.report_notes(inputs(tmp_path)))
    assert paper.SOURCE in notes and not NOT_IN_THE_ABSTRACT.search(notes)


def test_no_text_attributes_lawders_own_settings_to_the_paper():
    texts = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "lawder_core").rglob("*.py"))]
    found = [f"{path.relative_to(ROOT)}:{n}" for path in texts
             for n, line in enumerate(path.read_text().splitlines(), 1) if NOT_IN_THE_ABSTRACT.search(line)]
    assert found == []


def test_the_readme_opening_gives_orders_counted_parameters():
    from lawder_core.models.factory import build_segmenter

    opening = (ROOT / "README.md").read_text().split("## ", 1)[0]
    stated = int(re.search(r"([\d,]+) parameters in all", opening).group(1).replace(",", ""))
    assert stated == sum(p.numel() for p in build_segmenter("mkunet-t-order").parameters()) == 42_953


def test_weight_map_colour_bars_print_three_significant_digits():
    assert colour_bar_labels(0.180729, 5.53315) == ["0.181", "1", "5.53"]
    assert colour_bar_labels(0.2, 5.0) == ["0.2", "1", "5"]
