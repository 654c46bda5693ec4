"""Issue 22's user mistakes: each is one line and exit 2 (or a UsageError) before any work."""

import os

import pytest
import torch
from torch import nn

import advdetect
from advdetect.cli.commands import main
from advdetect.errors import UsageError
from advdetect.stages.ood import _photos
from advdetect.stages.preflight import build_options


@pytest.mark.slow
def test_a_model_on_the_meta_device_is_refused_before_any_work(tmp_path):
    with torch.device("meta"):
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(UsageError, match="on the meta device"):
        advdetect.audit(model, "default", n=20, detectors=["msp"], out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_one_string_of_attacks_or_detectors_is_a_list_of_names_not_of_letters():
    options = build_options("default", attacks="fgsm", detectors="msp,energy")
    assert [spec.attack for spec in options.suite.attacks] == ["fgsm"]
    assert options.detectors == ("msp", "energy")


@pytest.mark.parametrize("command", ["audit", "report"])
def test_an_over_long_path_is_one_line_and_exit_2(tmp_path, capsys, command):
    long = tmp_path / ("a" * 300)
    args = ["audit", "--out", str(long)] if command == "audit" else ["report", str(long)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "is too long (at most 255 bytes a name" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / ("a" * 10))


@pytest.mark.slow
def test_a_suite_file_name_that_is_not_utf8_is_one_line(tmp_path, capsys):
    name = os.fsdecode(b"suite-\xff.toml")
    (tmp_path / name).write_text('[[attack]]\nname = "fgsm"\neps = [0.1]\n')
    assert main(["audit", str(tmp_path / name), "--out", str(tmp_path / "run")]) == 2
    assert "is not a valid UTF-8 file name" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bench_sizes_without_audit_is_refused(capsys):
    assert main(["bench", "--sizes", "8,16"]) == 2
    assert "--sizes is an option of 'bench --audit'" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_audit_checks_every_size_before_the_first_runs(tmp_path, capsys):
    assert main(["bench", "--audit", "--sizes", "8,5000", "--detectors", "msp"]) == 2
    err = capsys.readouterr().err
    assert "5000" in err or "lower --n" in err


def test_ood_photos_fit_images_larger_than_the_photos():
    images = _photos(3, (3, 300, 300), __import__("numpy").random.default_rng(0))
    assert images.shape == (3, 3, 300, 300) and 0 <= float(images.min()) <= float(images.max()) <= 1


def test_project_defaults_are_never_read_from_above_the_project_root(tmp_path, monkeypatch):
    from advdetect.config.options import find_pyproject, resolve

    (tmp_path / "pyproject.toml").write_text('[tool.advdetect]\nmodel = "evil.py:Net"\n')
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / "src").mkdir()
    monkeypatch.chdir(project / "src")
    assert find_pyproject() is None
    assert resolve({})[0]["model"] == "default"
    (project / "pyproject.toml").write_text("[tool.advdetect]\nn = 12\n")
    assert find_pyproject() == project / "pyproject.toml" and resolve({})[0]["n"] == 12


@pytest.mark.slow
def test_an_unusable_junitxml_target_is_refused_before_the_audit(tmp_path, capsys):
    for target in (tmp_path / ("x" * 300 + ".xml"), tmp_path / "a-file" / "audit.xml"):
        (tmp_path / "a-file").write_text("")
        assert main(["check", "nightly", "--junitxml", str(target), "--out", str(tmp_path / "run")]) == 2
        assert capsys.readouterr().err.count("\n") == 1
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_detector_variant_that_cannot_fit_in_memory_is_refused_before_any_work(tmp_path, capsys):
    suite = tmp_path / "greedy.toml"
    suite.write_text('[[attack]]\nname = "fgsm"\neps = [0.1]\n'
                     '[detector.greedy]\nbase = "confounding_gradient"\n'
                     'noise_levels = [0.1]\nnoise_draws = 100000000\n')
    assert main(["audit", str(suite), "--detectors", "greedy", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "detector greedy forwards 12800000000 inputs at once" in err and "lower its noise_draws" in err
    assert not (tmp_path / "run").exists()
