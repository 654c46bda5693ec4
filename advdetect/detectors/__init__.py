"""The detector registry. Adding a detector is one new file in this package: a
:class:`~advdetect.detectors.base.Detector` subclass decorated with :func:`register_detector`."""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Iterable, TypeVar

from advdetect.detectors.base import Detector
from advdetect.errors import UsageError

if TYPE_CHECKING:
    from advdetect.suite import DetectorVariant

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


def build_detector(name: str, variants: Iterable["DetectorVariant"] = ()) -> Detector:
    """A detector by registered name, or by the name of a suite's variant of one."""
    for variant in variants:
        if variant.name == name:
            detector = get_detector(variant.base)(**variant.params)
            detector.variant_name = name
            return detector
    return get_detector(name)()


def detector_name(detector: Detector) -> str:
    return getattr(detector, "variant_name", detector.name)


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DETECTORS", "Detector", "build_detector", "detector_name", "get_detector", "register_detector"]
