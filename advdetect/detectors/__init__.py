"""The detector registry. Adding a detector is one new file in this package: a
:class:`~advdetect.detectors.base.Detector` subclass decorated with :func:`register_detector`."""

from __future__ import annotations

import importlib
import pkgutil
from typing import TypeVar

from advdetect.detectors.base import Detector
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


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DETECTORS", "Detector", "get_detector", "register_detector"]
