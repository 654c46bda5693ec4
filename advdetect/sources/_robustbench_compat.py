"""Import robustbench 1.1.1 where it does not import as shipped.

robustbench is only needed here for its model zoo (architectures, checkpoint paths,
``load_model``); three of its imports break on the installs advdetect supports:

1. torchvision: with a CPU build of torch, the PyPI torchvision wheel cannot load its
   compiled ops (``_C.so`` links against CUDA libraries), and then its
   ``_meta_registrations`` module fails at import, registering fake kernels for
   ``torchvision::nms`` that does not exist. Those kernels only serve the compiled ops
   (nms, roi_align, ...), which no robustbench classifier uses; so, only when that exact
   failure happens, torchvision is imported without that one module.
2. ``pkg_resources`` is gone from setuptools >= 81; robustbench uses only its
   ``resource_filename``, provided here from :mod:`importlib.resources` when it is missing.
3. robustbench imports ``autoattack``, a module the ``pyautoattack`` distribution it
   requires installs as ``pyautoattack``; it is aliased.

Each shim applies only when the real module is missing or broken. The stand-ins for 2 and 3
exist only while robustbench imports: left in ``sys.modules``, a fake ``pkg_resources``
breaks other code that probes for it (pytest's ``syspath_prepend`` does).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any


def _import_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401, F811


def _resource_filename(package: str, path: str) -> str:
    return str(resources.files(package) / path)


def _missing(name: str) -> bool:
    return name not in sys.modules and importlib.util.find_spec(name) is None


@contextmanager
def _stand_ins() -> Iterator[None]:
    """``pkg_resources`` and ``autoattack`` stand-ins while robustbench imports; removed afterwards
    (robustbench's modules keep their references), so other code never sees them."""
    added: dict[str, types.ModuleType] = {}
    if _missing("pkg_resources"):
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = _resource_filename  # type: ignore[attr-defined]
        added["pkg_resources"] = shim
    if _missing("autoattack"):
        added["autoattack"] = importlib.import_module("pyautoattack")
        added["autoattack.state"] = importlib.import_module("pyautoattack.state")
    sys.modules.update(added)
    try:
        yield
    finally:
        for name, module in added.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


def robustbench_utils() -> Any:
    """``robustbench.utils``; raises ModuleNotFoundError when robustbench is not installed."""
    if importlib.util.find_spec("robustbench") is None:
        raise ModuleNotFoundError("No module named 'robustbench'", name="robustbench")
    _import_torchvision()
    with _stand_ins():
        return importlib.import_module("robustbench.utils")
import_torchvision = _import_torchvision
