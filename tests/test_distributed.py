"""An audit sharded over two gloo processes by torchrun gives the results of one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import numpy as np
import torch
from helpers import TINY_SUITE, results_without_timings

from advdetect.cli.commands import main
from advdetect.stages.distributed import World

AUDIT = ["--n", "60", "--n-reference", "40", "--batch-size", "16", "--detectors", "msp,kd_bu,confounding_gradient"]


def test_chunks_are_dealt_round_robin_and_cover_every_row():
    worlds = [World(rank, 3) for rank in range(3)]
    assert [w.chunks(70, 16) for w in worlds] == [[0, 3], [1, 4], [2]]
    assert World().chunks(70, 16) == [0, 1, 2, 3, 4]
    doubled = World().map_chunks(40, 16, lambda index, rows: torch.arange(40)[rows] * 2)
    assert torch.equal(doubled, torch.arange(40) * 2)
    assert World().map_chunks(0, 16, lambda index, rows: np.zeros(1)) is None


@pytest.mark.slow
def test_two_processes_give_the_results_of_one(tmp_path, monkeypatch):
    (tmp_path / "tiny.toml").write_text(TINY_SUITE)
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "audit", "tiny.toml", *AUDIT, "--no-cache", "--out", "one"]) == 0
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    # the README's command line, as written there
    command = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "advdetect", "--", "audit", "tiny.toml", *AUDIT,
               "--cache-dir", "cache", "--out", "two"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 alone says what it wrote
    assert results_without_timings(tmp_path / "two") == results_without_timings(tmp_path / "one")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "one", "tiny.toml", "two"]  # no scratch left
    # the attack cache that two processes filled serves one process
    assert main(["-q", "audit", "tiny.toml", *AUDIT, "--cache-dir", "cache", "--out", "three"]) == 0
    assert json.loads((tmp_path / "three" / "run.json").read_text())["attack_cache_hits"] == 3
    assert results_without_timings(tmp_path / "three") == results_without_timings(tmp_path / "one")
