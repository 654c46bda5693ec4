"""Detection research, round 2 (issue 12): signatures and protocols measured outside the audit.

Reads a finished audit's run folder (its correctly classified inputs and every cell's adversarial
inputs), computes candidate signatures once per input set, and reports cross-validated AUROC
for each signature and classifier under the seen, unseen and oneclass protocols, and the
learning curve of the paper's detector. Every number printed is measured in the run.

    python scripts/research_detection.py features RUN_DIR OUT.npz     # the signatures
    python scripts/research_detection.py evaluate OUT.npz [--json F]  # the tables

The model is loaded from the run folder's own ``run.json`` spec.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import GroupKFold
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from advdetect.detectors.base import fit_logistic, rank_auroc
from advdetect.signatures.features import confounding_gradient_features, prediction_instability
from advdetect.sources.models import ModelOptions, load_model
from advdetect.run.folder import cell_arrays, read_attack_records, read_run, sample_arrays

NOISE_LEVELS = (0.01, 0.02, 0.04, 0.08)
DRAWS = 8


def boundary(model: torch.nn.Module, x: torch.Tensor, batch_size=64) -> np.ndarray:
    """Top-two logit margin, the L2 norm of its input gradient, and their ratio (a first-order
    distance to the decision boundary)."""
    rows = []
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size].clone().requires_grad_(True)
        top2 = model(chunk).topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]
        grad, = torch.autograd.grad(margin.sum(), chunk)
        norm = grad.flatten(1).norm(dim=1)
        rows.append(torch.stack([margin, norm, margin / norm.clamp_min(1e-12)], 1).detach().double())
    return torch.cat(rows).numpy()


def logit_stats(model: torch.nn.Module, x: torch.Tensor, batch_size=256) -> np.ndarray:
    from advdetect.detectors.confounding_gradient import output_statistics
    from advdetect.signatures.inference import batched_logits
    return output_statistics(batched_logits(model, x, batch_size))


SIGNATURES = {
    "conf": lambda m, x: confounding_gradient_features(m, x, 64).numpy(),
    "conf_softmax": lambda m, x: confounding_gradient_features(m, x, 64, loss="softmax_bce").numpy(),
    "gran": lambda m, x: confounding_gradient_features(m, x, 64, loss="predicted_ce").numpy(),
    "logits": logit_stats,
    "boundary": boundary,
    "instability": lambda m, x: prediction_instability(m, x, NOISE_LEVELS, DRAWS).numpy(),
}


def features(run_dir: Path, out: Path) -> None:
    info = read_run(run_dir)
    model = load_model(info.model["spec"], ModelOptions.from_dict(info.model["options"])).module.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    sample = sample_arrays(run_dir)
    correct = np.flatnonzero(sample["pred"] == sample["y"])
    clean = torch.from_numpy(sample["x"][correct])
    sets = {"clean": (clean, np.ones(len(correct), bool))}
    for record in read_attack_records(run_dir, info):
        arrays = cell_arrays(run_dir, record, len(correct), clean.shape[1:])
        sets[record.attack] = (torch.from_numpy(arrays["x_adv"]), arrays["fooled"])
    saved: dict[str, np.ndarray] = {}
    for what, (x, fooled) in sets.items():
        saved[f"{what}__fooled"] = fooled
        for name, fn in SIGNATURES.items():
            started = time.perf_counter()
            rows = fn(model, x[fooled])
            value = np.full((len(x), rows.shape[1]), np.nan)
            value[fooled] = rows
            saved[f"{what}__{name}"] = value
            print(f"{what:10s} {name:14s} {time.perf_counter() - started:7.1f} s  ({int(fooled.sum())} inputs)",
                  flush=True)
    np.savez(out, **saved)


# --- evaluation ---------------------------------------------------------------------------------

def transform(name: str, value: np.ndarray) -> np.ndarray:
    """Log of the signatures, all positive (the boundary margin's sign is dropped)."""
    return np.log(np.maximum(np.abs(value), 1e-30))


COMBOS = {
    "conf": ["conf"],
    "conf_softmax": ["conf_softmax"],
    "conf+conf_softmax": ["conf", "conf_softmax"],
    "gran": ["gran"],
    "logits": ["logits"],
    "boundary": ["boundary"],
    "instability": ["instability"],
    "instability+boundary+logits": ["instability", "boundary", "logits"],
    "conf+instability": ["conf", "instability"],
    "conf_softmax+instability": ["conf_softmax", "instability"],
    "conf+conf_softmax+instability": ["conf", "conf_softmax", "instability"],
    "conf_softmax+boundary": ["conf_softmax", "boundary"],
    "conf+logits+boundary": ["conf", "logits", "boundary"],
    "conf_softmax+instability+boundary": ["conf_softmax", "instability", "boundary"],
}


def fit_classifier(kind: str, clean: np.ndarray, adversarial: np.ndarray, seed: int = 0):
    if kind == "logistic":
        return fit_logistic(clean, adversarial)[0].decision_function
    x = np.concatenate([clean, adversarial])
    y = np.r_[np.zeros(len(clean)), np.ones(len(adversarial))]
    if kind == "mlp":
        model = make_pipeline(StandardScaler(), MLPClassifier((64,), alpha=1e-2, max_iter=2000, early_stopping=True,
                                                              random_state=seed))
    elif kind == "gbm":
        model = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, random_state=seed)
    else:
        raise ValueError(kind)
    model.fit(x, y)
    return lambda z: model.predict_proba(z)[:, 1]


