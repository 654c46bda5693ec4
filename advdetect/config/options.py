"""The audit's options, declared once. Each :class:`Option` of :data:`AUDIT_OPTIONS` holds its
type (a :class:`Kind`, which holds the range), its default and its help, and everything else is
made from them: the flags of ``advdetect audit`` (and ``check``, ``ood``, ``bench --audit``), the
pytest plugin's ``--advdetect-`` options, the keys of ``[tool.advdetect]`` in ``pyproject.toml``,
and the checks of the Python API's keywords. Adding an option is adding one :class:`Option` (and
its keyword to :func:`advdetect.audit`, whose signature is spelled out for type checkers;
``tests/test_options_declared_once.py`` fails until it is there).

One rule per option, applied wherever a value comes from: a flag's text (and a ``pyproject.toml``
value, turned into the text a flag would carry) by :meth:`Option.parse`, a Python value by
:meth:`Option.check`; :func:`validate` checks every value and the rules between options, once, at
the boundary. Torch-free: the pytest plugin imports it when pytest starts.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import math
import numbers
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from advdetect.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PYPROJECT = "pyproject.toml"
#: Fewest clean reference inputs an audit accepts (detectors fit class statistics on them).
MIN_REFERENCE = 20


class InvalidValue(ValueError):
    """A value that breaks an option's rule: ``rule`` says the rule (``must be at least 1``),
    ``shown`` the value as given; the message reads ``must be at least 1, got 0``."""

    def __init__(self, rule: str, shown: str) -> None:
        super().__init__(f"{rule}, got {shown}")
        self.rule, self.shown = rule, shown


def argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An option's parser as an argparse type (the CLI's and pytest's): its rule, said in the usage error."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except InvalidValue as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


# --- kinds: how an option's values are typed, and their range ----------------------------------


class Kind:
    """How one option's values are typed and bounded. :meth:`parse` reads a flag's text,
    :meth:`check` a Python value (a NumPy number included); both apply the same range."""

    #: what a value must be, as messages say it: "a whole number"
    noun = "a value"
    #: a list of values: comma-separated in a flag, a TOML list in pyproject.toml
    many = False

    def from_text(self, text: str) -> Any:
        return text

    def from_value(self, value: Any) -> Any:
        return value

    @property
    def rule(self) -> str:
        """The range, as messages say it: "must be at least 1"."""
        return f"must be {self.noun}"

    def holds(self, value: Any) -> bool:
        return True

    def parse(self, text: str) -> Any:
        value = self.from_text(text)
        if not self.holds(value):
            raise InvalidValue(self.rule, repr(value) if isinstance(value, str) else text)
        return value

    def check(self, value: Any) -> Any:
        typed = self.from_value(value)
        if not self.holds(typed):
            raise InvalidValue(self.rule, repr(typed))
        return typed

    def _not_text(self, text: str) -> InvalidValue:
        return InvalidValue(f"expected {self.noun}", repr(text))

    def _not_value(self, value: Any) -> InvalidValue:
        return InvalidValue(f"must be {self.noun}", repr(value))


class Text(Kind):
    """A string."""

    noun = "a string"

    def from_value(self, value: Any) -> str:
        if not isinstance(value, str):
            raise self._not_value(value)
        return value


class Spec(Kind):
    """A spec (``default``, ``torchvision:NAME``, ``npz:FILE``, a suite file...); the Python API
    may give an object instead (a module, tensors, a loaded suite), which its own loader checks."""

    noun = "a spec"


class FilePath(Kind):
    """A path; a ``str`` where the value is recorded in ``run.json`` as given (``as_text``)."""

    noun = "a path"

    def __init__(self, as_text: bool = False) -> None:
        self.as_text = as_text

    def from_text(self, text: str) -> str | Path:
        return text if self.as_text else Path(text)

    def from_value(self, value: Any) -> str | Path:
        if not isinstance(value, (str, os.PathLike)):
            raise self._not_value(value)
        return os.fspath(value) if self.as_text else Path(value)


class Whole(Kind):
    """A whole number from ``low`` (to ``high``), or ``off``, the number that turns the option off."""

    noun = "a whole number"

    def __init__(self, low: int, high: int | None = None, off: int | None = None) -> None:
        self.low, self.high, self.off = low, high, off

    @property
    def rule(self) -> str:
        if self.off is not None:
            return f"must be {self.off} (off) or at least {self.low}"
        if self.high is not None:
            return f"must be a whole number from {self.low} to {self.high}"
        return f"must be at least {self.low}"

    def holds(self, value: int) -> bool:
        return value == self.off or (self.low <= value and (self.high is None or value <= self.high))

    def from_text(self, text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise self._not_text(text) from None

    def from_value(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise self._not_value(value)
        return int(value)


class Fraction(Kind):
    """A number strictly between 0 and 1."""

    noun = "a number"
    rule = "must lie strictly between 0 and 1"

    def holds(self, value: float) -> bool:
        return 0.0 < value < 1.0

    def from_text(self, text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise self._not_text(text) from None

    def from_value(self, value: Any) -> int | float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise self._not_value(value)
        return int(value) if isinstance(value, numbers.Integral) else float(value)


class Choice(Kind):
    """One of a few names (an ``Enum`` member of them counts as its value)."""

    def __init__(self, *allowed: str) -> None:
        self.allowed = allowed
        self.noun = f"one of {', '.join(allowed)}"

    @property
    def rule(self) -> str:
        return f"must be {self.noun}"

    def holds(self, value: Any) -> bool:
        return value in self.allowed

    def from_value(self, value: Any) -> Any:
        return value.value if isinstance(value, Enum) else value


class Names(Kind):
    """Names: comma-separated in a flag (or a Python string), a list in TOML or Python."""

    noun = "comma-separated names"
    many = True

    def from_text(self, text: str) -> list[str]:
        listed = [name.strip() for name in text.split(",") if name.strip()]
        if not listed:
            raise self._not_text(text)
        return listed

    def from_value(self, value: Any) -> list[str]:
        if isinstance(value, str):  # one string is a comma-separated list, as in a flag (never a list of letters)
            return [name.strip() for name in value.split(",") if name.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value):
            return list(value)
        raise InvalidValue("must be a list of names", repr(value))


class Numbers(Kind):
    """Finite numbers: comma-separated in a flag, a list in TOML or Python."""

    noun = "finite numbers"
    many = True

    def from_text(self, text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise InvalidValue("expected comma-separated numbers", repr(text)) from None
        if not all(math.isfinite(v) for v in values):
            raise InvalidValue(f"expected {self.noun}", text)
        return values

    def from_value(self, value: Any) -> tuple[float, ...]:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise self._not_value(value)
        values = list(value)
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise self._not_value(values)
        return tuple(float(v) for v in values)


class Switch(Kind):
    """On or off: ``--name``/``--no-name`` on the command line, ``true``/``false`` in TOML."""

    noun = "true or false"

    def from_value(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self._not_value(value)
        return value


# --- the options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One audit option: ``name`` is its keyword (``n_reference``), ``--n-reference`` its flag,
    ``kind`` its type and range. ``None`` is a value wherever the default is None, and for
    ``optional`` options (``n=None``: every input) through the Python API."""

    name: str
    help: str
    kind: Kind
    default: Any = None
    #: what the help says the default is, where the value alone does not say it
    shown_default: str | None = None
    optional: bool = False
    path: bool = False  #: holds a path, read relative to the pyproject.toml that gives it
    metavar: str | None = None
    positional: bool = False

    @property
    def option_string(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def flag(self) -> bool:
        """A switch: present or not (``--no-NAME``), ``true``/``false`` in pyproject.toml."""
        return isinstance(self.kind, Switch)

    @property
    def help_text(self) -> str:
        """The help, with the default said (a switch's help says its own)."""
        shown = self.shown_default or (None if self.default is None or self.flag else self.default)
        return self.help if shown is None else f"{self.help} (default: {shown})"

    def parse(self, text: str) -> Any:
        """The value of a flag's text; :class:`InvalidValue` when it breaks the option's rule."""
        return self.kind.parse(text)

    def check(self, value: Any) -> Any:
        """A Python value, typed as the option's (a NumPy whole number as an ``int``, a path as a
        ``Path``); :class:`InvalidValue` when it breaks the option's rule."""
        if value is None and (self.default is None or self.optional):
            return None
        return self.kind.check(value)

    def from_toml(self, value: Any) -> Any:
        """The option's value from a TOML value, checked by the same parser as the flag's text."""
        if self.flag:
            if not isinstance(value, bool):
                raise InvalidValue("expected true or false", repr(value))
            return value
        if isinstance(value, (bool, dict)):
            raise InvalidValue(f"expected {'a list or ' if self.kind.many else ''}a value", repr(value))
        if isinstance(value, list):
            if not self.kind.many:
                raise InvalidValue("expected one value", f"a list {value!r}")
            value = ",".join(str(v) for v in value)
        return self.parse(str(value))


#: Every option of ``advdetect audit`` (``check`` and ``ood`` take the same, less ``suite`` and
#: ``attacks`` for ``ood``), in the order ``--help`` lists them.
AUDIT_OPTIONS: tuple[Option, ...] = (
    Option("suite", "a suite TOML file, or the name of a built-in suite", Spec(), default="default", positional=True),
    Option("model", "default, torchvision:NAME, timm:NAME, robustbench:NAME, file.py:Callable, package.module:Callable "
                    "or a TorchScript file.pt", Spec(), default="default", shown_default="the embedded MNIST CNN"),
    Option("weights", "weights for the model spec: .safetensors, or a state_dict in .pt/.pth", FilePath(as_text=True),
           path=True, metavar="FILE"),
    Option("dataset", "robustbench:NAME's dataset", Choice("cifar10", "cifar100", "imagenet"), default="cifar10"),
    Option("threat_model", "robustbench:NAME's threat model", Choice("Linf", "L2", "corruptions"), default="Linf"),
    Option("model_dir", "robustbench checkpoints, as <dir>/<dataset>/<threat_model>/<NAME>.pt", FilePath(as_text=True),
           default="./models", path=True, metavar="DIR"),
    Option("mean", "comma-separated per-channel mean the model expects inputs normalized by", Numbers(), metavar="M"),
    Option("std", "comma-separated per-channel std, with --mean", Numbers(), metavar="S"),
    Option("data", "default, folder:DIR, cifar10:ROOT, cifar100:ROOT, mnist:ROOT, svhn:ROOT or npz:FILE", Spec(),
           default="default", shown_default="the embedded MNIST test split"),
    Option("image_size", "resize images to this size (folder data: the shorter side, then a center crop)", Whole(1),
           metavar="N"),
    Option("crop", "folder data: center-crop to this square size after resizing (ImageNet style)", Whole(1),
           metavar="N"),
    Option("n", "inputs to audit, a seeded class-stratified sample", Whole(1), default=256, optional=True),
    Option("attacks", "comma-separated attack ids: run only these attacks of the suite", Names(), metavar="IDS"),
    Option("detectors", "comma-separated detector names, registered or the suite's [detector.NAME] variants", Names(),
           shown_default="all registered, then the suite's variants", metavar="NAMES"),
    Option("n_reference", "clean reference inputs, drawn from the data beside the audited ones, that detectors fit "
                          "class statistics and one-class models on", Whole(MIN_REFERENCE), default=256),
    Option("noisy_negatives", "control: add Gaussian-noise copies of the clean inputs, as far in L2 as their "
                              "adversarial examples, to the negatives", Switch(), default=False),
    Option("seed", "seed for sampling, attacks and splits", Whole(0, 2**32 - 1), default=0),
    Option("device", "auto (CUDA when present), cpu, cuda or cuda:N", Text(), default="auto"),
    Option("batch_size", "batch size for attacks and features", Whole(1), default=128),
    Option("fit_fraction", "share of the correctly classified inputs whose (clean, adversarial) pairs calibrate the "
                           "detectors; the rest test them", Fraction(), default=0.2),
    Option("fit_folds", "cross-fit the supervised detectors over K folds of the correctly classified inputs: each "
                        "fold is tested by detectors fitted on the other K-1, so every fooled pair is tested and "
                        "(K-1)/K of them fit; replaces the single --fit-fraction split", Whole(2, off=0), default=0,
           shown_default="0, off", metavar="K"),
    Option("out", "run folder to create", FilePath(), shown_default="reports/<timestamp>", path=True, metavar="DIR"),
    Option("cache_dir", "where adversarial inputs are cached between runs", FilePath(),
           shown_default="<user cache>/advdetect/attacks", path=True, metavar="DIR"),
    Option("cache", "read and write the attack cache (default: on; --no-cache: neither)", Switch(), default=True),
)

OPTIONS_BY_NAME = {option.name: option for option in AUDIT_OPTIONS}
#: Options whose value is a spec that may name a path (``folder:DIR``, ``file.py:Class``, a suite file).
_SPECS = ("suite", "model", "data")


def defaults() -> dict[str, Any]:
    """Every option's built-in default."""
    return {option.name: option.default for option in AUDIT_OPTIONS}


def validate(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (Python values, by option name) checked by their declarations, and the rules
    between options; a :class:`UsageError` in one line, flag named, for the first that breaks one."""
    checked = {}
    for name, value in values.items():
        option = OPTIONS_BY_NAME.get(name)
        if option is None:
            raise TypeError(f"no audit option {name!r}; valid options: {', '.join(OPTIONS_BY_NAME)}")
        try:
            checked[name] = option.check(value)
        except InvalidValue as exc:
            raise UsageError(f"{option.option_string} {exc.rule}; got {exc.shown}") from None
    crop, image_size = checked.get("crop"), checked.get("image_size")
    if crop is not None and image_size is not None and crop > image_size:
        raise UsageError(f"--crop {crop} is larger than --image-size {image_size}, the side images are resized to "
                         f"before the crop; give a crop of at most the image size")
    n, folds = checked.get("n"), checked.get("fit_folds")
    if n is not None and folds is not None and folds > n:
        raise UsageError(f"--fit-folds {folds} is more folds than the {n} audited inputs; use at most --n folds "
                         f"(5 or 10 is usual)")
    return checked


def positive_int(text: str) -> int:
    """A whole number of at least 1, from a flag's text (for flags outside :data:`AUDIT_OPTIONS`)."""
    return int(Whole(1).parse(text))


def positive_ints(text: str) -> list[int]:
    values = [positive_int(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise InvalidValue("expected comma-separated whole numbers", repr(text))
    return sorted(set(values))


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
        raise UsageError(f"{pyproject} is not readable TOML ({exc}); "
                         "fix it, or run advdetect from another folder") from None
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
