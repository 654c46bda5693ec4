"""Progress bars on a terminal; none in logs (CI, cron), where they would be noise."""

from __future__ import annotations

from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], **kwargs: object) -> Iterable[T]:
    return tqdm(iterable, disable=None, **kwargs)  # type: ignore[call-overload, no-any-return]
