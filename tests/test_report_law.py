"""The pipeline report's LAW lines: LAW's departure from its prior and the judge-free hit rate beside the judge."""

from __future__ import annotations

import json
from pathlib import Path

from lawder_core.report import ReportInputs, claims, synthesis_table


def synthesis(dice: float, hit_rate: float | None) -> dict:
    adherence: dict = {"dice_mean": dice, "segmenter": {"run": "judge"}, "bins": {}, "per_case": []}
    if hit_rate is not None:
        adherence["judge_free"] = {"reference": {}}
        adherence["bins"] = {"all": {"n": 4, "hit_rate": hit_rate}}
    return {"fid": {"fid": 100.0, "kid": 0.1}, "adherence": adherence, "metadata": {}}


def test_synthesis_table_shows_laws_departure_and_the_judge_free_hit_rate(tmp_path: Path) -> None:
    runs = {w: tmp_path / w for w in ("uniform", "law")}
    for weighting, run in runs.items():
        run.mkdir()
        lines = [{"step": 10, "loss": 0.1, "law_departure": None},
                 {"step": 20, "loss": 0.1, "law_departure": 0.125 if weighting == "law" else None}]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    inputs = ReportInputs(out=tmp_path, setup="", law_runs=runs, synthetic={},
                          synthesis={"uniform": synthesis(0.4, 0.5), "law": synthesis(0.5, 0.75)},
                          segmentation=[], profiles={})
    title, header, rows = synthesis_table(inputs)
    assert "hit rate (judge-free)" in header and "LAW departure" in header
    by_name = {row[0]: dict(zip(header, row, strict=False)) for row in rows}
    assert by_name["law"]["LAW departure"] == "0.125" and by_name["uniform"]["LAW departure"] == "–"
    assert by_name["law"]["hit rate (judge-free)"] == "75.0" and by_name["uniform"]["hit rate (judge-free)"] == "50.0"
    numbers = claims(inputs)["synthesis"]
    assert numbers["law"]["law_departure"] == 0.125 and numbers["uniform"]["adherence_hit_rate"] == 0.5
    # a synthesis scored by the judge alone: no hit rate, no error
    alone = ReportInputs(**{**inputs.__dict__, "synthesis": {"uniform": synthesis(0.4, None),
                                                             "law": synthesis(0.5, None)}})
    assert {row[0]: row[4] for row in synthesis_table(alone)[2]}["law"] == "–"
