"""The attack registry: every attack an audit suite may name.

Every `torchattacks` attack that needs nothing but a model to build is registered
under its lower-case class name. To add an attack that torchattacks lacks, add one
file to this package that calls :func:`register_attack` with a factory taking the
model as first argument; the package imports every module in it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

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
        params = list(inspect.signature(self.factory).parameters.values())[1:]  # drop the model
        return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))

    def build(self, model: torch.nn.Module, **params: Any) -> Any:
        return self.factory(model, **params)


ATTACKS: dict[str, AttackEntry] = {}


def register_attack(name: str, factory: Callable[..., Any]) -> None:
    key = name.lower()
    if key in ATTACKS:
        raise ValueError(f"attack {name!r} is registered twice")
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
