"""Audits as tests: check's verdicts and JUnit output, run history, trends and regressions."""

import json
import re
from pathlib import Path
from xml.etree import ElementTree

import pytest

from advdetect.cli.commands import main
from advdetect.errors import ExitCode
from advdetect.run.checks import FAILED, PASSED, SKIPPED, Check, Outcome, Verdict, judge, junit_xml
from advdetect.run.storage import read_json, write_json

SUITE = """
[thresholds]
min_auroc = {min_auroc}
max_attack_success_rate = {max_asr}

[[attack]]
name = "fgsm"
eps = [0.3]

[[attack]]
name = "pgd"
eps = [0.02, 0.3]
alpha = 0.1
steps = 2
[attack.thresholds]
detector = "msp"
"""


@pytest.fixture
def suite_file(tmp_path):
    def write(min_auroc=0.5, max_asr=1.0):
        path = tmp_path / f"gate_{round(100 * min_auroc)}_{round(100 * max_asr)}.toml"
        path.write_text(SUITE.format(min_auroc=min_auroc, max_asr=max_asr))
        return str(path)

    return write


def check(suite, tmp_path, name, *extra):
    return main(["check", suite, "--n", "60", "--detectors", "confounding_gradient,msp",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "runs" / name), *extra])


def test_one_verdict_counts_for_the_exit_code_the_closing_line_junit_and_results_json():
    checks = [Check("s", "fgsm", f"fgsm[eps={eps}]", eps, "attack_success_rate", 0.5) for eps in (0.1, 0.2, 0.3, 0.4)]
    verdict = Verdict(tuple(Outcome(check, status, value, "m") for check, status, value in zip(
        checks, (PASSED, FAILED, SKIPPED, PASSED), (0.2, 0.9, None, 0.1))))
    assert verdict.counts == {"passed": 2, "failed": 1, "skipped": 1} and not verdict.passed
    assert verdict.exit_code == ExitCode.CHECK_FAILED and str(verdict) == "2 passed, 1 failed, 1 skipped"
    assert verdict.closing_line(1.25) == "2 passed, 1 failed, 1 skipped in 1.2s"
    record = verdict.record().to_dict()  # as results.json keeps it
    assert {k: record[k] for k in ("passed", "failed", "skipped")} == verdict.counts
    assert [c["status"] for c in record["checks"]] == ["PASSED", "FAILED", "SKIPPED", "PASSED"]
    assert record["checks"][1] == {"nodeid": "s::fgsm[eps=0.2]::attack_success_rate", "status": "FAILED",
                                   "value": 0.9, "message": "m"}
    suite = ElementTree.fromstring(junit_xml("s", verdict, 1.0)).find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("4", "1", "1")

    passing = Verdict(verdict.outcomes[2:])  # a skipped check does not fail, as in pytest
    assert passing.passed and passing.exit_code == ExitCode.OK
    assert passing.closing_line(0) == "1 passed, 0 failed, 1 skipped in 0.0s"
    assert Verdict(verdict.outcomes[3:]).closing_line(0) == "1 passed, 0 failed in 0.0s"
    document = {"attacks": [{"attack": "fgsm", "strength": 0.1, "attack_success_rate": 0.6}], "results": []}
    assert judge(checks[:1], document).counts == {"passed": 0, "failed": 1, "skipped": 0}


