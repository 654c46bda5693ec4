"""The verdict-first report: robust accuracy counted per input, and the verdict of `check` in
stdout, results.json and the report alike."""

import json
import re

import numpy as np
import pytest

from advdetect.cli.commands import main
from advdetect.errors import ExitCode
from advdetect.run.robustness import robust_accuracy, threat_model, wilson_interval, worst_case


def test_robust_accuracy_and_its_worst_case_match_a_hand_count():
    # 10 audited inputs, 8 classified correctly and attacked; FGSM fools inputs 0, 1; PGD fools 1, 2 (same
    # Linf budget); CW (another threat model) fools 0..5
    fgsm = {"key": "fgsm[eps=0.1]", "attack_name": "fgsm", "params": {}, "strength_name": "eps", "strength": 0.1}
    pgd = {**fgsm, "key": "pgd[eps=0.1]", "attack_name": "pgd"}
    cw = {"key": "cw[c=1]", "attack_name": "cw", "params": {}, "strength_name": "c", "strength": 1.0}
    fooled = {"fgsm": np.array([1, 1, 0, 0, 0, 0, 0, 0], bool), "pgd": np.array([0, 1, 1, 0, 0, 0, 0, 0], bool),
              "cw": np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)}
    assert robust_accuracy(10, 8, 2)[0] == pytest.approx(0.6)  # 8 correct - 2 fooled, of all 10
    buckets = worst_case([(fgsm, fooled["fgsm"]), (pgd, fooled["pgd"]), (cw, fooled["cw"])], 10)
    linf = next(b for b in buckets if b["threat_model"] == "Linf")
    l2 = next(b for b in buckets if b["threat_model"] == "L2")
    assert linf["attacks"] == ["fgsm[eps=0.1]", "pgd[eps=0.1]"]
    assert linf["robust_accuracy"] == pytest.approx(0.5)  # inputs 0, 1, 2 fall to one attack or the other
    assert l2["robust_accuracy"] == pytest.approx(0.2)
    assert (linf["robust_accuracy_ci_low"], linf["robust_accuracy_ci_high"]) == pytest.approx(wilson_interval(0.5, 10))
    assert threat_model("autoattack", {"norm": "L2"}) == "L2" and threat_model("pgd", {}) == "Linf"


@pytest.mark.slow
def test_check_nightly_says_the_same_verdict_in_stdout_results_and_report(tmp_path, capsys):
    code = main(["check", "nightly", "--n", "120", "--detectors", "confounding_gradient_softmax",
                 "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out.strip().splitlines()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    verdict = results["verdict"]
    assert code == (ExitCode.CHECK_FAILED if verdict["failed"] else ExitCode.OK)
    assert out[-1].startswith(f"{verdict['passed']} passed, {verdict['failed']} failed")
    checks = verdict["checks"]
    assert [f"{c['nodeid']} {c['status']} ({c['message']})" for c in checks] == out[-1 - len(checks):-1]
    html = (tmp_path / "run" / "report.html").read_text()
    status = "FAIL" if verdict["failed"] else "PASS"
    assert (f"<h2>{status}: {verdict['passed']} passed, {verdict['failed']} failed, {verdict['skipped']} skipped</h2>"
            in html)
    for attack in results["attacks"]:  # robust accuracy = clean accuracy x (1 - success rate) for one attack
        assert attack["robust_accuracy"] == pytest.approx(
            results["clean_accuracy"] * (1 - attack["attack_success_rate"]))


@pytest.mark.slow
def test_a_failing_check_opens_its_report_with_the_failed_checks(tmp_path, capsys):
    suite = tmp_path / "strict.toml"
    suite.write_text('[thresholds]\nmax_attack_success_rate = 0.01\n[[attack]]\nname = "fgsm"\neps = [0.3]\n')
    assert main(["check", str(suite), "--n", "60", "--detectors", "confounding_gradient",
                 "--out", str(tmp_path / "run")]) == ExitCode.CHECK_FAILED
    html = (tmp_path / "run" / "report.html").read_text()
    # the masking check passes
    assert re.search(r'<section id="verdict" class="verdict fail">\s*<h2>FAIL: 1 passed, 1 failed', html)
    assert "FAILED strict::fgsm[eps=0.3]::attack_success_rate (" in html
    assert '<a href="#key-numbers">Key numbers</a>' in html and "hurts most" in html
