"""The detection stage's protocols, the noisy-negative control and out-of-distribution runs."""

import json

import pytest
import torch

from advdetect.cli.commands import main
from advdetect.stages.detect import noisy_copies, unseen_source
from advdetect.run.records import AttackRecord

SUITE = """
[[attack]]
name = "fgsm"
eps = [0.2, 0.3]

[[attack]]
name = "pgd"
eps = [0.3]
alpha = 0.1
steps = 3

[detector.cg_softmax]
base = "confounding_gradient"
loss = "softmax_bce"
"""


def record(attack: str, strength: float) -> AttackRecord:
    return AttackRecord(key=f"{attack}[eps={strength}]", slug="", attack=attack, attack_name=attack,
                        strength_name="eps", strength=strength, params={}, seed=0, n_attacked=1, n_fooled=1,
                        attack_success_rate=1.0, mean_linf=None, max_linf=None, mean_l2=None, max_l2=None, seconds=0.0)


def test_unseen_protocol_fits_on_the_first_attack_at_its_middle_strength():
    records = [record("fgsm", 0.1), record("fgsm", 0.2), record("fgsm", 0.3), record("pgd", 0.1)]
    assert unseen_source(records) is records[1]
    assert unseen_source(records[3:]) is records[3]


def test_noisy_copies_sit_as_far_as_the_adversarial_examples():
    clean = torch.full((3, 1, 4, 4), 0.5)
    adversarial = clean + torch.tensor([0.01, 0.02, 0.0]).view(3, 1, 1, 1)
    noisy = noisy_copies(clean, adversarial, seed=0)
    torch.testing.assert_close((noisy - clean).flatten(1).norm(dim=1), torch.tensor([0.04, 0.08, 0.0]))
    assert not torch.equal(torch.sign(noisy - clean)[0], torch.sign(adversarial - clean)[0])


@pytest.mark.slow
def test_noisy_negatives_and_suite_variants_in_an_audit(tmp_path):
    (tmp_path / "suite.toml").write_text(SUITE)
    assert main(["audit", str(tmp_path / "suite.toml"), "--n", "80", "--detectors", "msp,cg_softmax",
                 "--noisy-negatives", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = [r for r in results["results"] if r["reason"] is None]
    assert {r["detector"] for r in rows} == {"msp", "cg_softmax"}
    assert {r["protocol"] for r in rows if r["detector"] == "cg_softmax"} == {"seen", "unseen"}
    assert all(r["negatives"] == "clean+noise" and r["n_clean"] == 2 * r["n_adv"] for r in rows)
    assert results["suite"]["document"]["detector"]["cg_softmax"] == {"base": "confounding_gradient",
                                                                        "loss": "softmax_bce"}


@pytest.mark.slow
def test_ood_run_scores_every_set_with_the_same_detectors_and_report(tmp_path, capsys):
    assert main(["ood", "--n", "60", "--detectors", "msp,mahalanobis,confounding_gradient_oneclass",
                 "--out", str(tmp_path / "ood")]) == 0
    results = json.loads((tmp_path / "ood" / "results.json").read_text())
    assert [a["params"]["set"] for a in results["attacks"]] == ["uniform", "corrupted", "photos", "digits"]
    rows = {(r["attack"], r["strength"], r["detector"], r["protocol"]): r for r in results["results"]}
    uniform = rows[("ood", 0.0, "mahalanobis", "oneclass")]
    assert uniform["reason"] is None and uniform["auroc"] > 0.9 and uniform["n_adv"] == uniform["n_clean"]
    assert rows[("ood", 0.0, "mahalanobis", "unseen")]["detector_params"]["fitted_on"] == "ood[photos]"
    html = (tmp_path / "ood" / "report.html").read_text()
    assert "uniform" in html and "digits" in html
    assert "uniform" in capsys.readouterr().out


@pytest.mark.slow
def test_ood_bad_set_is_one_line_and_no_output(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["ood", "--n", "20", "--sets", "uniform,nope"]) == 2
    assert "unknown out-of-distribution set 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()


@pytest.mark.slow
def test_cross_fitting_tests_every_fooled_pair_and_fits_on_the_other_folds(tmp_path):
    (tmp_path / "suite.toml").write_text(SUITE)
    common = [str(tmp_path / "suite.toml"), "--n", "80", "--detectors", "msp,confounding_gradient", "--cache-dir",
              str(tmp_path / "cache")]
    assert main(["audit", *common, "--fit-folds", "3", "--out", str(tmp_path / "folds")]) == 0
    assert main(["audit", *common, "--out", str(tmp_path / "split")]) == 0
    folds, split = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("folds", "split"))
    assert folds["fit_folds"] == 3 and split["fit_folds"] == 0
    fooled = {a["key"]: a["n_fooled"] for a in folds["attacks"]}
    for row in folds["results"]:
        key = f"{row['attack']}[{row['strength_name']}={row['strength']:g}]"
        assert row["n_adv"] == fooled[key]  # every fooled pair is tested, under every protocol
        if row["detector"] == "confounding_gradient":
            assert len(row["detector_params"]["C"]) == 3  # one fit per fold
            fit_on = fooled[row["detector_params"].get("fitted_on", key)]
            assert fit_on // 2 < row["n_fit"] < fit_on  # about 2/3 of the pairs: the fewest of any fold
    split_rows = [r for r in split["results"] if r["detector"] == "confounding_gradient" and r["protocol"] == "seen"]
    fold_rows = [r for r in folds["results"] if r["detector"] == "confounding_gradient" and r["protocol"] == "seen"]
    assert all(f["n_fit"] > s["n_fit"] and f["n_adv"] > s["n_adv"] for f, s in zip(fold_rows, split_rows))
    assert "cross-fitted over 3 folds" in (tmp_path / "folds" / "report.html").read_text()
    assert main(["audit", *common, "--fit-folds", "1", "--out", str(tmp_path / "bad")]) == 2
    assert main(["audit", *common, "--fit-folds", "81", "--out", str(tmp_path / "bad")]) == 2  # more folds than inputs
    assert not (tmp_path / "bad").exists()
    # folds holding no fooled input of a cell (nearly one input per fold) are skipped, not scored empty
    assert main(["audit", *common, "--fit-folds", "70", "--out", str(tmp_path / "many")]) == 0
    many = json.loads((tmp_path / "many" / "results.json").read_text())
    assert all(r["n_adv"] == fooled[f"{r['attack']}[{r['strength_name']}={r['strength']:g}]"] for r in many["results"])
