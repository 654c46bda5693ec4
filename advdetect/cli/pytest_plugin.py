"""pytest plugin (entry point ``pytest11``): robustness gates beside a project's own tests.

``pytest --advdetect-suite FILE [--advdetect-OPTION VALUE ...]`` collects one test item per
check of the suite's thresholds (as ``advdetect check`` prints them); the audit runs once, when
the first of them runs, reusing cached attack work. Every option of ``advdetect audit`` has its
``--advdetect-`` twin (``--advdetect-n``, ``--advdetect-model``, ``--advdetect-no-cache``, ...),
and the project's ``[tool.advdetect]`` defaults apply as they do to the command line. Without
``--advdetect-suite`` the plugin does nothing, and it imports nothing heavy until asked.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from advdetect.config.options import AUDIT_OPTIONS, argparse_type


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("advdetect", "adversarial-robustness gates (advdetect)")
    for option in AUDIT_OPTIONS:
        flag = "--advdetect-" + option.option_string[2:]
        if option.positional:
            group.addoption(flag, metavar="SUITE", help="audit suite whose thresholds become test items: a suite TOML "
                                                        "file, or the name of a built-in suite")
        elif option.flag:  # --advdetect-cache, and --advdetect-no-cache as the docs say (--no-advdetect-cache too)
            group.addoption(flag, action=argparse.BooleanOptionalAction, default=None, help=option.help_text)
            group.addoption("--advdetect-no-" + flag[len("--advdetect-"):], action="store_false",
                            dest=f"advdetect_{option.name}", default=None, help=f"the same as --no-{flag[2:]}")
        else:
            group.addoption(flag, type=argparse_type(option.parse), metavar=option.metavar or option.name.upper(),
                            help=option.help_text)


class CheckFailed(Exception):
    pass


class _Audit:
    """Runs the audit on first use and remembers its results (or its error) for every item."""

    def __init__(self, options: Any, out: str | None) -> None:
        self.options, self.out = options, out
        self._document: dict[str, Any] | None = None
        self._error: BaseException | None = None

    def document(self) -> dict[str, Any]:
        if self._error is not None:
            raise self._error
        if self._document is None:
            from advdetect.stages.pipeline import run_audit

            try:
                _, self._document = run_audit(self.options, Path(self.out) if self.out else None)
            except Exception as exc:
                self._error = exc
                raise
        return self._document


class CheckItem(pytest.Item):
    def __init__(self, *, check: Any, audit: _Audit, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check, self.audit = check, audit

    def runtest(self) -> None:
        from advdetect.run.checks import FAILED, SKIPPED, evaluate

        outcome = evaluate(self.check, self.audit.document())
        if outcome.status == SKIPPED:
            pytest.skip(outcome.message)
        if outcome.status == FAILED:
            raise CheckFailed(outcome.line)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, CheckFailed):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo, style=style))

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"{self.check.cell_key}::{self.check.metric}"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    suite = config.getoption("advdetect_suite")
    if not suite:
        return
    from advdetect.config.options import resolve
    from advdetect.errors import UsageError
    from advdetect.run.checks import plan_checks
    from advdetect.stages.preflight import build_options

    try:
        values, _ = resolve({option.name: config.getoption(f"advdetect_{option.name}") for option in AUDIT_OPTIONS})
        out = values.pop("out")
        options = build_options(**values)
        checks = plan_checks(options.suite, options.detector_names())
    except UsageError as exc:
        raise pytest.UsageError(f"advdetect: {exc}") from None
    if not checks:
        raise pytest.UsageError(f"advdetect: suite {suite!r} has no [thresholds] to check")
    audit = _Audit(options, out)
    path = Path(suite).resolve() if Path(suite).is_file() else session.path
    items.extend(CheckItem.from_parent(session, name=check.nodeid, path=path, check=check, audit=audit)
                 for check in checks)
