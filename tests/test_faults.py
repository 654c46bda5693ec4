"""Faults a hostile user or a bad day brings: bad input refused before any work in one line with
exit 2, damaged run folders named, internal errors as exit 3 with a saved traceback, and no
wrong number with exit 0."""

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_SUITE
import torch

from advdetect.cli.commands import main
from advdetect.errors import ExitCode
from advdetect.run.folder import claim_new


MODELS = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 4 * 4, 3)
        self.scale = scale

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.scale * self.head(nn.functional.adaptive_avg_pool2d(h, 4).flatten(1))


def tiny():
    return Tiny()


def tiny_hotter():
    """The same weights as tiny(), another forward."""
    return Tiny(scale=3.0)


def nan_model():
    model = Tiny()
    model.forward = lambda x: torch.full((len(x), 3), float("nan"))
    return model


class Pair(Tiny):
    def forward(self, x):
        return super().forward(x), x


class Raises(Tiny):
    def forward(self, x):
        raise RuntimeError("broken forward")


class NoParameters(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :3]
'''


def one_line_error(capsys: pytest.CaptureFixture, message: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("advdetect: error: ") and message in err[0], err[0]
    return err[0]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder with a tiny model file, tiny data and a tiny suite."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models.py").write_text(MODELS)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.integers(0, 256, (120, 8, 8, 1), dtype=np.uint8), y=rng.integers(0, 3, 120))
    (tmp_path / "tiny.toml").write_text('[[attack]]\nname = "fgsm"\neps = [0.2, 0.5]\n')
    return tmp_path


def tiny_audit(*extra: str, model: str = "models.py:tiny", suite: str = "tiny.toml") -> list[str]:
    return ["-q", "audit", suite, "--model", model, "--data", "npz:data.npz", "--n", "60", "--n-reference", "40",
            "--detectors", "msp", *extra]


# --- bad input, refused before any work ----------------------------------------------------------


@pytest.mark.parametrize(
    ("suite", "message"),
    [
        ('[[attack]]\nname = "pgd"\neps = [0.1]\nsteps = "10"\n', "steps must be a whole number; got '10'"),
        ('[[attack]]\nname = "pgd"\neps = [0.1]\nsteps = 2.5\n', "steps must be a whole number; got 2.5"),
        ('[[attack]]\nname = "pgd"\neps = [0.1]\nrandom_start = 1\n', "random_start must be true or false"),
        ('[[attack]]\nname = "fgsm"\neps = [0.1, inf]\n', "must be a non-empty list of finite numbers >= 0"),
        ('[[attack]]\nname = "fgsm"\neps = [nan]\n', "must be a non-empty list of finite numbers >= 0"),
        ('[[attack]]\nname = "fgsm"\neps = [-0.1]\n', "must be a non-empty list of finite numbers >= 0"),
        ('[[attack]]\nname = "pgd"\neps = [0.1]\nalpha = nan\n', "alpha must be a finite number"),
        ('[[attack]]\nname = "apgd"\neps = [0.1]\nloss = "nope"\n', "attack apgd[eps=0.1] cannot run"),
        ('[[attack]]\nname = "fgsm"\neps = [0.1]\n[detector.cg_head]\nbase = "confounding_gradient"\n'
         'layers = ["nothing.*"]\n', "detector cg_head: layers pattern 'nothing.*' matches no parameter"),
        ('[[attack]]\nname = "fgsm"\neps = [0.1]\n[detector.lid2]\nbase = "lid"\ncv = 1\n', "cv 1 is out of range"),
        ('[[attack]]\nname = "fgsm"\neps = [0.1]\n[detector.lid2]\nbase = "lid"\nks = ["a"]\n', "ks must be a whole"),
    ],
)
def test_bad_suite_values_stop_before_any_work(suite, message, workdir, capsys):
    (workdir / "bad.toml").write_text(suite)
    detectors = "msp,cg_head" if "cg_head" in suite else ("msp,lid2" if "lid2" in suite else "msp")
    args = tiny_audit("--out", "run", suite="bad.toml")
    args[args.index("--detectors") + 1] = detectors
    assert main(args) == ExitCode.USAGE_ERROR
    one_line_error(capsys, message)
    assert not (workdir / "run").exists() and not (workdir / "reports").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--n", "0"], "argument --n: must be at least 1, got 0"),
        (["--seed", "-1"], "argument --seed: must be a whole number from 0 to 4294967295, got -1"),
        (["--std", "nan", "--mean", "0.5"], "argument --std: expected finite numbers"),
        (["--fit-fraction", "nan"], "argument --fit-fraction: must lie strictly between 0 and 1"),
        (["--device", "meta"], "--device 'meta' is not one advdetect runs on"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:999"], "is not usable here"),
        (["--cache-dir", "data.npz"], "--cache-dir data.npz is a file, not a folder"),
        (["--out", "data.npz"], "--out data.npz is a file, not a folder"),
        (["--out", "data.npz/run"], "lies inside"),
        (["--out", "dangling"], "is a link to"),
        (["--out", "dangling/run"], "lies behind"),
        (["--out", "full"], "already exists and is not empty"),
    ],
)
def test_bad_options_stop_before_any_work(options, message, workdir, capsys):
    (workdir / "dangling").symlink_to(workdir / "gone")
    (workdir / "full").mkdir()
    (workdir / "full" / "x").write_text("")
    before = sorted(p.name for p in workdir.iterdir())
    assert main(tiny_audit(*options)) == ExitCode.USAGE_ERROR
    one_line_error(capsys, message)
    assert sorted(p.name for p in workdir.iterdir()) == before


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("models.py:nan_model", "the model returns NaN or infinite logits"),
        ("models.py:Pair", "it returned a tuple of 2 items"),
        ("models.py:Raises",
         "the model cannot take inputs of shape [1, 8, 8] (a probe batch): RuntimeError: broken forward"),
        ("models.py:NoParameters", "the model has no parameters"),
    ],
)
def test_models_that_cannot_be_audited_stop_before_any_work(model, message, workdir, capsys):
    assert main(tiny_audit("--out", "run", model=model)) == ExitCode.USAGE_ERROR
    one_line_error(capsys, message)
    assert not (workdir / "run").exists()


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.full((60, 1, 8, 8), np.nan, np.float32), np.arange(60) % 3, "NaN or infinite pixel values"),
        (np.zeros((60, 1, 8, 8), np.float32), np.arange(60) % 3 - 1, "negative labels (down to -1)"),
        (np.zeros((60, 1, 8, 8), np.float32), (np.arange(60) % 3).astype(np.float32), "'y' must be 60 integer labels"),
    ],
)
def test_bad_data_stops_before_any_work(x, y, message, workdir, capsys):
    np.savez(workdir / "data.npz", x=x, y=y)
    assert main(tiny_audit("--out", "run")) == ExitCode.USAGE_ERROR
    one_line_error(capsys, message)
    assert not (workdir / "run").exists()


def test_garbage_data_file_is_named_plainly(workdir, capsys):
    (workdir / "data.npz").write_bytes(b"\x80\x04garbage that numpy would try to unpickle")
    assert main(tiny_audit("--out", "run")) == ExitCode.USAGE_ERROR
    line = one_line_error(capsys, "cannot read data data.npz: not an npz archive")
    assert "pickle" not in line


def test_junitxml_pointing_at_a_folder_is_refused_before_the_audit(workdir, capsys):
    (workdir / "tiny.toml").write_text('[thresholds]\nmin_auroc = 0.1\ndetector = "msp"\n'
                                       '[[attack]]\nname = "fgsm"\neps = [0.5]\n')
    args = tiny_audit("--out", "run", "--junitxml", str(workdir))
    args[1] = "check"
    assert main(args) == ExitCode.USAGE_ERROR
    one_line_error(capsys, f"--junitxml {workdir} is a folder")
    assert not (workdir / "run").exists()


# --- runs never shared, never shrunk -------------------------------------------------------------


def test_run_folders_with_the_same_timestamp_are_claimed_apart(tmp_path):
    claimed: list[Path] = []
    barrier = threading.Barrier(4)

    def take() -> None:
        barrier.wait()
        claimed.append(claim_new(tmp_path, "20261125-120000"))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(p.name for p in claimed) == ["20261125-120000", "20261125-120000-2", "20261125-120000-3",
                                              "20261125-120000-4"]


@pytest.mark.slow
def test_two_audits_started_together_in_one_root_keep_their_own_folders(workdir):
    command = [sys.executable, "-m", "advdetect", *tiny_audit()]
    processes = [subprocess.Popen(command + ["--seed", str(seed)], cwd=workdir, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    runs = sorted((workdir / "reports").iterdir())
    assert len(runs) == 2
    seeds = set()
    for run in runs:
        results = json.loads((run / "results.json").read_text())
        info = json.loads((run / "run.json").read_text())
        assert results["seed"] == info["seed"] and all(
            json.loads(p.read_text())["seed"] != 0 for p in (run / "adversarial").glob("*.json"))
        seeds.add(results["seed"])
    assert seeds == {1, 2}


@pytest.mark.slow
def test_a_run_folder_in_use_is_refused(audited_copy, capsys):
    from advdetect.run.folder import locked

    with locked(audited_copy):
        assert main(["report", str(audited_copy)]) == ExitCode.USAGE_ERROR
    one_line_error(capsys, "is in use by another advdetect command")


# --- damaged run folders -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    (root / "tiny.toml").write_text(TINY_SUITE)
    assert main(["-q", "audit", str(root / "tiny.toml"), "--n", "120", "--detectors", "msp,confounding_gradient",
                 "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture
def audited_copy(audited: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(audited, copy)
    return copy


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xffnot what advdetect wrote")


def _json_edit(edit):  # type: ignore[no-untyped-def]
    def damage(path: Path) -> None:
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    return damage


DAMAGES = {
    "truncated": _truncate,
    "garbage": _garbage,
    "run.json without seed": _json_edit(lambda d: d.pop("seed")),
    "strength as text": _json_edit(lambda d: d[0].update(strength="0.1") if isinstance(d, list) else
                                   d.update(strength="0.1")),
    "slug leaving the folder": _json_edit(lambda d: d.update(slug="../../escape")),
    "auroc of 5": _json_edit(lambda d: d[0].update(auroc=5.0)),
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "relative", "damage"),
    [
        ("report", "run.json", "truncated"),
        ("report", "run.json", "run.json without seed"),
        ("report", "detection.json", "garbage"),
        ("report", "detection.json", "strength as text"),
        ("report", "detection.json", "auroc of 5"),
        ("report", "scores/fgsm_eps-0.3.npz", "truncated"),
        ("report", "scores/fgsm_eps-0.3.npz", "garbage"),
        ("report", "adversarial/fgsm_eps-0.3.json", "slug leaving the folder"),
        ("detect", "adversarial/fgsm_eps-0.3.npz", "truncated"),
        ("detect", "adversarial/fgsm_eps-0.3.json", "strength as text"),
        ("detect", "sample.npz", "garbage"),
        ("detect", "reference.npz", "truncated"),
        ("detect", "run.json", "run.json without seed"),
    ],
)
def test_damaged_run_folder_is_one_line_naming_the_file(command, relative, damage, audited_copy, capsys):
    results = (audited_copy / "results.json").read_bytes()
    DAMAGES[damage](audited_copy / relative)
    assert main([command, str(audited_copy)]) == ExitCode.USAGE_ERROR
    line = one_line_error(capsys, f"damaged run folder: {audited_copy / relative}: ")
    assert "Traceback" not in line
    assert (audited_copy / "results.json").read_bytes() == results  # nothing rewritten from a damaged run
    assert not (audited_copy.parent / "escape").exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "garbage", "strength as text"])
def test_compare_names_a_damaged_results_file(damage, audited_copy, audited, capsys):
    path = audited_copy / "results.json"
    if damage == "strength as text":
        data = json.loads(path.read_text())
        data["results"][0]["strength"] = "0.1"
        path.write_text(json.dumps(data))
    else:
        DAMAGES[damage](path)
    assert main(["compare", str(audited), str(audited_copy)]) == ExitCode.USAGE_ERROR
    one_line_error(capsys, f"damaged run folder: {path}: ")


@pytest.mark.slow
def test_history_skips_a_damaged_manifest_with_a_warning(audited_copy, audited, capsys, caplog):
    root = audited_copy.parent
    shutil.copytree(audited, root / "other")
    (audited_copy / "manifest.json").write_text('["not", "a", "manifest"]')
    assert main(["history", str(root)]) == ExitCode.OK
    assert "other" in capsys.readouterr().out
    assert f"skipping {audited_copy} (damaged run folder: {audited_copy / 'manifest.json'}" in caplog.text


@pytest.mark.slow
def test_report_refuses_an_unfinished_detect_stage(audited_copy, capsys):
    results = (audited_copy / "results.json").read_bytes()
    info = json.loads((audited_copy / "run.json").read_text())
    info["stages"]["detect"] = "running"
    (audited_copy / "run.json").write_text(json.dumps(info))
    assert main(["report", str(audited_copy)]) == ExitCode.USAGE_ERROR
    one_line_error(capsys, f"run 'advdetect detect {audited_copy}'")
    assert (audited_copy / "results.json").read_bytes() == results


@pytest.mark.slow
def test_detect_refuses_an_unfinished_attack_stage(audited_copy, capsys):
    (audited_copy / "adversarial" / "pgd_eps-0.3.json").unlink()
    assert main(["detect", str(audited_copy)]) == ExitCode.USAGE_ERROR
    one_line_error(capsys, "cell pgd[eps=0.3] has no results: the attack stage did not finish")


@pytest.mark.slow
def test_a_damaged_sibling_never_fails_a_new_audit(workdir, caplog):
    assert main(tiny_audit("--out", "reports/first")) == ExitCode.OK
    (workdir / "reports" / "first" / "results.json").write_text("{ truncated")
    assert main(tiny_audit("--out", "reports/second")) == ExitCode.OK
    assert ("trend: skipping reports/first (damaged run folder: reports/first/results.json: not valid JSON"
            in caplog.text)
    assert (workdir / "reports" / "second" / "report.pdf").is_file()


# --- no wrong number with exit 0 -----------------------------------------------------------------


@pytest.mark.slow
def test_same_weights_with_another_forward_do_not_share_cached_attacks(workdir):
    assert main(tiny_audit("--out", "a", "--cache-dir", "cache")) == ExitCode.OK
    assert main(tiny_audit("--out", "b", "--cache-dir", "cache")) == ExitCode.OK
    assert main(tiny_audit("--out", "c", "--cache-dir", "cache", model="models.py:tiny_hotter")) == ExitCode.OK
    hits = {run: json.loads((workdir / run / "run.json").read_text())["attack_cache_hits"] for run in "abc"}
    assert hits == {"a": 0, "b": 2, "c": 0}
    models = [json.loads((workdir / run / "run.json").read_text())["model"]["sha256"] for run in "ac"]
    assert models[0] == models[1]  # the same weights: only the logits tell the models apart


@pytest.mark.slow
def test_detect_refuses_a_model_whose_forward_changed(workdir, capsys):
    assert main(tiny_audit("--out", "run")) == ExitCode.OK
    (workdir / "models.py").write_text(MODELS.replace("self.scale = scale", "self.scale = 2 * scale"))
    assert main(["detect", "run"]) == ExitCode.USAGE_ERROR
    one_line_error(capsys, "has the audited weights but computes other logits")


@pytest.mark.slow
def test_strengths_that_print_alike_keep_their_own_cells(workdir):
    (workdir / "tiny.toml").write_text('[[attack]]\nname = "fgsm"\neps = [0.3, 0.30000001]\n')
    assert main(tiny_audit("--out", "run")) == ExitCode.OK
    results = json.loads((workdir / "run" / "results.json").read_text())
    assert [a["key"] for a in results["attacks"]] == ["fgsm[eps=0.3]", "fgsm[eps=0.30000001]"]
    assert len({a["slug"] for a in results["attacks"]}) == 2
    assert {r["strength"] for r in results["results"]} == {0.3, 0.30000001}


@pytest.mark.slow
def test_user_strings_render_literally_in_the_figures(workdir):
    shutil.copy(workdir / "tiny.toml", workdir / "a$x^2$b.toml")
    assert main(tiny_audit("--out", "run", suite="a$x^2$b.toml")) == ExitCode.OK
    assert (workdir / "run" / "report.pdf").stat().st_size > 0


# --- exit codes ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_internal_error_is_exit_3_with_the_traceback_saved(workdir, monkeypatch, capsys):
    import advdetect.stages.pipeline

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(advdetect.stages.pipeline, "detect_stage", broken)
    assert main(tiny_audit("--out", "run")) == ExitCode.INTERNAL_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    log = Path("run") / "error.log"
    assert err == [f"advdetect: internal error: ZeroDivisionError: a bug (the traceback is in {log}; please report it)"]
    assert "Traceback" in log.read_text() and "a bug" in log.read_text()
    manifest = json.loads((workdir / "run" / "manifest.json").read_text())
    assert (workdir / "run" / "run.json").is_file()
    assert manifest["status"] == "failed" and manifest["error_log"] == "error.log"
