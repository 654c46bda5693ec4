"""The adaptive protocol: the suite's [adaptive] table, its rows, its gate, and the gate's one rule."""

import json

import pytest
import torch
from torch import nn

from advdetect.run.checks import FAILED, PASSED, evaluate, plan_checks, plan_from_document
from advdetect.cli.commands import main
from advdetect.errors import UsageError
from advdetect.config.suite import parse_suite, suite_from_document

PGD = """
[[attack]]
name = "pgd"
eps = [0.05, 0.1, 0.2]
alpha = 0.025
steps = 3
"""


def test_an_adaptive_table_defaults_to_the_suites_middle_pgd_budget():
    suite = parse_suite(PGD + "[adaptive]\n", "s", "s.toml")
    assert suite.adaptive is not None
    adaptive = suite.adaptive
    assert (adaptive.attack, adaptive.eps, adaptive.norm, adaptive.steps) == ("pgd", 0.1, "Linf", 100)
    assert adaptive.step_size == pytest.approx(2.5 * 0.1 / 100)
    assert suite_from_document(suite.to_dict(), "s", "s").to_dict() == suite.to_dict()


@pytest.mark.parametrize("table, message", [
    ("[adaptive]\nbudget = 1", "unknown key(s) budget"),
    ("[adaptive]\neps = 0.3", "eps 0.3 is not one of attack pgd's strengths"),
    ("[adaptive]\nmethod = 'magic'", "method must be one of selective, orthogonal, combined"),
    ("[adaptive]\nsteps = 0", "steps must be a whole number above 0"),
    ("[adaptive]\nsteps = 2.5", "steps must be a whole number above 0"),
    ("[adaptive]\nalpha = -1", "alpha must be a finite number above 0"),
    ("[adaptive]\nnorm = 'L2'", "norm 'L2' differs from attack pgd's (Linf)"),
    ("[adaptive]\ndetectors = 'msp'", "detectors must be a list of detector names"),
    ("[adaptive]\nattack = 'fgsm'", "attack 'fgsm' is not a pgd or pgdl2 attack"),
    ("adaptive = 3", "'adaptive' must be a table"),
    ("[thresholds]\nmax_undetected_success_rate = 0.2", "add an [adaptive] table"),
    ("[thresholds]\nmax_undetected_success_rate = 0.2\n[adaptive]\ndetectors = ['msp']",
     "checks confounding_gradient, which [adaptive] detectors leaves out"),
])
def test_bad_adaptive_settings_are_one_line(table, message):
    with pytest.raises(UsageError) as caught:
        parse_suite(table + "\n" + PGD if not table.startswith("[adaptive]") else PGD + table, "s", "s.toml")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_suite_without_pgd_cannot_have_an_adaptive_table():
    with pytest.raises(UsageError, match="add a pgd or pgdl2 attack of this suite with an eps axis"):
        parse_suite('[[attack]]\nname = "fgsm"\neps = [0.1]\n[adaptive]\n', "s", "s.toml")


@pytest.mark.slow
def test_bad_adaptive_settings_exit_2_before_any_work(tmp_path, capsys):
    suite = tmp_path / "bad.toml"
    suite.write_text(PGD + "[adaptive]\nsteps = -5\n")
    out = tmp_path / "run"
    assert main(["audit", str(suite), "--out", str(out)]) == 2
    assert "steps must be a whole number above 0" in capsys.readouterr().err
    assert not out.exists()
    suite.write_text(PGD + "[adaptive]\ndetectors = ['msp']\n")
    assert main(["audit", str(suite), "--detectors", "energy", "--out", str(out)]) == 2
    assert "names detector(s) msp, which this audit does not run" in capsys.readouterr().err
    assert not out.exists()


def _document(adaptive_rows, masking=None):
    return {"attacks": [], "results": adaptive_rows, "gradient_masking": masking}


def test_the_adaptive_threshold_passes_fails_and_never_passes_without_its_row():
    suite = parse_suite(PGD + "[thresholds]\ndetector = 'msp'\nmax_undetected_success_rate = 0.3\n[adaptive]\n",
                        "s", "s")
    (check,) = [c for c in plan_checks(suite) if c.metric == "undetected_success_rate"]
    assert check.nodeid == "s::adaptive[eps=0.1]::undetected_success_rate"
    row = {"protocol": "adaptive", "detector": "msp", "strength": 0.1, "undetected_success_rate": 0.2}
    assert evaluate(check, _document([row])).status == PASSED
    assert evaluate(check, _document([{**row, "undetected_success_rate": 0.9}])).status == FAILED
    assert evaluate(check, _document([{**row, "detector": "energy"}])).status == FAILED


def test_a_threshold_on_a_detector_the_run_lacks_is_a_usage_error_and_never_a_pass():
    suite = parse_suite(PGD + "[thresholds]\ndetector = 'msp'\nmin_auroc = 0.9\n", "s", "s")
    with pytest.raises(UsageError, match="check detector\\(s\\) msp, which this audit does not run"):
        plan_checks(suite, ("energy",))
    (check,) = [c for c in plan_checks(suite, ("msp",)) if c.strength == 0.1]
    outcome = evaluate(check, {"attacks": [], "results": []})
    assert outcome.status == FAILED and "did not run" in outcome.message


