"""The attack registry: every attack an audit suite may name.

Every `torchattacks` attack that needs nothing but a model to build is registered
under its lower-case class name. To add an attack that torchattacks lacks, add one
file to this package that calls :func:`register_attack` with a factory taking the
model as first argument; the package imports every module in it. A module may also
replace a torchattacks attack by another implementation (``replaces=True``), as
:mod:`advdetect.attacks.deepfool` does.
"""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torchattacks

from advdetect.errors import UsageError


@dataclass(frozen=True)
class AttackEntry:
    """A registered attack: how to build it and which keywords it accepts."""

    name: str
    factory: Callable[..., Any]

    @property
    def keywords(self) -> tuple[str, ...]:
        return tuple(self.defaults())

    def defaults(self) -> dict[str, Any]:
        params = list(inspect.signature(self.factory).parameters.values())[1:]  # drop the model
        return {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    @property
    def real_valued(self) -> frozenset[str]:
        """Keywords whose default is a whole number but that take any number: the attack class's
        own ``real_valued``, else the table for torchattacks' classes, which cannot declare it."""
        return getattr(self.factory, "real_valued", TORCHATTACKS_REAL_VALUED)

    @property
    def budgets(self) -> dict[str, int]:
        """Iteration budgets and the least value of each, which the trial run cuts them to: the
        attack class's own ``budgets``, else the table for torchattacks' classes."""
        return getattr(self.factory, "budgets", TORCHATTACKS_BUDGETS)

    def check_value(self, keyword: str, value: Any) -> None:
        """Raise ValueError when ``value`` cannot be the ``keyword`` argument, judged by the type of
        its default (torchattacks checks almost nothing, and fails deep in an attack instead)."""
        default = self.defaults().get(keyword, inspect.Parameter.empty)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and not math.isfinite(value):
            raise ValueError(f"{keyword} must be a finite number; got {value}")
        if isinstance(default, bool):
            wanted = "true or false" if not isinstance(value, bool) else None
        elif (isinstance(default, int) and keyword not in self.real_valued) or (default is None and keyword == "seed"):
            wanted = "a whole number" if not (number and isinstance(value, int)) else None
        elif isinstance(default, (int, float)):
            wanted = "a number" if not number else None
        elif isinstance(default, str):
            wanted = "a string" if not isinstance(value, str) else None
        elif default is inspect.Parameter.empty or default is None:
            wanted = None
        else:
            wanted = f"a {type(default).__name__}, which a suite cannot give"
        if wanted:
            raise ValueError(f"{keyword} must be {wanted}; got {value!r}")
        least = 1 if keyword in self.budgets else 0  # the trial run cuts budgets to 1: check them here
        if number and value < least:
            raise ValueError(f"{keyword} must be at least {least}; got {value!r}")

    def build(self, model: torch.nn.Module, **params: Any) -> Any:
        return self.factory(model, **params)

    def probe_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` with every iteration budget cut to its least, for a quick trial run."""
        return {**params, **{k: v for k, v in self.budgets.items() if k in self.keywords}}


#: torchattacks' keywords whose default is a whole number but that take any number (an attack class
#: of our own declares ``real_valued`` instead).
TORCHATTACKS_REAL_VALUED = frozenset({"c", "kappa", "lam", "scale", "nsig"})
#: torchattacks' iteration budgets, cut to these values by the trial run that checks each attack cell
#: before an audit (an attack class of our own declares ``budgets`` instead).
TORCHATTACKS_BUDGETS = {"steps": 1, "max_iterations": 1, "max_iter": 1, "n_queries": 2, "nb_iter": 1, "num_iter_set": 1,
                "restarts": 1, "binary_search_steps": 1, "n_restarts": 1, "eot_iter": 1, "popsize": 2, "nb_sample": 2,
                "noise_batch_size": 1}
#: Attacks the trial run builds but does not run, their budget being too long to run even once. An attack whose
#: budget no keyword sets may instead offer ``cut_budget()``, which the trial run calls before running it once
#: (``autoattack``, whose four attacks are of fixed length, does).
NOT_PROBED: frozenset[str] = frozenset()


ATTACKS: dict[str, AttackEntry] = {}


def register_attack(name: str, factory: Callable[..., Any], *, replaces: bool = False) -> None:
    """Register ``factory`` under ``name``; with ``replaces``, in place of the attack already registered
    under that name (a faster implementation of a torchattacks attack), which must then exist."""
    key = name.lower()
    if key in ATTACKS and not replaces:
        raise ValueError(f"attack {name!r} is registered twice")
    if replaces and key not in ATTACKS:
        raise ValueError(f"attack {name!r} replaces no registered attack")
    ATTACKS[key] = AttackEntry(name=key, factory=factory)


def get_attack(name: str) -> AttackEntry:
    try:
        return ATTACKS[name.lower()]
    except KeyError:
        raise UsageError(
            f"unknown attack {name!r}; valid attacks: {', '.join(sorted(ATTACKS))}"
        ) from None


def _needs_only_a_model(cls: type) -> bool:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
    if not params or params[0].name != "model":
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params[1:])


def _register_torchattacks() -> None:
    for cls_name in torchattacks.__all__:
        cls = getattr(torchattacks, cls_name)
        if isinstance(cls, type) and issubclass(cls, torchattacks.attack.Attack) and _needs_only_a_model(cls):
            register_attack(cls_name, cls)


_register_torchattacks()
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
