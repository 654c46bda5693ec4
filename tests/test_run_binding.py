"""Every file of a run folder is bound to its run: a file copied in from another run (another seed,
another suite's cell of the same name) is refused in one line naming it, never published as this
run's numbers; ``advdetect detect`` rewrites and re-binds the detect stage's files."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advdetect.cli.commands import main
from advdetect.errors import ExitCode

pytestmark = pytest.mark.slow  # every test reads the runs of the module's audits

SUITE = '[[attack]]\nname = "fgsm"\neps = [0.3]\n'
#: Another suite whose cell has the same name (and file names) as SUITE's, and other contents.
OTHER_SUITE = '[[attack]]\nid = "fgsm"\nname = "pgd"\neps = [0.3]\nalpha = 0.1\nsteps = 3\n'
CELL = "adversarial/fgsm_eps-0.3"
ATTACK_FILES = ["sample.npz", "reference.npz", f"{CELL}.json", f"{CELL}.npz", "masking.json"]
DETECTION_FILES = ["detection.json", "scores/fgsm_eps-0.3.npz"]
OUTPUTS = ("results.json", "report.html", "report.pdf")
SETTINGS = settings(max_examples=10, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run a (seed 0), run b (seed 1, same suite) and run c (seed 0, OTHER_SUITE)."""
    root = tmp_path_factory.mktemp("binding")
    (root / "suite.toml").write_text(SUITE)
    (root / "other.toml").write_text(OTHER_SUITE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("advdetect.stages.attack.MASKING_INPUTS", 4)  # the gradient-masking checks, on few inputs
        for name, suite, seed in (("a", "suite.toml", "0"), ("b", "suite.toml", "1"), ("c", "other.toml", "0")):
            assert main(["-q", "audit", str(root / suite), "--n", "40", "--seed", seed, "--detectors", "msp",
                         "--no-cache", "--out", str(root / name)]) == ExitCode.OK
    # else copying one file over the other would test nothing
    assert differing(root, "b", ATTACK_FILES + DETECTION_FILES) == ATTACK_FILES + DETECTION_FILES
    assert differing(root, "c", [f"{CELL}.json", f"{CELL}.npz"]) == [f"{CELL}.json", f"{CELL}.npz"]
    return root


def copy_of(run: Path, within: Path) -> Path:
    """A fresh copy of ``run`` without its report outputs."""
    copy = Path(tempfile.mkdtemp(dir=within)) / "run"
    shutil.copytree(run, copy)
    for name in OUTPUTS:
        (copy / name).unlink()
    return copy


def refused(capsys: pytest.CaptureFixture, command: str, copy: Path, named: str) -> str:
    """Run ``command`` on ``copy``: exit 2, one line naming ``named`` as not this run's, no report."""
    capsys.readouterr()
    assert main(["-q", command, str(copy)]) == ExitCode.USAGE_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"advdetect: error: damaged run folder: {copy / named}: "
                             f"it does not belong to this run"), err
    assert not any((copy / name).exists() for name in OUTPUTS)
    return err[0]


def differing(runs: Path, other: str, names: list[str]) -> list[str]:
    return [name for name in names if (runs / "a" / name).read_bytes() != (runs / other / name).read_bytes()]


#: One bound file, or files that agree with each other copied together (the first is read first).
REPLACED = [[name] for name in ATTACK_FILES + DETECTION_FILES] + [DETECTION_FILES, [f"{CELL}.json", f"{CELL}.npz"]]


@SETTINGS
@given(replaced=st.sampled_from(REPLACED))
def test_a_file_copied_from_a_run_with_another_seed_is_refused_by_report(replaced, runs, tmp_path, capsys):
    copy = copy_of(runs / "a", tmp_path)
    for relative in replaced:
        shutil.copyfile(runs / "b" / relative, copy / relative)
    line = refused(capsys, "report", copy, replaced[0])
    assert ("advdetect detect" in line) == (replaced[0] in DETECTION_FILES), line


@SETTINGS
@given(relative=st.sampled_from(ATTACK_FILES))
def test_detect_refuses_an_input_copied_from_another_run(relative, runs, tmp_path, capsys):
    copy = copy_of(runs / "a", tmp_path)
    shutil.copyfile(runs / "b" / relative, copy / relative)
    refused(capsys, "detect", copy, relative)


@SETTINGS
@given(relative=st.sampled_from(DETECTION_FILES))
def test_detect_rewrites_and_rebinds_detection_files_copied_from_another_run(relative, runs, tmp_path, capsys):
    copy = copy_of(runs / "a", tmp_path)
    shutil.copyfile(runs / "b" / relative, copy / relative)
    refused(capsys, "report", copy, relative)
    assert main(["-q", "detect", str(copy)]) == ExitCode.OK
    assert json.loads((copy / "detection.json").read_text()) == json.loads((runs / "a" / "detection.json").read_text())
    (copy / "results.json").unlink()
    assert main(["-q", "report", str(copy)]) == ExitCode.OK and (copy / "results.json").is_file()


@SETTINGS
@given(replaced=st.sampled_from([[".json"], [".npz"], [".json", ".npz"]]))
def test_a_cell_copied_from_another_suites_cell_of_the_same_name_is_refused(replaced, runs, tmp_path, capsys):
    copy = copy_of(runs / "a", tmp_path)
    for suffix in replaced:
        shutil.copyfile(runs / "c" / f"{CELL}{suffix}", copy / f"{CELL}{suffix}")
    line = refused(capsys, "report", copy, f"{CELL}{replaced[0]}")
    assert "rerun the same audit into a new folder" in line


def test_a_file_run_json_does_not_record_is_refused(runs, tmp_path, capsys):
    copy = copy_of(runs / "a", tmp_path)
    info = json.loads((copy / "run.json").read_text())
    del info["files"]["detection.json"]
    (copy / "run.json").write_text(json.dumps(info))
    assert "run.json records no such file" in refused(capsys, "report", copy, "detection.json")


def test_an_untouched_copy_reports_and_a_run_from_before_binding_reads_as_before(runs, tmp_path, capsys):
    info = json.loads((runs / "a" / "run.json").read_text())
    assert len(info["run_id"]) == 32 and set(ATTACK_FILES + DETECTION_FILES) <= set(info["files"])
    assert set(info["files"]["detection.json"]["inputs"]) == {"sample.npz", "reference.npz", f"{CELL}.npz"}
    copy = copy_of(runs / "a", tmp_path)
    assert main(["-q", "report", str(copy)]) == ExitCode.OK and (copy / "results.json").is_file()

    legacy = copy_of(runs / "a", tmp_path)
    del info["run_id"], info["files"]
    (legacy / "run.json").write_text(json.dumps(info))
    for relative in DETECTION_FILES:
        shutil.copyfile(runs / "b" / relative, legacy / relative)
    assert main(["-q", "report", str(legacy)]) == ExitCode.OK  # nothing to check them against: read as before
