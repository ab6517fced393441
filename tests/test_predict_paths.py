"""`lawder predict`'s paths (issue 16, item 9): names from data, symbolic links in the output and input, inputs that
fail one by one. RELIABILITY.md row 9 cites these tests."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from lawder_cli.main import app
from lawder_core.data.h5 import H5Writer
from lawder_core.errors import DataError
from lawder_core.models.factory import build_segmenter, save_segmenter
from lawder_core.paths import safe_name, unique_names
from lawder_core.predict.images import predict_to_folder
from lawder_core.predict.output import SUMMARY, SkippedInputs
from lawder_core.predictor import load_predictor
from tests.helpers import runner

pytestmark = pytest.mark.faults
ODD_CASES = ["../evil", "a/b", "-rf", "..", "", "/etc/passwd", ".hidden", "naïve case", "a\\b:c*?"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("run")
    save_segmenter(build_segmenter("mkunet-t").eval(), folder / "best", extra={"train_config": {"size": 32}})
    return folder


@pytest.fixture(scope="module")
def predictor(run):
    return load_predictor(run, mode="eager")


def odd_h5(path, cases=ODD_CASES):
    rng = np.random.default_rng(0)
    with H5Writer(path, height=16, width=16, channels=3, label_names=["background", "lesion"], source="t",
                  compression=None) as writer:
        for case in cases:
            writer.add(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), np.zeros((16, 16), np.uint8), case, "test")
    return path


def image_folder(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / name)
    return folder


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_safe_names_are_one_harmless_component():
    for name in ODD_CASES + ["a" * 500, "-.-", "x\x00y", "tab\there", "é" * 300]:
        safe = safe_name(name)
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", safe), (name, safe)
        assert len(safe) <= 100 and safe not in (".", "..")
    assert safe_name("../evil") == "_evil" and safe_name("-rf") == "rf" and safe_name("") == "unnamed"
    assert safe_name("case_00012") == "case_00012"  # ordinary names are kept as they are
    assert safe_name("a" * 500) != safe_name("a" * 499 + "b")  # cut names keep a hash of the whole
    assert unique_names(["a b", "a_b", "A_B", "a/b"]) == ["a_b", "a_b-2", "A_B-3", "a_b-4"]


def test_odd_case_ids_become_files_inside_masks_only(predictor, tmp_path):
    data = odd_h5(tmp_path / "odd.h5")
    out = tmp_path / "work" / "out"
    result = predict_to_folder(predictor, data, out, split="test")
    assert result["written"] == len(ODD_CASES) and result["skipped"] == 0
    masks, overlays = sorted((out / "masks").iterdir()), sorted((out / "overlays").iterdir())
    assert len(masks) == len(overlays) == len(ODD_CASES)
    for path in masks + overlays:
        assert path.is_file() and path.parent.parent == out and re.fullmatch(r"\d{5}_[A-Za-z0-9._-]+\.png", path.name)
    assert [p.name for p in masks][:3] == ["00000__evil.png", "00001_a_b.png", "00002_rf.png"]
    assert files_under(tmp_path / "work") == sorted(
        ["out", "out/masks", "out/overlays", f"out/{SUMMARY}"] + [f"out/masks/{p.name}" for p in masks]
        + [f"out/overlays/{p.name}" for p in overlays])  # nothing next to OUT, nothing deeper
    assert not (tmp_path / "evil.png").exists() and not list(tmp_path.glob("*evil*"))


def test_a_planted_symlink_in_masks_is_not_written_through(run, tmp_path):
    data = odd_h5(tmp_path / "d.h5", ["c0", "c1"])
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    out = tmp_path / "out"
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "00001_c1.png").symlink_to(outside)
    for force in ([], ["--force"]):
        result = runner.invoke(app, ["predict", str(data), "--run", str(run), "-o", str(out), *force])
        if not force:
            assert result.exit_code == 2  # not empty: --force is asked for first
            continue
        assert result.exit_code == 3, result.output
        assert "00001_c1.png" in result.output and "symbolic link" in result.output
        assert "Traceback" not in result.output
    assert outside.read_text() == "keep me" and (out / "masks" / "00001_c1.png").is_symlink()
    assert not (out / "masks" / "00000_c0.png").exists()  # refused before the first write


@pytest.mark.parametrize("linked", ["out", "masks", "overlays", "summary"])
def test_linked_output_folders_and_summary_are_refused_even_with_force(predictor, tmp_path, linked):
    data = odd_h5(tmp_path / "d.h5", ["c0"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    if linked == "out":
        out.symlink_to(elsewhere)
    else:
        out.mkdir()
        target = {"masks": out / "masks", "overlays": out / "overlays", "summary": out / SUMMARY}[linked]
        target.symlink_to(elsewhere / "x" if linked == "summary" else elsewhere)
    with pytest.raises(DataError, match="symbolic link"):
        predict_to_folder(predictor, data, out, force=True)
    assert os.listdir(elsewhere) == []


def test_input_links_leading_outside_are_skipped_unless_followed(run, tmp_path, caplog):
    images = image_folder(tmp_path / "in", ["a.png", "b.png"])
    image_folder(tmp_path / "secret", ["s.png"])
    (images / "link_out.png").symlink_to(tmp_path / "secret" / "s.png")
    (images / "link_in.png").symlink_to(images / "a.png")  # a link inside the folder is fine
    result = runner.invoke(app, ["predict", str(images), "--run", str(run), "-o", str(tmp_path / "p"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "p" / SUMMARY).read_text())
    assert summary["links_not_followed"] == ["link_out.png"] and summary["written"] == 3
    assert sorted(p.name for p in (tmp_path / "p" / "masks").iterdir()) == ["a.png", "b.png", "link_in.png"]
    assert "not following 1 symbolic link" in caplog.text and "link_out.png" in caplog.text
    followed = runner.invoke(app, ["predict", str(images), "--run", str(run), "-o", str(tmp_path / "q"),
                                   "--follow-symlinks"])
    assert followed.exit_code == 0, followed.output
    assert (tmp_path / "q" / "masks" / "link_out.png").is_file()
    only_links = tmp_path / "only"
    only_links.mkdir()
    (only_links / "s.png").symlink_to(tmp_path / "secret" / "s.png")
    refused = runner.invoke(app, ["predict", str(only_links), "--run", str(run), "-o", str(tmp_path / "r")])
    assert refused.exit_code == 3 and "--follow-symlinks" in refused.output


def test_corrupt_images_are_skipped_listed_and_exit_3(run, tmp_path):
    images = image_folder(tmp_path / "in", ["good1.png", "good2.jpg", "-dash name.png"])
    (images / "empty.png").write_bytes(b"")
    (images / "truncated.png").write_bytes((images / "good1.png").read_bytes()[:60])
    (images / "text.png").write_text("not an image")
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(images), "--run", str(run), "-o", str(out)])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    assert "3 of 6 images could not be segmented" in result.output and SUMMARY in result.output
    assert "segmented 3 of 6 images" in result.output  # the one-line summary comes first
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["dash_name.png", "good1.png", "good2.png"]
    summary = json.loads((out / SUMMARY).read_text())
    assert (summary["images"], summary["written"], summary["skipped"], summary["complete"]) == (6, 3, 3, True)
    assert {s["input"] for s in summary["skipped_inputs"]} == {"empty.png", "truncated.png", "text.png"}
    assert all("cannot read" in s["reason"] for s in summary["skipped_inputs"])
    as_json = runner.invoke(app, ["predict", str(images), "--run", str(run), "-o", str(out), "--force", "--json"])
    assert as_json.exit_code == 3 and json.loads(as_json.stdout)["skipped"] == 3  # the result still on stdout


def test_an_unreadable_hdf5_sample_is_skipped_and_the_rest_written(predictor, tmp_path):
    import h5py

    data = odd_h5(tmp_path / "d.h5", ["c0", "c1", "c2", "c3"])
    with h5py.File(data) as f:
        offset = f["images"].id.get_chunk_info(2).byte_offset  # the third image's bytes on disk
    raw = bytearray(data.read_bytes())
    raw[offset + 100] ^= 0xFF
    data.write_bytes(bytes(raw))
    out = tmp_path / "out"
    with pytest.raises(SkippedInputs, match="sample 2") as caught:
        predict_to_folder(predictor, data, out)
    assert caught.value.exit_code == 3
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["00000_c0.png", "00001_c1.png", "00003_c3.png"]
    summary = json.loads((out / SUMMARY).read_text())
    assert (summary["written"], summary["skipped"]) == (3, 1) and "c2" in summary["skipped_inputs"][0]["input"]


def test_an_aborted_run_leaves_an_incomplete_summary(predictor, tmp_path, monkeypatch):
    data = odd_h5(tmp_path / "d.h5", ["c0", "c1", "c2"])
    out = tmp_path / "out"
    predict_to_folder(predictor, data, out)
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    (out / "overlays" / "00002_c2.png").unlink()
    # a link that appears during the run (after the checks before the first write) is still refused at its write
    from lawder_core.predict import images as predict_module

    real = predict_module.write_png

    def plant_then_write(array, path):
        if path.name == "00001_c1.png" and path.parent.name == "masks":
            (out / "overlays" / "00002_c2.png").symlink_to(outside)
        return real(array, path)

    monkeypatch.setattr(predict_module, "write_png", plant_then_write)
    with pytest.raises(DataError, match="00002_c2.png"):
        predict_to_folder(predictor, data, out, force=True)
    assert outside.read_text() == "keep me"
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["complete"] is False and "symbolic link" in summary["error"] and summary["written"] == 2
