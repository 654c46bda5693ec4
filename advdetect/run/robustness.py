"""Robust accuracy, as RobustBench and robustness papers report it: the share of *all* audited
inputs that the model still classifies correctly under attack (so for one attack it is clean
accuracy x (1 - attack success rate)), and its worst case per input over the attacks of one
threat model and strength: an input counts as robust only if no attack of the bucket fooled it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: The norm each attack's strength is measured in, where the attack takes no ``norm`` keyword.
ATTACK_NORMS = {"cw": "L2", "deepfool": "L2", "pgdl2": "L2", "pgdrsl2": "L2", "eaden": "L1", "eadl1": "L1",
                "sparsefool": "L0", "jsma": "L0", "onepixel": "L0", "pixle": "L0"}


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a proportion ``rate`` observed on ``n`` trials."""
    if n == 0:
        return 0.0, 1.0
    center = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def threat_model(attack_name: str, params: dict[str, Any]) -> str:
    norm = params.get("norm")
    return norm if isinstance(norm, str) else ATTACK_NORMS.get(attack_name, "Linf")


def robust_accuracy(n_total: int, n_attacked: int, n_fooled: int) -> tuple[float | None, float, float]:
    """(robust accuracy, Wilson 95% low, high) of ``n_total`` audited inputs, ``n_attacked`` of them
    correctly classified and attacked, ``n_fooled`` of those fooled."""
    if n_total == 0:
        return None, 0.0, 1.0
    rate = (n_attacked - n_fooled) / n_total
    return (rate, *wilson_interval(rate, n_total))


def worst_case(cells: list[tuple[dict[str, Any], np.ndarray]], n_total: int) -> list[dict[str, Any]]:
    """Per (threat model, strength name, strength) bucket, the per-input worst case over its attacks.
    ``cells`` pairs each attack record (as a dict) with its ``fooled`` flags over the attacked inputs."""
    buckets: dict[tuple[str, str, float], list[tuple[dict[str, Any], np.ndarray]]] = {}
    for record, fooled in cells:
        key = (threat_model(record["attack_name"], record["params"]), record["strength_name"], record["strength"])
        buckets.setdefault(key, []).append((record, fooled))
    worst = []
    for (threat, strength_name, strength), members in buckets.items():
        fooled_by_any = np.logical_or.reduce([fooled for _, fooled in members])
        value, low, high = robust_accuracy(n_total, len(fooled_by_any), int(fooled_by_any.sum()))
        worst.append({"threat_model": threat, "strength_name": strength_name, "strength": strength,
                      "attacks": [r["key"] for r, _ in members], "robust_accuracy": value,
                      "robust_accuracy_ci_low": low, "robust_accuracy_ci_high": high})
    return worst