def test_a_robustness_threshold_brings_the_gradient_masking_check():
    document = {"description": "", "thresholds": {"max_attack_success_rate": 0.5},
                "attack": [{"id": "pgd", "name": "pgd", "eps": [0.1]}]}
    checks = plan_from_document(document, "s")
    (masking,) = [c for c in checks if c.metric == "robustness"]
    assert masking.nodeid == "s::gradient_masking::robustness"
    quiet = {"eps": 0.1, "n_inputs": 64,
             "symptoms": [{"name": "vanishing_gradients", "observed": False, "detail": "x"}]}
    loud = {**quiet, "symptoms": [{"name": "vanishing_gradients", "observed": True, "detail": "zero on 64 of 64"}]}
    assert evaluate(masking, _document([], quiet)).status == PASSED
    outcome = evaluate(masking, _document([], loud))
    assert outcome.status == FAILED
    assert outcome.message.startswith("robustness unverified: gradient masking suspected: vanishing_gradients")
    assert evaluate(masking, _document([], None)).status == FAILED
    assert not [c for c in plan_from_document({**document, "thresholds": {"min_auroc": 0.5}}, "s")
                if c.metric == "robustness"]


class Rounded(nn.Module):
    """The embedded CNN behind an input-rounding forward: its input gradient is zero, so gradient
    attacks fail and it reads as robust (Athalye, Carlini and Wagner 2018)."""

    def __init__(self) -> None:
        super().__init__()
        from advdetect.sources.embedded import default_model

        self.net = default_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 255) / 255)


@pytest.mark.slow
def test_a_model_that_masks_its_gradients_fails_the_robustness_gate(tmp_path):
    import advdetect

    suite = tmp_path / "gate.toml"
    suite.write_text('[thresholds]\ndetector = "msp"\nmax_attack_success_rate = 0.5\n'
                     '[[attack]]\nname = "pgd"\neps = [0.1]\nalpha = 0.025\nsteps = 10\n')
    result = advdetect.audit(Rounded(), "default", suite=str(suite), n=64, detectors=["msp"], cache=False,
                             out=tmp_path / "rounded")
    statuses = {o.check.metric: o for o in result.verdict.outcomes}
    assert statuses["attack_success_rate"].status == PASSED  # gradient attacks find nothing...
    assert statuses["robustness"].status == FAILED  # ...and the gate says why it is no pass
    assert "gradient masking suspected: vanishing_gradients" in statuses["robustness"].message
    assert not result.verdict.passed
    assert "gradient masking" in (tmp_path / "rounded" / "report.html").read_text()


ADAPTIVE_SUITE = PGD.replace("steps = 3", "steps = 10") + """
[thresholds]
detector = "msp"
max_undetected_success_rate = 0.0
[adaptive]
steps = 20
"""


@pytest.mark.slow
def test_an_adaptive_audit_writes_rows_that_beat_the_oblivious_attack_and_gates_them(tmp_path, capsys):
    suite = tmp_path / "adaptive.toml"
    suite.write_text(ADAPTIVE_SUITE)
    out = tmp_path / "run"
    code = main(["check", str(suite), "--n", "120", "--detectors", "msp,energy", "--no-cache", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 1 and "adaptive[eps=0.1]::undetected_success_rate FAILED (msp lets 0." in printed
    document = json.loads((out / "results.json").read_text())
    adaptive = [r for r in document["results"] if r["protocol"] == "adaptive"]
    assert sorted(r["detector"] for r in adaptive) == ["energy", "msp"]
    for row in adaptive:
        assert row["attack"] == "adaptive" and row["strength"] == 0.1
        for field in ("tpr_at_5fpr", "undetected_success_rate", "auroc", "oblivious_tpr_at_5fpr",
                      "oblivious_undetected_success_rate", "oblivious_auroc", "oblivious_attack_success_rate"):
            assert 0 <= row[field] <= 1, field
        assert row["undetected_success_rate"] >= row["oblivious_undetected_success_rate"]  # never weaker
        assert row["detector_params"]["threshold"] is not None and row["detector_params"]["gradient"] == "exact"
    # and stronger somewhere: knowing the detector gets more inputs past it
    assert any(r["undetected_success_rate"] > r["oblivious_undetected_success_rate"] for r in adaptive)
    seen = [r for r in document["results"] if r["protocol"] == "seen" and r["auroc"] is not None]
    assert seen and all(r["tpr_at_5fpr"] is not None and r["undetected_success_rate"] is not None for r in seen)
    assert set(document["adaptive_timings"]) == {"msp", "energy"}
    html = (out / "report.html").read_text()
    assert "Against an attacker who knows the detector" in html and "Selective PGD (Linf, eps 0.1, 20 steps)" in html
