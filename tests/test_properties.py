"""Property-based: whatever a suite file or the command line holds, an audit either runs or stops
before any work with exit 2 and one line; never a traceback, never a half-made run folder."""

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advdetect.attacks import get_attack
from advdetect.stages.attack import attack_cell
from advdetect.stages.preflight import probe_attacks
from advdetect.cli.commands import main
from advdetect.errors import ExitCode, UsageError
from advdetect.config.suite import parse_suite

ATTACKS = ("fgsm", "pgd", "bim", "cw", "deepfool", "apgd")
SETTINGS = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return "inf" if value == math.inf else "-inf" if value == -math.inf else repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


scalars = st.one_of(st.integers(0, 12), st.integers(-3, 12), st.floats(0, 2), st.floats(-2, 2),
                    st.sampled_from([math.nan, math.inf, -math.inf, 1e300]), st.booleans(),
                    st.sampled_from(["", "ce", "dlr", "Linf", "L2", "margin", "x$y"]))


@st.composite
def suite_texts(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(ATTACKS))
    keywords = get_attack(name).keywords
    numeric = [k for k, v in get_attack(name).defaults().items() if type(v) in (int, float)]
    axis = draw(st.sampled_from(numeric * 4 + list(keywords)))  # mostly a numeric axis, sometimes any keyword
    strengths = draw(st.lists(st.floats(0, 1.5) | st.integers(1, 12), min_size=1, max_size=3, unique_by=str))
    if draw(st.sampled_from([False] * 5 + [True])):  # now and then, a strength no attack can take
        strengths = draw(st.sampled_from([[], [math.inf], [-0.5], ["a"], [True], [0.1, 0.1]]))
    others = [k for k in keywords if k != axis]
    extras = draw(st.dictionaries(st.sampled_from(others), scalars, max_size=3)) if others else {}
    if draw(st.sampled_from([False] * 9 + [True])):
        extras["bogus"] = 1
    lines = ["[[attack]]", f'name = "{name}"', f"{axis} = {toml_value(strengths)}"]
    lines += [f"{key} = {toml_value(value)}" for key, value in extras.items()]
    return "\n".join(lines) + "\n"


TINY = """
import torch


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.head = torch.nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1))
"""
namespace: dict = {}
exec(TINY, namespace)
MODEL = namespace["Tiny"]().eval()
X = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
Y = MODEL(X).argmax(dim=1).detach()


@pytest.mark.slow
@SETTINGS
@given(text=suite_texts())
@pytest.mark.filterwarnings("ignore")
def test_any_suite_either_runs_or_is_refused_up_front_in_one_line(text: str):
    try:
        suite = parse_suite(text, "generated", "generated.toml")
        probe_attacks(MODEL, suite.cells(), X[:1], Y[:1], num_classes=3, seed=0)
    except UsageError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("generated.toml: ") or str(exc).startswith("attack ")
        return
    for cell in suite.cells():  # what passed the checks runs to the end
        adversarial, _ = attack_cell(MODEL, cell, X, Y, num_classes=3, seed=0, batch_size=2)
        assert adversarial.shape == X.shape and torch.isfinite(adversarial).all()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("properties")
    (root / "model.py").write_text(TINY)
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", x=rng.integers(0, 256, (90, 8, 8, 1), dtype=np.uint8), y=rng.integers(0, 3, 90))
    (root / "suite.toml").write_text('[[attack]]\nname = "fgsm"\neps = [0.3]\n')
    return root


options = st.fixed_dictionaries({}, optional={
    "--n": st.integers(-1, 95).map(str) | st.just("x"),
    "--seed": st.sampled_from(["0", "7", "-1", str(2**32), "1.5"]),
    "--fit-fraction": st.sampled_from(["0.2", "0.5", "0", "1", "nan", "-0.1"]),
    "--batch-size": st.sampled_from(["1", "7", "0", "-3"]),
    "--n-reference": st.sampled_from(["20", "30", "5", "0"]),
    "--device": st.sampled_from(["auto", "cpu", "meta", "cuda:x", "", "cuda:99"]),
    "--image-size": st.sampled_from(["8", "12", "0"]),
    "--mean": st.sampled_from(["0.5", "nan", "a", "0.1,0.2"]),
    "--std": st.sampled_from(["0.5", "0", "-1", "inf", "0.2,0.3"]),
})


@pytest.mark.slow
@settings(SETTINGS, max_examples=12)
@given(chosen=options)
@pytest.mark.filterwarnings("ignore")
def test_any_options_either_run_or_are_refused_up_front_in_one_line(chosen: dict, project: Path, capsys,
                                                                    monkeypatch):
    monkeypatch.chdir(project)
    out = Path(tempfile.mkdtemp(dir=project)) / "run"
    argv = ["-q", "audit", "suite.toml", "--model", "model.py:Tiny", "--data", "npz:data.npz", "--detectors", "msp",
            "--out", str(out), "--cache-dir", str(project / "cache")]
    defaults = {"--n": "40", "--n-reference": "30"}
    for flag, value in {**defaults, **chosen}.items():
        argv += [f"{flag}={value}"]
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (ExitCode.OK, ExitCode.USAGE_ERROR), err
    if code == ExitCode.OK:
        assert (out / "results.json").is_file()
    else:
        assert len(err) == 1 and err[0].startswith("advdetect: error: "), err
        assert not out.exists()
