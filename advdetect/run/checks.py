"""Audits as tests: the suite's thresholds, checked against an audit's results.

One check per attack x strength cell and thresholded metric, named like a pytest node:
``SUITE::attack[strength]::metric``; one per adaptive cell for ``max_undetected_success_rate``;
and, with any robustness threshold, ``SUITE::gradient_masking::robustness``, which fails when the
audit's gradient-masking checks saw a symptom (a robustness number that gradient attacks cannot
be trusted to have measured is no pass).

The gate's one rule, for ``advdetect check``, the Python API and the pytest plugin alike: a
threshold that cannot be evaluated is a usage error before any work (:func:`plan_checks` with the
run's detectors) or, found after it, a failure; never a pass. A cell whose metric could not be
measured because the attack fooled too few inputs to fit or score a detector is skipped, with the
reason, as pytest skips.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

from advdetect.errors import ExitCode, UsageError
from advdetect.run.records import ADAPTIVE, CheckRecord, Status, VerdictRecord, cell_key

PASSED: Status = "PASSED"
FAILED: Status = "FAILED"
SKIPPED: Status = "SKIPPED"
PROTOCOL = "seen"
#: Whose AUROC a threshold checks when the suite names no detector.
DEFAULT_THRESHOLD_DETECTOR = "confounding_gradient"


@dataclass(frozen=True)
class Check:
    suite: str
    attack: str
    cell_key: str
    strength: float
    #: "auroc" (of ``detector``), "attack_success_rate", "undetected_success_rate" (of ``detector``,
    #: adaptive rows) or "robustness" (the gradient-masking checks)
    metric: str
    threshold: float
    detector: str | None = None

    @property
    def nodeid(self) -> str:
        return f"{self.suite}::{self.cell_key}::{self.metric}"


@dataclass(frozen=True)
class Outcome:
    check: Check
    status: Status
    value: float | None
    message: str

    @property
    def line(self) -> str:
        return f"{self.check.nodeid} {self.status} ({self.message})"


def plan_checks(suite: Any, detectors: Any = None) -> list[Check]:
    """The checks of a :class:`~advdetect.config.suite.Suite`'s thresholds; with the run's ``detectors``,
    a :class:`UsageError` when a threshold names a detector the run will not run."""
    checks = plan_from_document(suite.to_dict(), suite.name)
    if detectors is not None:
        missing = sorted({c.detector for c in checks if c.detector and c.detector not in detectors})
        if missing:
            raise UsageError(f"the thresholds of suite {suite.name!r} check detector(s) {', '.join(missing)}, which "
                             f"this audit does not run, so they could never pass; run them (--detectors) or set "
                             f"thresholds.detector")
    return checks


def plan_from_document(document: dict[str, Any], suite_name: str) -> list[Check]:
    """The checks of a suite's thresholds, from the suite as ``run.json`` records it (so the report
    can evaluate them without loading the suite's attacks): one per attack x strength cell and
    thresholded metric; an attack's own ``thresholds`` override the suite's."""
    top = document.get("thresholds", {})
    checks = []
    for attack in document.get("attack", []):
        limits = {**top, **attack.get("thresholds", {})}
        axis = next(k for k, v in attack.items() if isinstance(v, list))
        for strength in attack[axis]:
            key = cell_key(attack["id"], axis, strength)
            if limits.get("max_attack_success_rate") is not None:
                checks.append(Check(suite_name, attack["id"], key, strength, "attack_success_rate",
                                    float(limits["max_attack_success_rate"])))
            if limits.get("min_auroc") is not None:
                checks.append(Check(suite_name, attack["id"], key, strength, "auroc", float(limits["min_auroc"]),
                                    limits.get("detector") or DEFAULT_THRESHOLD_DETECTOR))
    adaptive = document.get("adaptive")
    if adaptive and top.get("max_undetected_success_rate") is not None:
        checks.append(Check(suite_name, ADAPTIVE, cell_key(ADAPTIVE, "eps", adaptive["eps"]), adaptive["eps"],
                            "undetected_success_rate", float(top["max_undetected_success_rate"]),
                            top.get("detector") or DEFAULT_THRESHOLD_DETECTOR))
    if any(c.metric == "attack_success_rate" for c in checks):
        checks.append(Check(suite_name, "gradient_masking", "gradient_masking", 0.0, "robustness", 0.0))
    return checks


@dataclass(frozen=True)
class Verdict:
    """The suite's threshold checks on one audit: the one count of passes and failures, for
    ``advdetect check`` (its lines, JSON, JUnit XML and exit code), the Python API, the report and
    ``results.json`` alike."""

    outcomes: tuple[Outcome, ...]

    def count(self, status: Status) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def passed(self) -> bool:
        """True when no check failed (skipped checks do not fail, as in pytest)."""
        return not self.count(FAILED)

    @property
    def counts(self) -> dict[str, int]:
        """``{"passed": .., "failed": .., "skipped": ..}``, as ``results.json`` and the run's manifest keep them."""
        return {"passed": self.count(PASSED), "failed": self.count(FAILED), "skipped": self.count(SKIPPED)}

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.passed else ExitCode.CHECK_FAILED

    def record(self) -> VerdictRecord:
        """The verdict as ``results.json`` keeps it."""
        return VerdictRecord(**self.counts, checks=[CheckRecord(o.check.nodeid, o.status, o.value, o.message)
                                                    for o in self.outcomes])

    def closing_line(self, seconds: float) -> str:
        """pytest's last line: ``3 passed, 1 failed, 2 skipped in 4.2s`` (no skipped count when none was)."""
        skipped = f", {self.count(SKIPPED)} skipped" if self.count(SKIPPED) else ""
        return f"{self.count(PASSED)} passed, {self.count(FAILED)} failed{skipped} in {seconds:.1f}s"

    def __str__(self) -> str:
        return str(self.record())


