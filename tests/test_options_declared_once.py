"""Each audit option is declared once (advdetect/config/options.py): its flag, its pytest option, its
``[tool.advdetect]`` key and its ``advdetect.audit`` keyword come from that declaration, with the
same default and the same rule. Adding an option is adding its :class:`Option` (and the keyword
``audit()`` spells out for type checkers, which the first test asks for); and ``audit()`` takes a
``Dataset`` or a ``DataLoader`` as it takes tensors."""

import inspect

import pytest
import torch
from helpers import results_without_timings
from torch.utils.data import DataLoader, Dataset, TensorDataset

import advdetect
from advdetect.cli.commands import audit_options, build_parser
from advdetect.config.options import (
    AUDIT_OPTIONS,
    Choice,
    FilePath,
    Fraction,
    Names,
    Numbers,
    Spec,
    Text,
    Whole,
    defaults,
    project_defaults,
    resolve,
)
from advdetect.errors import UsageError
from advdetect.stages.preflight import build_options

#: A value of each kind of option as a flag's text, other than the default where the kind allows it,
#: so that a value seen at the far end came through. A new kind of option adds its line here.
SAMPLE_TEXT = {
    Whole: lambda kind: str(kind.low + 1),
    Fraction: lambda kind: "0.25",
    Choice: lambda kind: kind.allowed[-1],
    Names: lambda kind: "msp,energy",
    Numbers: lambda kind: "0.5,0.25",
    FilePath: lambda kind: "elsewhere",
    Text: lambda kind: "cpu",
    Spec: lambda kind: "default",
}


def sample_text(option):
    return SAMPLE_TEXT[type(option.kind)](option.kind)


def flags(names=None, skip=()):
    """Every option (less ``skip``) as command-line words, each with its sample value; and the values expected."""
    words, expected = [], {}
    for option in AUDIT_OPTIONS:
        if option.name in skip:
            continue
        if option.flag:  # the opposite of the default
            words.append(option.option_string if not option.default else f"--no-{option.option_string[2:]}")
            expected[option.name] = not option.default
        elif option.positional:
            words.append(sample_text(option))
            expected[option.name] = sample_text(option)
        else:
            words += [option.option_string, sample_text(option)]
            expected[option.name] = option.parse(sample_text(option))
    return words, expected


@pytest.fixture
def no_project(tmp_path, monkeypatch):
    """A working folder under no pyproject.toml, so that only the built-in defaults apply."""
    (tmp_path / ".git").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_audit_takes_every_option_as_a_keyword_with_its_declared_default():
    parameters = inspect.signature(advdetect.audit).parameters
    assert not [p for p in parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]  # no **model_options
    assert set(parameters) == set(defaults())
    assert {name: parameters[name].default for name in parameters} == defaults()


@pytest.mark.parametrize("command", ["audit", "check", "ood", "bench"])
def test_every_option_is_a_flag_of_the_commands_that_audit(command):
    skip = ("suite", "attacks") if command == "ood" else ()
    words, expected = flags(skip=skip)
    args = build_parser().parse_args([command, *words])
    assert {name: getattr(args, name) for name in expected} == expected


def test_every_option_is_a_pytest_option(pytester):
    words, expected = flags(skip=("suite",))
    config = pytester.parseconfig(*words_for_pytest(words))
    assert {name: config.getoption(f"advdetect_{name}") for name in expected} == expected
    assert config.getoption("advdetect_suite") is None  # without it the plugin does nothing


def words_for_pytest(words):
    return [f"--advdetect-{word[2:]}" if word.startswith("--") else word for word in words]


def test_every_option_is_a_key_of_tool_advdetect(no_project):
    def toml(option, text):  # numbers unquoted, strings quoted
        return text if isinstance(option.kind, (Whole, Fraction, Numbers)) else repr(text)

    lines = []
    for option in AUDIT_OPTIONS:
        if option.flag:
            lines.append(f"{option.name} = {'false' if option.default else 'true'}")
        elif option.kind.many:
            lines.append(f"{option.name} = [{', '.join(toml(option, v) for v in sample_text(option).split(','))}]")
        else:
            lines.append(f"{option.name} = {toml(option, sample_text(option))}")
    (no_project / "pyproject.toml").write_text("[tool.advdetect]\n" + "\n".join(lines) + "\n")
    values, pyproject = project_defaults()
    _, expected = flags()
    for name in ("weights", "model_dir", "out", "cache_dir"):  # paths, read from the pyproject.toml's folder
        expected[name] = type(expected[name])(no_project / expected[name])
    assert pyproject == no_project / "pyproject.toml" and values == expected