def matrix(data, what: str, combo: list[str]) -> np.ndarray:
    return np.concatenate([transform(name, data[f"{what}__{name}"]) for name in combo], axis=1)


def seen_auroc(data, attack: str, combo: list[str], kind: str = "logistic", folds: int = 5) -> float:
    """Out-of-fold AUROC over every fooled pair, folds kept by source input (80% fit, all test)."""
    pairs = np.flatnonzero(data[f"{attack}__fooled"])
    clean, adversarial = matrix(data, "clean", combo)[pairs], matrix(data, attack, combo)[pairs]
    clean_scores, adv_scores = np.empty(len(pairs)), np.empty(len(pairs))
    for train, test in GroupKFold(folds).split(pairs, groups=pairs):
        score = fit_classifier(kind, clean[train], adversarial[train])
        clean_scores[test], adv_scores[test] = score(clean[test]), score(adversarial[test])
    return auroc(clean_scores, adv_scores)


def auroc(clean_scores: np.ndarray, adv_scores: np.ndarray) -> float:
    labels = np.r_[np.zeros(len(clean_scores)), np.ones(len(adv_scores))]
    return rank_auroc(labels, np.r_[clean_scores, adv_scores])


def unseen_auroc(data, source: str, attack: str, combo: list[str], kind: str = "logistic") -> float:
    """Fit on the source attack's pairs of half the inputs, test on the attack's pairs of the other half."""
    n = len(data["clean__fooled"])
    half = np.random.default_rng(0).permutation(n) < n // 2
    fit = np.flatnonzero(half & data[f"{source}__fooled"])
    test = np.flatnonzero(~half & data[f"{attack}__fooled"])
    score = fit_classifier(kind, matrix(data, "clean", combo)[fit], matrix(data, source, combo)[fit])
    return auroc(score(matrix(data, "clean", combo)[test]), score(matrix(data, attack, combo)[test]))


def learning_curve(data, attack: str, combo: list[str], sizes=(20, 50, 100, 200, 300), repeats=5):
    pairs = np.flatnonzero(data[f"{attack}__fooled"])
    clean, adversarial = matrix(data, "clean", combo)[pairs], matrix(data, attack, combo)[pairs]
    curve = {}
    for size in sizes:
        if size > len(pairs) - 50:
            continue
        values = []
        for repeat in range(repeats):
            order = np.random.default_rng(repeat).permutation(len(pairs))
            fit, test = order[:size], order[size:]
            score = fit_classifier("logistic", clean[fit], adversarial[fit])
            values.append(auroc(score(clean[test]), score(adversarial[test])))
        curve[size] = (float(np.mean(values)), float(np.std(values)))
    return curve


def oneclass_raw(data, attack: str) -> dict[str, float]:
    """Raw scores, no fitting: mean flip rate (unstable), minus it (too stable), and the two-tail
    distance of the flip rate from the clean inputs' median."""
    pairs = np.flatnonzero(data[f"{attack}__fooled"])
    flips = lambda what: data[f"{what}__instability"][pairs][:, 0::2].mean(1)
    clean, adv = flips("clean"), flips(attack)
    centre = np.median(clean)
    return {"flip rate": auroc(clean, adv), "-flip rate": auroc(-clean, -adv),
            "|flip - median|": auroc(np.abs(clean - centre), np.abs(adv - centre))}


