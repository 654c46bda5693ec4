"""The audit from end to end: check everything, claim a run folder, then attack, detect, report.

The one place the stages meet: each reads and writes the run folder through
:mod:`advdetect.run.folder` and imports no other stage. The CLI, the pytest plugin and the Python
API all run audits through :func:`run_audit`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from advdetect.stages.adaptive import adaptive_stage
from advdetect.stages.attack import attack_stage
from advdetect.attacks.cache import tensor_sha256
from advdetect.signatures.inference import channels_last_pooling
from advdetect.stages.detect import detect_stage
from advdetect.stages.distributed import current_world
from advdetect.errors import UsageError
from advdetect.run.history import now
from advdetect.stages.ood import ood_inputs, ood_stage, set_cells, set_name
from advdetect.stages.preflight import AuditOptions, Prepared, package_versions, prepare, reload_model
from advdetect.progress import Progress, no_progress
from advdetect.run.records import RunInfo
from advdetect.report.document import write_report
from advdetect.run.folder import (COMPLETE, ERROR_LOG, RUN_JSON, RUNNING, check_creatable, claim, claim_new,
                                  json_sha256, locked, read_attack_records, read_run, record_files, set_stage,
                                  update_run, write_manifest)
from advdetect.run.storage import save_arrays, user_cache_dir, write_bytes, write_json

log = logging.getLogger("advdetect")

#: Where run folders go when no ``--out`` is given.
DEFAULT_ROOT = Path("reports")


@dataclass
class Position:
    """Where an audit is, so an interruption can say where it stopped."""

    stage: str = "load"
    item: str | None = None
    done: int = 0
    total: int = 0

    def __call__(self, stage: str, item: str | None = None, done: int = 0, total: int = 0) -> None:
        self.stage, self.item, self.done, self.total = stage, item, done, total

    def describe(self) -> str:
        where = f"the {self.stage} stage"
        if self.item:
            noun, unit = {"attack": ("cell ", "cells"), "ood": ("set ", "sets"),
                          "adaptive": ("detector ", "detectors")}.get(self.stage, ("", "rows"))
            where += f", {noun}{self.item} ({self.done} of {self.total} {unit} done)"
        return where


def check_outputs(options: AuditOptions, out: Path | None) -> None:
    """Fail now, before any work, on an output folder or cache that cannot be written."""
    if out is not None:
        check_creatable(out, "--out", empty=True)
    else:
        check_creatable(DEFAULT_ROOT, "the output root")
    if options.cache_dir is not None:
        check_creatable(options.cache_dir, "--cache-dir")


def run_audit(options: AuditOptions, out: Path | None = None, ood_specs: list[str] | None = None,
              on_progress: Progress = no_progress) -> tuple[Path, dict[str, Any]]:
    """Every stage of an audit into a new run folder; returns the folder and the results document.
    With ``ood_specs``, out-of-distribution sets take the place of the suite's attack cells.

    Everything that can be checked is checked before the folder is created, so bad input leaves
    nothing behind. After that, a failure marks the run ``failed`` (``interrupted`` on Ctrl-C)
    in its manifest, and an unexpected error saves its traceback to the folder's ``error.log``
    (the exception carries that path as ``error_log``)."""
    world = current_world()
    if not world.is_main:  # rank 0 writes the run folder asked for; the others a scratch one
        with tempfile.TemporaryDirectory(prefix=f"advdetect-rank{world.rank}-") as scratch:
            return _run_audit(options, Path(scratch) / "run", ood_specs, on_progress)
    return _run_audit(options, out, ood_specs, on_progress)


def _run_audit(options: AuditOptions, out: Path | None, ood_specs: list[str] | None,
               on_progress: Progress) -> tuple[Path, dict[str, Any]]:
    check_outputs(options, out)
    started = time.perf_counter()
    prepared = prepare(options)
    for spec in ood_specs or ():  # fail on a bad set before any output
        ood_inputs(spec, prepared.sample.x[:2], options.seed)
    cells = set_cells(ood_specs) if ood_specs else [(cell.key, cell.slug) for cell in options.suite.cells()]
    run_dir = claim(out) if out is not None else claim_new(DEFAULT_ROOT, datetime.now().strftime("%Y%m%d-%H%M%S"))
    log.info("auditing %s on %s (%d inputs) with %s, device %s", options.model_label, options.data_label,
             len(prepared.sample.y), f"{len(ood_specs)} out-of-distribution sets" if ood_specs else
             f"suite {options.suite.name}: {len(cells)} attack cells", prepared.device)
    position = Position()

    def progress(stage: str, item: str | None = None, done: int = 0, total: int = 0) -> None:
        position(stage, item, done, total)
        on_progress(stage, item, done, total)

    with locked(run_dir):
        try:
            with channels_last_pooling(prepared.loaded.module):
                document = _stages(run_dir, options, prepared, cells, ood_specs, progress, started)
        except BaseException as exc:
            _record_failure(run_dir, exc, position.describe())
            raise
        write_manifest(run_dir, status="complete", ended_at=now(), timings=document["timings"])
    return run_dir, document


def _stages(run_dir: Path, options: AuditOptions, prepared: Prepared, cells: list[tuple[str, str]],
            ood_specs: list[str] | None, progress: Progress, started: float) -> dict[str, Any]:
    info = start_run(run_dir, options, prepared, cells, started)
    log.info("clean accuracy %.3f; run folder %s", info.clean_accuracy, run_dir)
    set_stage(run_dir, "attack", RUNNING)
    if ood_specs:
        update_run(run_dir, suite={"name": "ood", "source": "advdetect ood", "specs": ood_specs,
                                   "ood_sets": [set_name(s) for s in ood_specs],
                                   "document": {"description": "out-of-distribution sets", "attack": []}})
        records = ood_stage(run_dir, ood_specs, options.seed, progress)
    else:
        records = attack_stage(run_dir, prepared.loaded.module, options.suite.cells(), progress)
    set_stage(run_dir, "attack", COMPLETE)
    detect_stage(run_dir, prepared.loaded.module, records, progress)
    adaptive_stage(run_dir, prepared.loaded.module, records, progress)
    if not current_world().is_main:
        return {"timings": read_run(run_dir).timings}  # rank 0 writes the report
    progress("report")
    return write_report(run_dir)


def start_run(run_dir: Path, options: AuditOptions, prepared: Prepared, cells: list[tuple[str, str]],
              started: float) -> RunInfo:
    """Record the run, its sample and its reference inputs in the claimed folder; ``load`` times
    the checks before work (loading, probing) and this, from ``started``."""
    loaded, sample = prepared.loaded, prepared.sample
    pred = prepared.logits.argmax(dim=1)
    save_arrays(run_dir / "sample.npz", x=sample.x.numpy(), y=sample.y.numpy(), pred=pred.numpy(),
                logits=prepared.logits.numpy())
    save_arrays(run_dir / "reference.npz", x=sample.reference_x.numpy(), y=sample.reference_y.numpy())
    info = RunInfo(
        suite={"name": options.suite.name, "source": options.suite.source, "document": options.suite.to_dict()},
        model=loaded.info, data=sample.info, seed=options.seed, device=str(prepared.device),
        batch_size=options.batch_size, fit_fraction=options.fit_fraction, fit_folds=options.fit_folds,
        detectors=list(options.detector_names()),
        noisy_negatives=options.noisy_negatives,
        cache_dir=None if options.cache_dir is None else str(options.cache_dir),
        clean_accuracy=float((pred == sample.y).double().mean()), versions=package_versions(),
        started_at=now(),
        timings={"load": round(time.perf_counter() - started, 3)},
        cells=[list(cell) for cell in cells],
        run_id=uuid.uuid4().hex,
    )
    write_json(run_dir / RUN_JSON, info.to_dict())
    record_files(run_dir, {"sample.npz": [], "reference.npz": []})
    write_manifest(run_dir, status="running", started_at=info.started_at, suite=options.suite.name,
                   suite_sha256=json_sha256(options.suite.to_dict()), model_spec=loaded.info["spec"],
                   model_sha256=loaded.info["sha256"], data_spec=sample.info["spec"],
                   data_sha256=tensor_sha256(sample.x, sample.y), n=len(sample.y), seed=options.seed,
                   device=str(prepared.device), versions=info.versions, clean_accuracy=info.clean_accuracy,
                   processes=current_world().size)
    return info


def rerun_detection(run_dir: Path) -> dict[str, Any]:
    """``advdetect detect``: the detect and adaptive stages and the report again, on a finished attack stage."""
    info = read_run(run_dir)
    with locked(run_dir):
        records = read_attack_records(run_dir, info)
        model = reload_model(run_dir, info)
        with channels_last_pooling(model):
            detect_stage(run_dir, model, records)
            adaptive_stage(run_dir, model, records)
        return write_report(run_dir)


def rewrite_report(run_dir: Path) -> dict[str, Any]:
    """``advdetect report``: the report again, from a finished detect stage."""
    read_run(run_dir)
    with locked(run_dir):
        return write_report(run_dir)


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


def _record_failure(run_dir: Path, exc: BaseException, where: str) -> None:
    """Say in the run folder how the run ended; never hide ``exc`` behind a second error."""
    interrupted = isinstance(exc, KeyboardInterrupt)
    fields: dict[str, Any] = {"status": "interrupted" if interrupted else "failed", "ended_at": now(),
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