def judge(checks: Sequence[Check], results: dict[str, Any]) -> Verdict:
    """The checks' outcomes on a results document."""
    return Verdict(tuple(evaluate(check, results) for check in checks))


def evaluate(check: Check, results: dict[str, Any]) -> Outcome:
    if check.metric == "robustness":
        return _masking(check, results.get("gradient_masking"))
    if check.metric == "undetected_success_rate":
        row = next((r for r in results["results"] if r["protocol"] == ADAPTIVE and r["detector"] == check.detector
                    and r["strength"] == check.strength), None)
        if row is None or row.get("undetected_success_rate") is None:
            return Outcome(check, FAILED, None, f"no adaptive result for {check.detector}, so the threshold cannot be "
                                                f"evaluated")
        value = row["undetected_success_rate"]
        ok = value <= check.threshold
        return Outcome(check, PASSED if ok else FAILED, value,
                       f"{check.detector} lets {value:.3f} of attacked inputs through against an adaptive attacker, "
                       f"{'<=' if ok else '>'} {check.threshold:g}")
    if check.metric == "attack_success_rate":
        record = next(a for a in results["attacks"] if a["attack"] == check.attack and a["strength"] == check.strength)
        value = record["attack_success_rate"]
        if value is None:
            return Outcome(check, SKIPPED, None, "no correctly classified input to attack")
        ok = value <= check.threshold
        return Outcome(check, PASSED if ok else FAILED, value, f"{value:.3f} {'<=' if ok else '>'} {check.threshold:g}")
    row = next((r for r in results["results"] if r["attack"] == check.attack and r["strength"] == check.strength
                and r["detector"] == check.detector and r["protocol"] == PROTOCOL), None)
    if row is None:
        return Outcome(check, FAILED, None,
                       f"detector {check.detector} did not run, so the threshold cannot be evaluated")
    if row["auroc"] is None:
        return Outcome(check, SKIPPED, None, row["reason"])
    value = row["auroc"]
    ok = value >= check.threshold
    return Outcome(check, PASSED if ok else FAILED, value,
                   f"{check.detector} {value:.3f} {'>=' if ok else '<'} {check.threshold:g}")


def _masking(check: Check, masking: dict[str, Any] | None) -> Outcome:
    """Gradient masking (Athalye, Carlini and Wagner 2018): a robustness pass needs its checks run and quiet."""
    if not masking:
        return Outcome(check, FAILED, None, "robustness unverified: the gradient-masking checks did not run")
    observed = [s for s in masking["symptoms"] if s["observed"]]
    if observed:
        return Outcome(check, FAILED, float(len(observed)), "robustness unverified: gradient masking suspected: "
                       + "; ".join(f"{s['name']} ({s['detail']})" for s in observed))
    return Outcome(check, PASSED, 0.0, f"no gradient-masking symptom in {len(masking['symptoms'])} checks")


def outcome_dict(outcome: Outcome) -> dict[str, Any]:
    """One check's outcome for machines (``advdetect check --json``)."""
    check = outcome.check
    return {"nodeid": check.nodeid, "status": outcome.status, "cell": check.cell_key, "attack": check.attack,
            "strength": check.strength, "metric": check.metric, "detector": check.detector,
            "threshold": check.threshold, "value": outcome.value, "message": outcome.message}


def junit_xml(suite: str, verdict: Verdict, seconds: float) -> bytes:
    root = ElementTree.Element("testsuites")
    testsuite = ElementTree.SubElement(root, "testsuite", name=suite, tests=str(len(verdict.outcomes)),
                                       time=f"{seconds:.3f}", failures=str(verdict.count(FAILED)),
                                       skipped=str(verdict.count(SKIPPED)), errors="0")
    for outcome in verdict.outcomes:
        case = ElementTree.SubElement(testsuite, "testcase", classname=f"{suite}.{outcome.check.attack}",
                                      name=f"{outcome.check.cell_key}::{outcome.check.metric}", time="0")
        if outcome.status == FAILED:
            ElementTree.SubElement(case, "failure", message=outcome.message).text = outcome.line
        elif outcome.status == SKIPPED:
            ElementTree.SubElement(case, "skipped", message=outcome.message)
    # typeshed gives tostring() with a named encoding Any (encoding="unicode" returns str); "utf-8" returns bytes
    xml: bytes = ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)
    return xml