def test_left_out_everywhere_every_option_takes_its_declared_default(no_project):
    values, pyproject = resolve({})
    assert pyproject is None and values == defaults()
    assert audit_options(build_parser().parse_args(["audit"])) == build_options()


@pytest.mark.parametrize("option", [o for o in AUDIT_OPTIONS if not o.flag], ids=lambda o: o.name)
def test_a_flags_value_passes_the_same_rule_given_through_python(option):
    """A flag's value is checked again with the other options at the boundary: the rule must take it."""
    parsed = option.parse(sample_text(option))
    assert option.check(parsed) == parsed


# --- data as a Dataset or a DataLoader ------------------------------------------------------------


class Pairs(Dataset):
    """(image, label) items, the label a plain int, as torchvision's datasets give them."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class Pixels(torch.nn.Module):
    """A linear model of the centred pixels, which gives every class to some random images."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(64, 3)

    def forward(self, x):
        return self.head((x - 0.5).flatten(1))


def pixels_model():
    torch.manual_seed(0)
    return Pixels().eval()


def tiny_data(model):
    """60 images the model gives every class to, labelled by it except every fourth (so that some are wrong)."""
    x = torch.rand(60, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    y[::4] = (y[::4] + 1) % 3
    return x, y


def tiny_audit(tmp_path, data, name):
    return advdetect.audit(pixels_model(), data, suite="default", attacks=["fgsm"], detectors=["msp"], n=10,
                           n_reference=30, batch_size=4, out=tmp_path / name, cache=False)


@pytest.mark.slow
def test_a_dataset_or_a_dataloader_gives_the_audit_of_its_tensors(tmp_path):
    x, y = tiny_data(pixels_model())
    result = tiny_audit(tmp_path, (x, y), "tensors")
    expected = results_without_timings(result.run_dir)
    assert results_without_timings(tiny_audit(tmp_path, Pairs(x, y), "dataset").run_dir) == expected
    loader = DataLoader(TensorDataset(x, y), batch_size=7)
    assert results_without_timings(tiny_audit(tmp_path, loader, "loader").run_dir) == expected

    # the result, typed: robust accuracy per cell, detection rows, verdict, paths; results.json as written
    assert result.results is result.document and result.results["schema"]
    cells = result.attacks
    suite_cells = advdetect.load_suite("default").select(["fgsm"]).cells()
    assert [c.key for c in cells] == list(result.robust_accuracy) == [cell.key for cell in suite_cells]
    for cell in cells:  # the share of all 10 audited inputs classified correctly, and still under the attack
        assert result.robust_accuracy[cell.key] == pytest.approx((cell.n_attacked - cell.n_fooled) / 10)
    assert cells[-1].n_fooled > 0 and result.robust_accuracy[cells[-1].key] < result.clean_accuracy
    assert {row.detector for row in result.rows} == {"msp"} and result.verdict is None  # the default suite sets none
    assert result.run_json.is_file() and result.results_json.is_file() and result.report_html.is_file()


@pytest.mark.slow
def test_a_shuffling_dataloader_or_pairless_data_is_refused_before_any_work(tmp_path):
    x, y = tiny_data(pixels_model())
    with pytest.raises(UsageError, match=r"^the DataLoader given as data draws its inputs at random, .*shuffle=False$"):
        tiny_audit(tmp_path, DataLoader(TensorDataset(x, y), shuffle=True), "shuffled")
    with pytest.raises(UsageError, match=r"^data must yield \(images, labels\) pairs; batch 0 is 3 items$"):
        tiny_audit(tmp_path, TensorDataset(x, y, y), "triples")
    with pytest.raises(UsageError, match=r"^--n must be at least 1; got 0$"):  # options first: nothing is read
        advdetect.audit(pixels_model(), DataLoader(TensorDataset(x, y), shuffle=True), n=0)
    assert not list(tmp_path.iterdir())
