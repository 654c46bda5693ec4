"""Killing an audit at any moment leaves no corrupt file; running it again resumes from finished cells."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import results_without_timings

SUITE = """
[[attack]]
name = "pgd"
eps = [0.1, 0.15, 0.2, 0.25, 0.3]
alpha = 0.02
steps = 15
"""


def start(tmp_path: Path, cache: str, out: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "advdetect", "audit", str(tmp_path / "suite.toml"), "--n", "120",
                             "--detectors", "confounding_gradient,msp",
                             "--cache-dir", str(tmp_path / cache), "--out", str(tmp_path / out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_cached_cells(cache: Path, process: subprocess.Popen, count: int = 1) -> None:
    deadline = time.monotonic() + 120
    while len(list(cache.rglob("*.npz"))) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the audit cached no attack cell in time"
        time.sleep(0.05)


def assert_nothing_corrupt(*folders: Path) -> None:
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.name.startswith("."):  # dot-files are temporaries, never read
                if path.suffix == ".json":
                    json.loads(path.read_text())
                elif path.suffix == ".npz":
                    with np.load(path, allow_pickle=False) as data:
                        [data[key] for key in data.files]


@pytest.fixture
def suite(tmp_path):
    (tmp_path / "suite.toml").write_text(SUITE)


@pytest.mark.slow
def test_sigkill_during_attacks_then_rerun_equals_an_uninterrupted_run(suite, tmp_path):
    process = start(tmp_path, "cache", "killed")
    wait_for_cached_cells(tmp_path / "cache", process, count=2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    cached = len(list((tmp_path / "cache").rglob("*.npz")))
    assert 2 <= cached < 5 and not (tmp_path / "killed" / "results.json").exists()
    assert_nothing_corrupt(tmp_path / "killed", tmp_path / "cache")
    assert json.loads((tmp_path / "killed" / "manifest.json").read_text())["status"] == "running"

    resumed = start(tmp_path, "cache", "resumed")
    assert resumed.wait() == 0, resumed.communicate()
    assert json.loads((tmp_path / "resumed" / "run.json").read_text())["attack_cache_hits"] >= cached
    fresh = start(tmp_path, "fresh-cache", "fresh")
    assert fresh.wait() == 0, fresh.communicate()
    assert results_without_timings(tmp_path / "resumed") == results_without_timings(tmp_path / "fresh")


@pytest.mark.slow
def test_ctrl_c_says_where_it_stopped(suite, tmp_path):
    process = start(tmp_path, "cache", "run")
    wait_for_cached_cells(tmp_path / "cache", process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "interrupted during the attack stage, cell pgd[eps=" in err and "the same command resumes" in err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["stopped_in"].startswith("the attack stage, cell pgd[eps=")
    assert_nothing_corrupt(tmp_path / "run", tmp_path / "cache")
