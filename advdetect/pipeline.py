"""The audit from end to end: check everything, claim a run folder, then attack, detect, report.

The CLI and the pytest plugin both run audits through :func:`run_audit`.
"""

from __future__ import annotations

import logging
import os
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

from advdetect.errors import UsageError
from advdetect.rundir import COMPLETE, ERROR_LOG, RUN_JSON, RUNNING, check_creatable, claim, claim_new, locked, \
    set_stage, update_run, write_manifest
from advdetect.storage import user_cache_dir, write_bytes

log = logging.getLogger("advdetect")

#: Where run folders go when no ``--out`` is given.
DEFAULT_ROOT = Path("reports")


def check_outputs(options: Any, out: Path | None) -> None:
    """Fail now, before any work, on an output folder or cache that cannot be written."""
    if out is not None:
        check_creatable(out, "--out", empty=True)
    else:
        check_creatable(DEFAULT_ROOT, "the output root")
    if options.cache_dir is not None:
        check_creatable(options.cache_dir, "--cache-dir")


def save_traceback(folder: Path, exc: BaseException) -> Path:
    path = folder / ERROR_LOG
    write_bytes(path, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).encode())
    return path


def fallback_error_log(exc: BaseException) -> Path | None:
    """Save a traceback that has no run folder to go to under the user cache; None when that fails too."""
    folder = user_cache_dir() / "errors" / f"{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return save_traceback(folder, exc)
    except OSError:
        return None


def run_audit(options: Any, out: Path | None = None, ood_specs: list[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """Every stage of an audit into a new run folder; returns the folder and the results document.

    Everything that can be checked is checked before the folder is created, so bad input leaves
    nothing behind. After that, a failure marks the run ``failed`` (``interrupted`` on Ctrl-C)
    in its manifest, and an unexpected error saves its traceback to the folder's ``error.log``
    (the exception carries that path as ``error_log``)."""
    from advdetect.audit import POSITION, prepare
    from advdetect.history import now
    from advdetect.ood import ood_inputs, set_name

    check_outputs(options, out)
    prepared = prepare(options)
    for spec in ood_specs or ():  # fail on a bad set before any output
        ood_inputs(spec, prepared.sample.x[:2], options.seed)
    if ood_specs:
        cells = [(f"ood[{set_name(s)}]", f"ood_{set_name(s)}") for s in ood_specs]
    else:
        cells = [(cell.key, cell.slug) for cell in options.suite.cells()]
    run_dir = claim(out) if out is not None else claim_new(DEFAULT_ROOT, datetime.now().strftime("%Y%m%d-%H%M%S"))
    log.info("auditing %s on %s (%d inputs) with %s, device %s", options.model, options.data, len(prepared.sample.y),
             f"{len(ood_specs)} out-of-distribution sets" if ood_specs else
             f"suite {options.suite.name}: {len(cells)} attack cells", prepared.device)
    POSITION.stage, POSITION.cell = "load", None
    with locked(run_dir):
        try:
            document = _stages(run_dir, options, prepared, cells, ood_specs)
        except BaseException as exc:
            _record_failure(run_dir, exc, POSITION.describe(), now())
            raise
        write_manifest(run_dir, status="complete", ended_at=now(), timings=document["timings"])
    return run_dir, document


def _stages(run_dir: Path, options: Any, prepared: Any, cells: list[tuple[str, str]],
            ood_specs: list[str] | None) -> dict[str, Any]:
    from advdetect.audit import POSITION, attack_stage, start_run
    from advdetect.detection import detect_stage
    from advdetect.ood import ood_stage, set_name
    from advdetect.report import write_report

    info = start_run(run_dir, options, prepared, cells)
    log.info("clean accuracy %.3f; run folder %s", info.clean_accuracy, run_dir)
    set_stage(run_dir, "attack", RUNNING)
    if ood_specs:
        update_run(run_dir, suite={"name": "ood", "source": "advdetect ood", "specs": ood_specs,
                                   "ood_sets": [set_name(s) for s in ood_specs],
                                   "document": {"description": "out-of-distribution sets", "attack": []}})
        POSITION.stage = "ood"
        records = ood_stage(run_dir, ood_specs, options.seed)
    else:
        POSITION.stage = "attack"
        records = attack_stage(run_dir, prepared.loaded.module, options.suite.cells())
    set_stage(run_dir, "attack", COMPLETE)
    POSITION.stage, POSITION.cell = "detect", None
    detect_stage(run_dir, prepared.loaded.module, records)
    POSITION.stage, POSITION.cell = "report", None
    return write_report(run_dir)


def _record_failure(run_dir: Path, exc: BaseException, where: str, ended_at: str) -> None:
    """Say in the run folder how the run ended; never hide ``exc`` behind a second error."""
    interrupted = isinstance(exc, KeyboardInterrupt)
    fields: dict[str, Any] = {"status": "interrupted" if interrupted else "failed", "ended_at": ended_at,
                              "stopped_in": where}
    try:
        if not interrupted and not isinstance(exc, UsageError):
            exc.error_log = save_traceback(run_dir, exc)  # type: ignore[attr-defined]
            fields["error_log"] = ERROR_LOG
        elif isinstance(exc, UsageError):
            fields["error"] = str(exc)
        if (run_dir / RUN_JSON).is_file():
            write_manifest(run_dir, **fields)
    except Exception as second:  # a full disk, a damaged manifest: the first error is the one to report
        log.warning("could not record the failure in %s: %s", run_dir, second)
    if interrupted:
        log.error("interrupted during %s; finished attack cells are cached, so the same command resumes "
                  "from them; partial outputs are in %s", where, run_dir)
