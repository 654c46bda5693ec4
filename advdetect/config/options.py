"""The audit's options, declared once: the command line, the pytest plugin and the project's
``[tool.advdetect]`` defaults in ``pyproject.toml`` are all made from :data:`AUDIT_OPTIONS`.

Every option has one parser from text, so a value is checked the same way wherever it comes
from; a value from ``pyproject.toml`` (a TOML number, string, list or boolean) is turned into
the text a flag would carry and parsed like one. Torch-free.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from advdetect.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PYPROJECT = "pyproject.toml"


class InvalidValue(ValueError):
    """A value that breaks an option's rule; its message says the rule."""


def argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An option's parser as an argparse type (the CLI's and pytest's): its rule, said in the usage error."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except InvalidValue as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidValue(f"expected a whole number, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidValue(f"expected a number, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise InvalidValue(f"must be at least 1, got {text}")
    return value


def positive_ints(text: str) -> list[int]:
    values = [positive_int(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise InvalidValue(f"expected comma-separated whole numbers, got {text!r}")
    return sorted(set(values))


def seed(text: str) -> int:
    value = _whole(text)
    if not 0 <= value < 2**32:
        raise InvalidValue(f"must be from 0 to {2**32 - 1}, got {text}")
    return value


def fraction(text: str) -> float:
    value = _number(text)
    if not 0.0 < value < 1.0:
        raise InvalidValue(f"must lie strictly between 0 and 1, got {text}")
    return value


def fold_count(text: str) -> int:
    value = _whole(text)
    if value < 0 or value == 1:
        raise InvalidValue(f"must be 0 (off) or at least 2, got {text}")
    return value


def floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InvalidValue(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise InvalidValue(f"expected finite numbers, got {text}")
    return values


def names(text: str) -> list[str]:
    listed = [n.strip() for n in text.split(",") if n.strip()]
    if not listed:
        raise InvalidValue(f"expected comma-separated names, got {text!r}")
    return listed


def choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise InvalidValue(f"must be one of {', '.join(allowed)}, got {text!r}")
        return text

    return parse


def text(value: str) -> str:
    return value


def path(value: str) -> Path:
    return Path(value)


@dataclass(frozen=True)
class Option:
    """One audit option: ``name`` is its keyword (``n_reference``), ``--n-reference`` its flag."""

    name: str
    help: str
    parse: Callable[[str], Any] = text
    default: Any = None
    flag: bool = False  #: a switch: present or not, ``true``/``false`` in pyproject.toml
    path: bool = False  #: a path, read relative to the pyproject.toml that gives it
    metavar: str | None = None
    positional: bool = False

    @property
    def option_string(self) -> str:
        return "--" + self.name.replace("_", "-")

    def from_toml(self, value: Any) -> Any:
        """The option's value from a TOML value, checked by the same parser as the flag's text."""
        if self.flag:
            if not isinstance(value, bool):
                raise InvalidValue(f"expected true or false, got {value!r}")
            return value
        if isinstance(value, bool) or isinstance(value, dict):
            raise InvalidValue(f"expected {'a list or ' if self.parse in (names, floats) else ''}a value, got {value!r}")
        if isinstance(value, list):
            if self.parse not in (names, floats):
                raise InvalidValue(f"expected one value, got a list {value!r}")
            value = ",".join(str(v) for v in value)
        return self.parse(str(value))


_MODEL_HELP = ("default, torchvision:NAME, timm:NAME, robustbench:NAME, file.py:Callable, package.module:Callable "
               "or a TorchScript file.pt (default: the embedded MNIST CNN)")
_DATA_HELP = ("default, folder:DIR, cifar10:ROOT, cifar100:ROOT, mnist:ROOT, svhn:ROOT or npz:FILE "
              "(default: the embedded MNIST test split)")

#: Every option of ``advdetect audit`` (``check`` and ``ood`` take the same, less ``suite`` and
#: ``attacks`` for ``ood``), in the order ``--help`` lists them.
AUDIT_OPTIONS: tuple[Option, ...] = (
    Option("suite", "a suite TOML file, or the name of a built-in suite (default: default)", default="default",
           positional=True),
    Option("model", _MODEL_HELP, default="default"),
    Option("weights", "weights for the model spec: .safetensors, or a state_dict in .pt/.pth", path=True, metavar="FILE"),
    Option("dataset", "robustbench:NAME's dataset (default: cifar10)", choice("cifar10", "cifar100", "imagenet"),
           default="cifar10"),
    Option("threat_model", "robustbench:NAME's threat model (default: Linf)", choice("Linf", "L2", "corruptions"),
           default="Linf"),
    Option("model_dir", "robustbench checkpoints, as <dir>/<dataset>/<threat_model>/<NAME>.pt (default: ./models)",
           default="./models", path=True, metavar="DIR"),
    Option("mean", "comma-separated per-channel mean the model expects inputs normalized by", floats, metavar="M"),
    Option("std", "comma-separated per-channel std, with --mean", floats, metavar="S"),
    Option("data", _DATA_HELP, default="default"),
    Option("image_size", "resize images to this size (folder data: the shorter side, then a center crop)",
           positive_int, metavar="N"),
    Option("crop", "folder data: center-crop to this square size after resizing (ImageNet style)", positive_int,
           metavar="N"),
    Option("n", "inputs to audit, a seeded class-stratified sample (default: 256)", positive_int, default=256),
    Option("attacks", "comma-separated attack ids: run only these attacks of the suite", names, metavar="IDS"),
    Option("detectors", "comma-separated detector names, registered or the suite's [detector.NAME] variants "
                        "(default: all registered, then the suite's variants)", names, metavar="NAMES"),
    Option("n_reference", "clean reference inputs, drawn from the data beside the audited ones, that detectors fit "
                          "class statistics and one-class models on (default: 256)", positive_int, default=256),
    Option("noisy_negatives", "control: add Gaussian-noise copies of the clean inputs, as far in L2 as their "
                              "adversarial examples, to the negatives", flag=True, default=False),
    Option("seed", "seed for sampling, attacks and splits (default: 0)", seed, default=0),
    Option("device", "auto (CUDA when present), cpu, cuda or cuda:N (default: auto)", default="auto"),
    Option("batch_size", "batch size for attacks and features (default: 128)", positive_int, default=128),
    Option("fit_fraction", "share of the correctly classified inputs whose (clean, adversarial) pairs calibrate the "
                           "detectors; the rest test them (default: 0.2)", fraction, default=0.2),
    Option("fit_folds", "cross-fit the supervised detectors over K folds of the correctly classified inputs: each "
                        "fold is tested by detectors fitted on the other K-1, so every fooled pair is tested and "
                        "(K-1)/K of them fit; replaces the single --fit-fraction split (default: 0, off)", fold_count,
           default=0, metavar="K"),
    Option("out", "run folder to create (default: reports/<timestamp>)", path, path=True, metavar="DIR"),
    Option("cache_dir", "where adversarial inputs are cached between runs (default: <user cache>/advdetect/attacks)",
           path, path=True, metavar="DIR"),
    Option("cache", "read and write the attack cache (default: on; --no-cache: neither)", flag=True, default=True),
)

OPTIONS_BY_NAME = {option.name: option for option in AUDIT_OPTIONS}
#: Options whose value is a spec that may name a path (``folder:DIR``, ``file.py:Class``, a suite file).
_SPECS = ("suite", "model", "data")


#: Folders that mark a project's root: the search for ``pyproject.toml`` goes no higher.
ROOT_MARKERS = (".git", ".hg", ".svn")


def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest ``pyproject.toml`` in ``start`` (default: the working folder) or above it, up to
    the project's root (a folder holding ``.git``, ``.hg`` or ``.svn``) or, outside a repository,
    the home folder: a ``pyproject.toml`` above the project (which may name code to import) is
    never read, as pytest bounds its own search at its rootdir."""
    here = (start or Path.cwd()).resolve()
    home = Path.home().resolve()
    for folder in (here, *here.parents):
        candidate = folder / PYPROJECT
        if candidate.is_file():
            return candidate
        if any((folder / marker).exists() for marker in ROOT_MARKERS) or folder == home:
            return None
    return None


def project_defaults(pyproject: Path | None = None) -> tuple[dict[str, Any], Path | None]:
    """The audit defaults of ``[tool.advdetect]`` in the nearest ``pyproject.toml``, checked and
    parsed, with relative paths read from that file's folder; and the file (None when none)."""
    pyproject = pyproject or find_pyproject()
    if pyproject is None:
        return {}, None
    try:
        document = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{pyproject} is not readable TOML ({exc}); fix it, or run advdetect from another folder") from None
    tool = document.get("tool", {})
    table = tool.get("advdetect", {}) if isinstance(tool, dict) else None
    if not isinstance(table, dict):
        raise UsageError(f"{pyproject}: [tool.advdetect] must be a table of audit options")
    defaults: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name in spelled:
            raise UsageError(f"{pyproject}: [tool.advdetect] gives {spelled[name]!r} and {key!r}, the same option; "
                             f"keep one")
        spelled[name] = key
        option = OPTIONS_BY_NAME.get(name)
        if option is None:
            close = difflib.get_close_matches(name, OPTIONS_BY_NAME, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UsageError(f"{pyproject}: [tool.advdetect] has no option {key!r}; {hint}valid options: "
                             f"{', '.join(OPTIONS_BY_NAME)}")
        try:
            parsed = option.from_toml(value)
        except InvalidValue as exc:
            raise UsageError(f"{pyproject}: [tool.advdetect] {key}: {exc}") from None
        defaults[name] = _from_folder(option, parsed, pyproject.parent)
    return defaults, pyproject


def _from_folder(option: Option, value: Any, folder: Path) -> Any:
    """``value`` with a relative path in it read from ``folder`` (the pyproject.toml's), when the
    path names something there: a path option, a suite file, ``file.py:Callable``, a TorchScript
    file, ``folder:DIR`` or ``npz:FILE``."""
    if value is None or (not option.path and (option.name not in _SPECS or not isinstance(value, str))):
        return value
    if option.path:
        return value if Path(value).is_absolute() else type(value)(folder / value)
    head, target, tail = "", value, ""
    if option.name == "suite" and not value.endswith(".toml") and "/" not in value:
        return value  # a built-in suite's name
    if option.name == "model" and ":" not in value and not value.endswith((".pt", ".pth")):
        return value  # default
    if option.name == "model" and ":" in value:
        target, _, attribute = value.rpartition(":")
        if not target.endswith(".py"):
            return value  # robustbench:NAME, torchvision:NAME, package.module:Callable
        tail = f":{attribute}"
    elif option.name == "data":
        if ":" not in value:
            return value  # default
        kind, _, target = value.partition(":")
        head = f"{kind}:"
    if target and not Path(target).is_absolute() and (folder / target).exists():
        return f"{head}{folder / target}{tail}"
    return value


def resolve(given: dict[str, Any], *, skip: tuple[str, ...] = ()) -> tuple[dict[str, Any], Path | None]:
    """Every audit option's value: ``given`` (flags; None where not given), else the project's
    ``[tool.advdetect]`` default, else the built-in default; and the pyproject.toml read (or None)."""
    defaults, pyproject = project_defaults()
    if pyproject is not None and defaults:
        logging.getLogger("advdetect").info("audit defaults from [tool.advdetect] in %s: %s", pyproject,
                                            ", ".join(sorted(defaults)))
    values = {}
    for option in AUDIT_OPTIONS:
        if option.name in skip:
            continue
        value = given.get(option.name)
        values[option.name] = value if value is not None else defaults.get(option.name, option.default)
    return values, pyproject
