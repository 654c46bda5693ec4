"""Progress: bars on a terminal (none in logs, CI or cron, where they would be noise), and the
callback through which stages tell their caller where they are."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


_bars: dict[str, bool | None] = {"disable": None}  # None: tqdm's own rule, bars on a terminal only


def progress(iterable: Iterable[T] | None = None, **kwargs: object) -> Any:
    """A bar over ``iterable``, or one to ``update()`` by hand (give ``total``)."""
    return tqdm(iterable, disable=_bars["disable"], **kwargs)  # type: ignore[call-overload]


def quiet_progress() -> None:
    """No progress bars from now on, terminal or not (``-q``)."""
    _bars["disable"] = True


class Progress(Protocol):
    """Called by a stage as it moves on: its name, the item it starts on, how many of how many are done."""

    def __call__(self, stage: str, item: str | None = None, done: int = 0, total: int = 0) -> None: ...


def no_progress(stage: str, item: str | None = None, done: int = 0, total: int = 0) -> None:
    """The :class:`Progress` of a caller that does not listen."""
