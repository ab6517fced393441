"""`make test` relies on pytest-xdist's groups (one local Ray at a time, a costly fixture built once): they must
take effect with the pytest and xdist this project installs, not be dropped silently."""

import subprocess
import sys
from pathlib import Path

CONFTEST = '''
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        if item.name.startswith("test_grouped"):
            item.add_marker(pytest.mark.xdist_group("together"))
'''
TESTS = '''
import os, time

def record(name):
    time.sleep(0.3)  # long enough that a free worker would take the next test
    with open(os.path.join(os.path.dirname(__file__), name), "w") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"])

def test_grouped_a(): record("a")
def test_grouped_b(): record("b")
def test_grouped_c(): record("c")
def test_free_d(): record("d")
def test_free_e(): record("e")
'''


def test_a_group_added_at_collection_runs_on_one_worker(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_groups.py").write_text(TESTS)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup",
                             "-p", "no:cacheprovider", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    workers = {name: (tmp_path / name).read_text() for name in "abcde"}
    assert workers["a"] == workers["b"] == workers["c"], workers
    assert len(set(workers.values())) == 2, workers  # the free tests still go to the other worker