@pytest.mark.slow
def test_check_passes_and_fails_with_pytest_style_output(suite_file, tmp_path, capsys):
    assert check(suite_file(), tmp_path, "pass", "--junitxml", str(tmp_path / "pass.xml")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("gate_50_100::fgsm[eps=0.3]::attack_success_rate PASSED (")
    assert "gate_50_100::fgsm[eps=0.3]::auroc PASSED (confounding_gradient " in lines[1]
    assert "::pgd[eps=0.02]::auroc SKIPPED (" in "\n".join(lines)
    assert "::pgd[eps=0.3]::auroc PASSED (msp " in "\n".join(lines)  # the per-attack detector override
    assert "gate_50_100::gradient_masking::robustness PASSED (no gradient-masking symptom in 5 checks)" in lines
    assert lines[-1].startswith("6 passed, 0 failed, 1 skipped in ") and lines[-1].endswith("s")

    assert check(suite_file(min_auroc=0.999, max_asr=0.5), tmp_path, "fail", "--junitxml", str(tmp_path / "f.xml")) == 1
    out = capsys.readouterr().out
    assert re.search(r"::pgd\[eps=0.3\]::attack_success_rate FAILED \(0\.\d{3} > 0.5\)", out)
    assert re.search(r"::pgd\[eps=0.3\]::auroc FAILED \(msp 0\.\d{3} < 0.999\)", out)
    last = out.strip().splitlines()[-1]
    assert "failed" in last and not last.startswith("0 passed, 0 failed")
    suite = ElementTree.parse(tmp_path / "f.xml").getroot().find("testsuite")
    assert int(suite.get("failures")) >= 1 and int(suite.get("tests")) == 7 and suite.get("skipped") == "1"
    failure = suite.find("testcase/failure")
    assert failure is not None and "FAILED" in failure.text
    manifest = read_json(tmp_path / "runs" / "fail" / "manifest.json")
    assert manifest["status"] == "complete" and manifest["verdict"]["failed"] >= 1


@pytest.mark.slow
def test_check_input_errors_exit_2(suite_file, tmp_path, capsys):
    assert main(["check", "default", "--out", str(tmp_path / "x")]) == 2
    assert "has no thresholds to check" in capsys.readouterr().err
    assert main(["check", suite_file(), "--detectors", "confounding_gradient", "--out", str(tmp_path / "x")]) == 2
    assert "check detector(s) msp, which this audit does not run" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_history_trend_compare_and_a_planted_regression(suite_file, tmp_path, capsys):
    suite = suite_file()
    assert check(suite, tmp_path, "a") == 0 and check(suite, tmp_path, "b") == 0
    capsys.readouterr()
    runs = tmp_path / "runs"
    for name in ("a", "b"):
        manifest = read_json(runs / name / "manifest.json")
        assert manifest["status"] == "complete" and len(manifest["model_sha256"]) == 64
        assert {"data_sha256", "suite_sha256", "seed", "versions", "device", "started_at", "ended_at",
                "timings"} <= set(manifest)
    assert main(["history", str(runs)]) == 0
    history = capsys.readouterr().out.splitlines()
    assert history[0].split()[:3] == ["run", "started", "status"]
    assert [line.split()[0] for line in history[1:]] == ["a", "b"]
    assert main(["history", str(runs), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [Path(r["run_dir"]).name for r in listed] == ["a", "b"] and {r["status"] for r in listed} == {"complete"}

    html = (runs / "b" / "report.html").read_text()
    assert '<h2 id="trend">Trend</h2>' in html and "1 earlier run(s)" in html and "0 regression(s)" in html
    assert "<h2 id=\"trend\">" not in (runs / "a" / "report.html").read_text()
    assert main(["compare", str(runs / "a"), str(runs / "b")]) == 0
    assert "0 regression(s)" in capsys.readouterr().out

    # plant a regression: in the earlier run a, msp detected pgd[eps=0.3] far better than b now does
    results = read_json(runs / "a" / "results.json")
    row = next(r for r in results["results"]
               if r["attack"] == "pgd" and r["strength"] == 0.3 and r["detector"] == "msp")
    row.update(auroc=0.999, auroc_ci_low=0.99, auroc_ci_high=1.0)
    write_json(runs / "a" / "results.json", results)
    assert main(["compare", str(runs / "a"), str(runs / "b"), "--json"]) == 1
    differences = json.loads(capsys.readouterr().out)
    flagged = [d for d in differences["differences"] if d["regression"]]
    assert differences["regressions"] == 1 and len(flagged) == 1
    assert flagged[0]["detector"] == "msp" and flagged[0]["before"] == 0.999 and flagged[0]["cell"] == "pgd[eps=0.3]"
    assert main(["compare", str(runs / "a"), str(runs / "b")]) == 1
    out = capsys.readouterr().out
    flagged = [line for line in out.splitlines() if line.endswith("REGRESSION")]
    assert len(flagged) == 1 and flagged[0].startswith("pgd[eps=0.3]") and " msp " in flagged[0]
    assert "1 regression(s)" in out
    # a later run that lost its detection rows does not pass as "no regression"
    lost = read_json(runs / "b" / "results.json")
    lost["results"] = []
    (runs / "lost").mkdir()
    write_json(runs / "lost" / "results.json", lost)
    assert main(["compare", str(runs / "b"), str(runs / "lost")]) == 1
    assert "metric(s) of " in capsys.readouterr().out
    # nor does an AUROC outside its own interval
    broken = read_json(runs / "b" / "results.json")
    row = next(r for r in broken["results"] if r["auroc"] is not None and r["auroc"] < 0.98)
    row["auroc_ci_low"] = row["auroc"] + 0.01
    write_json(runs / "lost" / "results.json", broken)
    assert main(["compare", str(runs / "b"), str(runs / "lost")]) == 2
    assert "outside its interval" in capsys.readouterr().err
    assert main(["report", str(runs / "b")]) == 0  # b's report, re-rendered, sees the planted earlier value
    html = (runs / "b" / "report.html").read_text()
    assert "1 regression(s)" in html and html.count("<td>REGRESSION</td>") == 1


@pytest.mark.slow
def test_pytest_plugin_gives_the_same_verdicts_as_check(suite_file, tmp_path, pytester, capsys):
    suite = suite_file(min_auroc=0.9, max_asr=0.9)
    assert check(suite, tmp_path, "cli", "--json") == 1
    report = json.loads(capsys.readouterr().out)  # stdout is the JSON document alone
    verdicts = {c["nodeid"]: c["status"] for c in report["checks"]}
    assert report["failed"] == list(verdicts.values()).count("FAILED") >= 1 and report["run_dir"].endswith("cli")
    assert all(c["value"] is None or 0 <= c["value"] <= 1 for c in report["checks"])
    # the plugin takes every audit option: here n and the detectors from the project's [tool.advdetect],
    # the cache folder and the seed as flags
    pytester.makepyprojecttoml('[tool.advdetect]\nn = 60\ndetectors = ["confounding_gradient", "msp"]\nseed = 5\n')
    result = pytester.runpytest_subprocess("--advdetect-suite", suite, "--advdetect-cache-dir", str(tmp_path / "cache"),
                                         "--advdetect-seed", "0", "-v", "-p", "no:cacheprovider")
    outcomes = {}
    for line in result.outlines:  # verbose lines: "<nodeid> PASSED [ 16%]"
        found = re.search(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED)\b", line)
        if found:
            nodeid = next(n for n in verdicts if found.group(1).endswith(n))
            outcomes[nodeid] = found.group(2)
    assert outcomes == verdicts
    counts = {s: list(verdicts.values()).count(s) for s in ("PASSED", "FAILED", "SKIPPED")}
    result.assert_outcomes(passed=counts["PASSED"], failed=counts["FAILED"], skipped=counts["SKIPPED"])
    assert result.ret == 1
    assert any("attack_success_rate FAILED (" in line for line in result.outlines)  # value against threshold
