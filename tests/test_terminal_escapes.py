"""A file name is data, not a terminal command: control characters in names (ANSI colour and cursor sequences, a
bell, a carriage return) are shown as escapes in lawder's messages and logs, never sent to the terminal raw."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lawder_cli.common import PrintableFormatter, printable
from lawder_cli.main import app
from tests.helpers import runner, untrained_checkpoint, write_pair_folder

pytestmark = pytest.mark.faults

HOSTILE = "\x1b[2J\x1b[31mred\x07\rclear\x9b"


def test_control_characters_become_escapes_and_text_stays():
    assert printable(HOSTILE) == "\\x1b[2J\\x1b[31mred\\x07\\rclear\\x9b"
    assert printable("plain ünïcode\tand\nlines") == "plain ünïcode\tand\nlines"


def test_an_error_naming_a_hostile_file_prints_no_escape_sequence(tmp_path: Path):
    result = runner.invoke(app, ["inspect", str(tmp_path / f"{HOSTILE}.h5")])
    assert result.exit_code == 3
    assert "\x1b" not in result.output and "\x07" not in result.output and "\x9b" not in result.output
    assert "\\x1b[2J\\x1b[31mred" in result.output  # still named, readably


def test_a_skipped_input_with_a_hostile_name_is_logged_escaped(tmp_path: Path, caplog):
    images, _ = write_pair_folder(tmp_path / "in", 2)
    (images / f"{HOSTILE}.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING):
        result = runner.invoke(app, ["predict", str(images), "--run", str(untrained_checkpoint(tmp_path / "ck")),
                                     "-o", str(tmp_path / "p")])
    assert result.exit_code == 3
    assert "\x1b" not in result.output  # the error line that lists the skip
    warning = next(r for r in caplog.records if "skipped" in r.getMessage())
    shown = PrintableFormatter("%(message)s").format(warning)  # what the command's log handler prints
    assert HOSTILE in warning.getMessage() and "\x1b" not in shown and "\\x1b[2J" in shown
    assert logging.lastResort is None or isinstance(logging.lastResort.formatter, PrintableFormatter)
