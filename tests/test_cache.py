import json

import pytest
from helpers import results_without_timings

from advdetect import attack_stage
from advdetect.cli import main

SUITE = """
[[attack]]
name = "fgsm"
eps = [0.3]

[[attack]]
name = "pgd"          # random start: the cache must keep its seeded result
eps = [0.3]
alpha = 0.1
steps = 2
"""


@pytest.fixture
def audit_twice(tmp_path, monkeypatch):
    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE)

    def run(name):
        args = ["audit", str(suite), "--n", "60", "--detectors", "confounding_gradient,msp", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / name)]
        assert main(args) == 0
        return tmp_path / name

    return run


def test_a_repeated_audit_does_no_attack_work_and_writes_the_same_results(audit_twice, monkeypatch):
    first = audit_twice("first")

    def no_attacks(*args, **kwargs):
        raise AssertionError("attack work in a cached run")

    monkeypatch.setattr(attack_stage, "attack_cell", no_attacks)
    second = audit_twice("second")
    assert results_without_timings(first) == results_without_timings(second)
    assert json.loads((second / "run.json").read_text())["attack_cache_hits"] == 2


def test_a_corrupt_cache_entry_is_recomputed_not_trusted(audit_twice, tmp_path, caplog):
    first = audit_twice("first")
    entries = sorted((tmp_path / "cache").rglob("*.npz"))
    assert len(entries) == 2
    entries[0].write_bytes(entries[0].read_bytes()[:200])  # truncated
    data = bytearray(entries[1].read_bytes())
    entries[1].write_bytes(bytes(data[: len(data) // 2]) + bytes(len(data) - len(data) // 2))  # zeroed tail
    second = audit_twice("second")
    assert results_without_timings(first) == results_without_timings(second)
    assert caplog.text.count("is unreadable") == 2
    assert json.loads((second / "run.json").read_text())["attack_cache_hits"] == 0
    third = audit_twice("third")  # the recomputed entries were written back whole
    assert json.loads((third / "run.json").read_text())["attack_cache_hits"] == 2


def test_an_entry_under_the_wrong_key_is_not_trusted(tmp_path):
    import torch

    from advdetect.cache import AttackCache

    cache = AttackCache(tmp_path)
    x = torch.rand(3, 1, 4, 4)
    cache.store("a" * 64, x)
    cache.path("a" * 64).rename(cache.path("b" * 64).parent.mkdir(parents=True, exist_ok=True) or cache.path("b" * 64))
    assert cache.load("b" * 64, x) is None
    cache.store("c" * 64, x)
    assert torch.equal(cache.load("c" * 64, x), x)
    assert cache.load("c" * 64, torch.rand(2, 1, 4, 4)) is None  # another shape