def evaluate(path: Path, out_json: Path | None, kinds: list[str]) -> None:
    data = dict(np.load(path))
    attacks = [k.split("__")[0] for k in data if k.endswith("__fooled") and not k.startswith("clean")]
    results: dict = {"seen": {}, "unseen": {}, "learning_curve": {}, "oneclass_raw": {}}
    print("seen (5-fold out-of-fold AUROC over all fooled pairs)")
    print(f"{'signature':38s} {'clf':8s} " + " ".join(f"{a:>9s}" for a in attacks))
    for kind in kinds:
        for combo_name, combo in COMBOS.items():
            if kind != "logistic" and combo_name not in ("conf", "conf_softmax+instability", "conf+instability",
                                                         "conf_softmax", "instability"):
                continue
            values = [seen_auroc(data, a, combo, kind) for a in attacks]
            results["seen"][f"{combo_name}|{kind}"] = dict(zip(attacks, values))
            print(f"{combo_name:38s} {kind:8s} " + " ".join(f"{v:9.3f}" for v in values), flush=True)
    print("\nunseen (fit on fgsm, half the inputs; test on the other half)")
    for combo_name, combo in COMBOS.items():
        values = [unseen_auroc(data, attacks[0], a, combo) for a in attacks[1:]]
        results["unseen"][combo_name] = dict(zip(attacks[1:], values))
        print(f"{combo_name:38s} " + " ".join(f"{v:9.3f}" for v in values), flush=True)
    print("\nlearning curve of the paper's detector (fit on k pairs, test on the rest; mean +- sd of 5)")
    for attack in attacks:
        curve = learning_curve(data, attack, ["conf"])
        results["learning_curve"][attack] = curve
        print(f"{attack:10s} " + "  ".join(f"{k}: {m:.3f}+-{s:.3f}" for k, (m, s) in curve.items()), flush=True)
    print("\noneclass, raw instability scores (no fitting)")
    for attack in attacks:
        values = oneclass_raw(data, attack)
        results["oneclass_raw"][attack] = values
        print(f"{attack:10s} " + "  ".join(f"{k}: {v:.3f}" for k, v in values.items()))
    if out_json:
        out_json.write_text(json.dumps(results, indent=1))


def agnostic(run_dir: Path, path: Path) -> None:
    """The attack-agnostic detector: fitted in ``prepare`` on its own adversarial examples of the
    run's reference inputs, scored on the stored signatures (softmax confounding + instability,
    the same functions and noise) of the audited clean inputs and of every attack."""
    from advdetect.detectors.confounding_gradient_agnostic import ConfoundingGradientAgnostic
    from advdetect.run.folder import reference_arrays

    info = read_run(run_dir)
    model = load_model(info.model["spec"], ModelOptions.from_dict(info.model["options"])).module.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    sample = sample_arrays(run_dir)
    reference = reference_arrays(run_dir, sample["x"].shape[1:])
    data = dict(np.load(path))
    attacks = [k.split("__")[0] for k in data if k.endswith("__fooled") and not k.startswith("clean")]
    levels = (0.02, 0.08)  # the kept variants' levels: columns of the stored four
    columns = [c for i, level in enumerate(NOISE_LEVELS) if level in levels for c in (2 * i, 2 * i + 1)]
    signature = lambda what: np.concatenate([data[f"{what}__conf_softmax"], data[f"{what}__instability"][:, columns]],
                                            axis=1)
    mixes = [((0.005, 0.015, 0.05, 0.15), (0.015, 0.05), 10), ((0.005, 0.015, 0.05, 0.15), (), 10),
             ((0.005, 0.015, 0.05, 0.15), (), 0), ((), (), 10)]
    for epsilons, iterative, boundary_steps in mixes[: int(os.environ.get("MIXES", len(mixes)))]:
        started = time.perf_counter()
        detector = ConfoundingGradientAgnostic(noise_levels=levels, epsilons=epsilons, iterative_epsilons=iterative,
                                               boundary_steps=boundary_steps)
        detector.prepare(model, torch.from_numpy(reference["x"]), torch.from_numpy(reference["y"]))
        values = []
        for attack in attacks:
            pairs = np.flatnonzero(data[f"{attack}__fooled"])
            values.append(auroc(detector.score_samples(signature("clean")[pairs]),
                                detector.score_samples(signature(attack)[pairs])))
        print(f"agnostic eps={epsilons} iterative={iterative} boundary_steps={boundary_steps} "
              f"({detector.n_self_made_} self-made, C={detector.C_}, "
              f"{time.perf_counter() - started:.0f} s): " + " ".join(f"{a} {v:.3f}" for a, v in zip(attacks, values)),
              flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("features")
    f.add_argument("run_dir", type=Path)
    f.add_argument("out", type=Path)
    e = sub.add_parser("evaluate")
    e.add_argument("features", type=Path)
    e.add_argument("--json", type=Path)
    e.add_argument("--classifiers", default="logistic,mlp,gbm")
    a = sub.add_parser("agnostic")
    a.add_argument("run_dir", type=Path)
    a.add_argument("features", type=Path)
    args = parser.parse_args(argv)
    if args.command == "features":
        features(args.run_dir, args.out)
    elif args.command == "agnostic":
        agnostic(args.run_dir, args.features)
    else:
        evaluate(args.features, args.json, args.classifiers.split(","))


if __name__ == "__main__":
    sys.exit(main())
