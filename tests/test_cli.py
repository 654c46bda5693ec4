"""The CLI end to end on the embedded default with a tiny suite, and its bad-input contract."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_SUITE

from advdetect.cli.commands import main
from advdetect.detectors import DETECTORS
from advdetect.run.metrics import METRIC_NAMES

ROW_KEYS = {"attack", "strength_name", "strength", "detector", "protocol", "n_clean", "n_adv", "attack_success_rate",
            *METRIC_NAMES, "reason"}


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    suite = root / "tiny.toml"
    suite.write_text(TINY_SUITE)
    assert main(["audit", str(suite), "--n", "120", "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.mark.slow
def test_audit_writes_results_with_a_row_per_cell_and_detector(audited: Path):
    results = json.loads((audited / "results.json").read_text())
    assert results["schema"] == 1 and 0.9 < results["clean_accuracy"] <= 1
    assert results["model"]["spec"] == "default" and results["data"]["n"] == 120
    assert set(results["timings"]) == {"load", "attack", "detect", "report"}
    detector_seconds = results["detector_timings"]
    assert set(detector_seconds) == set(DETECTORS) and all(s > 0 for s in detector_seconds.values())
    assert sum(detector_seconds.values()) <= results["timings"]["detect"]  # parts of the stage's wall time
    assert "detector timings" in (audited / "report.html").read_text()
    cells = [(r["attack"], r["strength"]) for r in results["attacks"]]
    assert cells == [("fgsm", 0.1), ("fgsm", 0.3), ("pgd", 0.3)]
    rows = results["results"]
    expected = []
    for a, st in cells:
        for name in sorted(DETECTORS):
            cls = DETECTORS[name]
            protocols = ["seen", *(["unseen"] if cls.uses_adversarial and (a, st) != ("fgsm", 0.3) else []),
                         *([] if cls.needs_adversarial else ["oneclass"])]
            expected += [(a, st, name, p) for p in protocols]
    assert [(r["attack"], r["strength"], r["detector"], r["protocol"]) for r in rows] == expected
    assert len(DETECTORS) == 10
    for row in rows:
        assert ROW_KEYS <= set(row) and row["negatives"] == "clean"
        if row["reason"] is None:
            assert all(0.0 <= row[m] <= 1.0 for m in METRIC_NAMES) and row["n_clean"] == row["n_adv"] >= 10
        else:
            assert all(row[m] is None for m in METRIC_NAMES)
        if row["protocol"] == "unseen" and row["reason"] is None:
            assert row["detector_params"]["fitted_on"] == "fgsm[eps=0.3]"
    tuned = {r["detector"]: r["detector_params"] for r in rows if r["protocol"] == "seen" and r["strength"] == 0.3}
    assert set(tuned["odin"]) == {"temperature", "epsilon"} and set(tuned["lid"]) >= {"k", "C"}
    assert set(tuned["mahalanobis"]) >= {"noise", "C"} and set(tuned["kd_bu"]) >= {"bandwidth", "C"}
    strong = [r for r in rows if r["strength"] == 0.3]
    assert all(r["reason"] is None for r in strong) and all(r["attack_success_rate"] > 0.5 for r in strong)
    weak = results["attacks"][0]
    assert 0 < weak["attack_success_rate"] < 0.5 and weak["max_linf"] <= 0.1 + 1e-6
    weak_rows = {r["detector"]: r for r in rows if r["strength"] == 0.1 and r["protocol"] == "seen"}
    assert weak_rows["msp"]["reason"] is None and weak_rows["msp"]["n_adv"] < 40
    assert all("too few adversarial examples" in r["reason"] for r in rows if r["reason"])


@pytest.mark.slow
def test_every_cell_has_its_roc_figure_in_html_and_pdf(audited: Path):
    html = (audited / "report.html").read_text()
    for slug in ("fgsm_eps-0.1", "fgsm_eps-0.3", "pgd_eps-0.3"):
        assert f'<figure id="roc-{slug}">\n    <img src="data:image/png;base64,' in html
    assert "http://" not in html and "https://" not in html  # self-contained
    for protocol in ("seen", "unseen", "oneclass"):
        assert f'<h3 id="protocol-{protocol}">' in html
    assert html.count('class="best"') >= 3  # at least one best detector per cell and protocol
    pdf = (audited / "report.pdf").read_bytes()
    pages = pdf.count(b"/Type /Page\n") + pdf.count(b"/Type /Page ")
    assert pdf.startswith(b"%PDF") and pages >= 6  # summary, 3 protocol comparisons, 2 attacks


@pytest.mark.slow
def test_stages_rerun_alone_reproduce_the_results(audited: Path, capsys: pytest.CaptureFixture):
    before = json.loads((audited / "results.json").read_text())["results"]
    assert main(["report", str(audited)]) == 0
    assert json.loads((audited / "results.json").read_text())["results"] == before
    assert main(["detect", str(audited)]) == 0
    assert json.loads((audited / "results.json").read_text())["results"] == before
    assert "AUROC per detector, protocol seen" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["audit", "missing.toml"], "suite file 'missing.toml' not found"),
        (["audit", "{suite}", "--n", "20"], "unknown attack 'fgsn'; valid attacks:"),
        (["audit", "{bad_toml}"], "malformed TOML"),
        (["audit", "--attacks", "nope"], "--attacks names nope, not in suite 'default'"),
        (["audit", "--model", "nope"], "model spec 'nope' not understood"),
        (["audit", "--n", "100000"], "--n 100000 asks for more inputs"),
        (["report", "{tmp}"], "is not an audit run folder"),
        (["audit", "--data", "npz:{many_classes}", "--n", "12"],
         "labels up to 11 but the model outputs only 10 classes"),
        (["audit", "--data", "npz:{wrong_shape}", "--n", "4"], "the model cannot take inputs of shape [1, 8, 8]"),
        (["audit", "--model", "robustbench:Nope", "--model-dir", "{tmp}"], "robustbench has no model 'Nope'"),
        (["audit", "--n", "990"], "only 10 remain for the clean reference set"),
        (["audit", "--detectors", "msp,nope"], "unknown detector 'nope'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "unknown.toml").write_text('[[attack]]\nname = "fgsn"\neps = [0.1]\n')
    (tmp_path / "bad.toml").write_text('[[attack]\nname = "fgsm"\n')
    np.savez(tmp_path / "many.npz", x=np.zeros((12, 28, 28, 1), np.uint8), y=np.arange(12))
    np.savez(tmp_path / "shape.npz", x=np.zeros((4, 8, 8, 1), np.uint8), y=np.arange(4))
    inputs = sorted(p.name for p in tmp_path.iterdir())
    args = [a.format(suite="unknown.toml", bad_toml="bad.toml", tmp=tmp_path, many_classes="many.npz",
                     wrong_shape="shape.npz") for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("advdetect: error: ") and message in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == inputs  # no reports/ folder, no models/ folder


@pytest.mark.slow
def test_console_entry_point_exits_2_on_bad_input(tmp_path):
    result = subprocess.run([sys.executable, "-m", "advdetect", "audit", "nope.toml", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("advdetect: error: suite file 'nope.toml' not found; give a TOML suite path "
                                     "or one of: adaptive, autoattack, default, nightly, standard")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bench_reports_measured_ratios_as_json(capsys):
    assert main(["bench", "--models", "default", "--repeats", "1", "--batch", "8", "--methods",
                 "loop,batched,forward_backward", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    result = report["models"]["default"]
    seconds, ratios = result["seconds"], result["ratio_to_forward_backward"]
    assert set(seconds) == {"loop", "batched", "forward_backward"} and all(s > 0 for s in seconds.values())
    assert ratios["batched"] == pytest.approx(seconds["batched"] / seconds["forward_backward"])
    assert result["speedup_over_loop"]["batched"] == pytest.approx(seconds["loop"] / seconds["batched"])
    assert result["max_relative_error_float32"]["batched"] < 1e-3
    assert main(["bench", "--methods", "magic"]) == 2


@pytest.mark.slow
def test_bench_audit_times_stages_attacks_and_detectors_at_each_size(tmp_path, capsys):
    (tmp_path / "tiny.toml").write_text(TINY_SUITE)
    assert main(["bench", "--audit", str(tmp_path / "tiny.toml"), "--sizes", "60,30", "--n-reference", "40",
                 "--detectors", "msp,confounding_gradient", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sizes"] == [30, 60] and [run["n"] for run in report["runs"]] == [30, 60]
    for run in report["runs"]:
        assert set(run["stages"]) == {"load", "attack", "detect", "report"} and set(run["attacks"]) == {"fgsm", "pgd"}
        assert set(run["detectors"]) == {"msp", "confounding_gradient"}
        assert all(s > 0 for s in run["detectors"].values())
    small, large = report["runs"]
    b = report["growth"]["stages"]["attack"]
    assert b == pytest.approx(np.log(large["stages"]["attack"] / small["stages"]["attack"]) / np.log(2), abs=0.01)
    assert main(["bench", "--audit", "--sizes", "0"]) == 2
    assert main(["bench", "--n", "5"]) == 2  # an audit option without --audit
    assert main(["bench", "--audit", "--out", str(tmp_path / "x")]) == 2
    assert "is an option of 'bench --audit'" in capsys.readouterr().err
