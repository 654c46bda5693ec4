"""The detector registry. Adding a detector is one new file in this package: a
:class:`~advdetect.detectors.base.Detector` subclass decorated with :func:`register_detector`."""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
from dataclasses import dataclass
from typing import Any, TypeVar
from collections.abc import Iterable

from advdetect.detectors.base import COUNT, POSITIVE, Bounds, Detector, SignatureFunction
from advdetect.errors import UsageError

DETECTORS: dict[str, type[Detector]] = {}
D = TypeVar("D", bound=type[Detector])


def register_detector(cls: D) -> D:
    if cls.name in DETECTORS:
        raise ValueError(f"detector {cls.name!r} is registered twice")
    DETECTORS[cls.name] = cls
    return cls


def get_detector(name: str) -> type[Detector]:
    try:
        return DETECTORS[name]
    except KeyError:
        raise UsageError(f"unknown detector {name!r}; valid detectors: {', '.join(sorted(DETECTORS))}") from None


def check_params(cls: type[Detector], params: dict[str, object]) -> None:
    """Raise ValueError unless every value fits the type of the hyperparameter's default (whole
    numbers for counts, finite numbers, lists for sequences) and the bounds the class declares
    (:attr:`Detector.bounds`; a count at least 1 and a real number positive where it declares none)."""
    parameters = inspect.signature(cls.__init__).parameters
    defaults = {name: p.default for name, p in parameters.items()}
    for name, value in params.items():
        default = defaults.get(name)
        if isinstance(default, (tuple, list)):
            if not isinstance(value, (tuple, list)) or (default and not value):
                raise ValueError(f"{name} must be a{' non-empty' if default else ''} list; got {value!r}")
            # an empty default's items are numbers when the annotation says so (Sequence[float])
            item_default = default[0] if default else (0.0 if "float" in str(parameters[name].annotation) else "")
            for item in value:
                _check_scalar(cls, name, item, item_default)
        else:
            _check_scalar(cls, name, value, default)


def _check_scalar(cls: type[Detector], name: str, value: object, default: object) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool) or isinstance(default, str):
        if type(value) is not type(default):
            wanted = "true or false" if isinstance(default, bool) else "a string"
            raise ValueError(f"{name} must be {wanted}; got {value!r}")
        return
    if isinstance(default, int) and not (number and isinstance(value, int)):
        raise ValueError(f"{name} must be a whole number; got {value!r}")
    if not number or not math.isfinite(value):  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    bounds = cls.bounds.get(name, COUNT if isinstance(default, int) else POSITIVE)
    if not bounds.admits(value):  # type: ignore[arg-type]
        raise ValueError(f"{name} {value!r} is out of range")


@dataclass(frozen=True)
class DetectorVariant:
    """A registered detector under another name, with other constructor arguments (a suite's
    ``[detector.NAME]`` table)."""

    name: str
    base: str
    params: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}}

    @classmethod
    def from_dict(cls, name: str, table: dict[str, Any]) -> DetectorVariant:
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items() if k != "base"}
        return cls(name=name, base=table["base"], params=params)


def suite_variants(suite_document: dict[str, Any]) -> list[DetectorVariant]:
    """The detector variants of a suite as ``run.json`` records it (``[detector.NAME]`` tables)."""
    return [DetectorVariant.from_dict(name, table) for name, table in suite_document.get("detector", {}).items()]


def build_detector(name: str, variants: Iterable[DetectorVariant] = ()) -> Detector:
    """A detector by registered name, or by the name of a suite's variant of one."""
    for variant in variants:
        if variant.name == name:
            return get_detector(variant.base)(**variant.params)
    return get_detector(name)()


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DETECTORS", "Bounds", "Detector", "DetectorVariant", "SignatureFunction", "build_detector", "check_params",
           "suite_variants", "get_detector",
           "register_detector"]
