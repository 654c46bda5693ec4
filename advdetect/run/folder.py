"""The run folder: every file an audit's stages hand each other, read and written in one place.

Layout (every file written atomically, to a temporary name renamed into place):

- ``.advdetect-run``: created exclusively when the folder is claimed, so two audits never share a
  folder; every command that writes into the run holds a lock on it.
- ``run.json``: :class:`~advdetect.run.records.RunInfo`, what was audited and how; stage states and timings;
  the run's ``run_id`` and ``files``: the sha256 of every file below that a stage wrote and of the files
  it was computed from, which every reader checks (:func:`bound`), so a file copied from another run
  is refused.
- ``manifest.json``: provenance for ``history`` and ``compare`` (status, hashes, verdict).
- ``sample.npz``: the audited inputs ``x`` (float32, [0, 1]), labels ``y``, clean predictions ``pred``
  and ``logits``.
- ``reference.npz``: clean reference inputs ``x`` and labels ``y``, disjoint from the sample.
- ``adversarial/<cell>.npz`` and ``.json``: one cell's outputs and :class:`~advdetect.run.records.AttackRecord`.
- ``detection.json``: :class:`~advdetect.run.records.ResultRow` list; ``scores/<cell>.npz``: test
  scores, keyed ``<protocol>__<detector>__clean`` and ``..__adversarial``.
- ``results.json``, ``report.html``, ``report.pdf``: the report stage's outputs.
- ``error.log``: the traceback of an internal error, when there was one.

Every reader checks what it reads and raises :class:`~advdetect.errors.DamagedRunFolder` naming
the file and what is wrong with it, so a damaged folder costs one line, never a traceback or a
wrong number. This module does not import torch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from advdetect.errors import DamagedRunFolder, UsageError
from advdetect.run.records import (AttackRecord, Record, ResultRow, RunInfo, cell_key, cell_slug, json_preview,
                                   ood_cell_key, ood_cell_slug)
from advdetect.run.storage import load_arrays, read_json, write_json

RUN_JSON = "run.json"
MANIFEST = "manifest.json"
CLAIM = ".advdetect-run"
ERROR_LOG = "error.log"
COMPLETE, RUNNING = "complete", "running"


# --- claiming and locking -----------------------------------------------------------------------


#: The longest file name and path the common file systems take (bytes), checked before any work.
NAME_MAX, PATH_MAX = 255, 4095


def check_path_text(path: Path, flag: str) -> None:
    """Raise a UsageError for a path no file system here can take, or that is not UTF-8 text (the
    run folder's JSON and HTML name their paths)."""
    try:
        encoded = [part.encode("utf-8") for part in path.absolute().parts]
    except UnicodeEncodeError:
        raise UsageError(f"{flag} {path!s:.80} is not valid UTF-8 text; rename it or give another path") from None
    if any(len(part) > NAME_MAX for part in encoded) or len(b"/".join(encoded)) > PATH_MAX:
        raise UsageError(f"{flag} {str(path)[:60]}... is too long (at most {NAME_MAX} bytes a name and {PATH_MAX} "
                         f"in all); give a shorter path")


def check_creatable(path: Path, flag: str, *, empty: bool = False) -> None:
    """Raise a UsageError unless ``path`` is, or can be created as, a writable folder (an empty
    one with ``empty``)."""
    check_path_text(path, flag)
    try:
        _check_creatable(path, flag, empty)
    except OSError as exc:
        raise UsageError(f"{flag} {path} cannot be used ({exc.strerror or exc}); give another path") from None


def _check_creatable(path: Path, flag: str, empty: bool) -> None:
    if path.is_symlink() and not path.exists():
        raise UsageError(f"{flag} {path} is a link to {os.readlink(path)}, which does not exist; give another path")
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{flag} {path} is a file, not a folder; give a folder path")
        if empty and any(path.iterdir()):
            raise UsageError(f"{flag} {path} already exists and is not empty; give a new folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {path} is not writable")
        return
    ancestor = path.absolute().parent
    while not ancestor.exists():
        if ancestor.is_symlink():
            raise UsageError(f"{flag} {path} lies behind {ancestor}, a link to {os.readlink(ancestor)}, which does "
                             f"not exist; give another path")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {path} lies inside {ancestor}, which is a file; give a path in a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path} cannot be created: {ancestor} is not writable")


def check_writable_file(path: Path, flag: str) -> None:
    """Raise a UsageError unless a file can be written at ``path``."""
    check_path_text(path, flag)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file path such as {path / 'audit.xml'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path} is not writable")
    check_creatable(path.parent, f"{flag}'s folder")


def claim(path: Path) -> Path:
    """Create the run folder ``path`` (or take it when it exists and is empty) for this process
    alone; raise a UsageError when another run holds it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        raise UsageError(f"{path} already holds a run; give a new --out") from None
    except OSError as exc:
        raise UsageError(f"cannot create the run folder {path} ({exc.strerror or exc}); give another --out") from None
    return path


def claim_new(root: Path, stamp: str) -> Path:
    """A new run folder ``root/stamp``, or ``root/stamp-2``, ``-3``, ... when another process took
    that name first: folders are created exclusively, so two audits never share one."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output root {root} ({exc.strerror or exc}); give --out") from None
    for counter in range(1, 10_000):
        candidate = root / (stamp if counter == 1 else f"{stamp}-{counter}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return claim(candidate)
    raise UsageError(f"{root} holds too many runs named {stamp}*; give --out")


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock: a second command writing the same run waits for nothing and
    is refused at once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    handle = open(run_dir / CLAIM, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise UsageError(f"{run_dir} is in use by another advdetect command; wait for it to finish") from None
            raise
        yield
    finally:
        handle.close()


def is_held(run_dir: Path) -> bool:
    """Whether a running command holds the run folder (a run marked running that nobody holds was killed)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return True
    if not (run_dir / CLAIM).is_file():
        return False
    with open(run_dir / CLAIM, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        return False


# --- reading, checked ---------------------------------------------------------------------------


def damaged(path: Path, problem: str, hint: str = "") -> DamagedRunFolder:
    return DamagedRunFolder(f"damaged run folder: {path}: {problem}" + (f"; {hint}" if hint else ""))


def read_checked_json(path: Path, hint: str = "") -> Any:
    if not path.is_file():
        raise damaged(path, "missing", hint)
    try:
        return read_json(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise damaged(path, f"not valid JSON ({exc})", hint) from None


def parse(cls: type[Record], data: Any, path: Path, where: str = "", hint: str = "") -> Any:
    try:
        return cls.from_dict(data)
    except ValueError as exc:
        raise damaged(path, f"{where}{exc}", hint) from None


def read_arrays(path: Path, shapes: dict[str, tuple[str, tuple[int | None, ...]]], hint: str = "",
                only_checked: bool = False) -> dict[str, np.ndarray]:
    """Arrays of an npz file, each checked against ``shapes``: name -> (dtype kinds, shape with
    None for any length); with ``only_checked``, the others are not read."""
    if not path.is_file():
        raise damaged(path, "missing", hint)
    try:
        arrays = load_arrays(path, keys=shapes if only_checked else None)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise damaged(path, "holds Python objects, which advdetect never writes", hint) from None
        raise damaged(path, str(exc), hint) from None
    except Exception as exc:  # zipfile, zlib and numpy each raise their own kinds on a damaged archive
        raise damaged(path, f"not a readable npz archive ({type(exc).__name__}: {exc})", hint) from None
    for name, (kinds, shape) in shapes.items():
        if name not in arrays:
            raise damaged(path, f"lacks the array {name!r}", hint)
        array = arrays[name]
        if array.dtype.kind not in kinds or array.ndim != len(shape) or any(
                want is not None and got != want for got, want in zip(array.shape, shape)):
            raise damaged(path, f"the array {name!r} has dtype {array.dtype} and shape {array.shape}, expected "
                                f"{'/'.join(kinds)} of shape {tuple('N' if s is None else s for s in shape)}", hint)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise damaged(path, f"the array {name!r} holds NaN or infinite values", hint)
    return arrays


def read_run(run_dir: Path) -> RunInfo:
    check_path_text(run_dir, "run folder")
    path = run_dir / RUN_JSON
    if not run_dir.is_dir():
        raise UsageError(f"run folder {run_dir} not found")
    if not path.exists():
        raise UsageError(f"{run_dir} is not an audit run folder (no {RUN_JSON}); run 'advdetect audit' first")
    info: RunInfo = parse(RunInfo, read_checked_json(path), path)
    if not info.cells:
        info.cells = legacy_cells(info, path)
    return info


def legacy_cells(info: RunInfo, path: Path) -> list[list[str]]:
    """The cells of a run folder written before ``run.json`` listed them."""
    if isinstance(info.suite.get("ood_sets"), list):
        return [[ood_cell_key(name), ood_cell_slug(name)] for name in info.suite["ood_sets"]]
    cells = []
    try:
        for attack in info.suite["document"]["attack"]:
            axis = next(k for k, v in attack.items() if isinstance(v, list))
            cells += [[cell_key(attack["id"], axis, s), cell_slug(attack["id"], axis, s)] for s in attack[axis]]
    except (KeyError, TypeError, StopIteration) as exc:
        raise damaged(path, f"it lists no cells and its suite cannot be read back ({exc!r})") from None
    return cells


def update_run(run_dir: Path, timing: tuple[str, float] | None = None, **fields: object) -> RunInfo:
    """Record a stage's seconds and/or other fields in run.json."""
    info = read_run(run_dir)
    if timing:
        info.timings[timing[0]] = round(timing[1], 3)
    for name, value in fields.items():
        setattr(info, name, value)
    write_json(run_dir / RUN_JSON, info.to_dict())
    return info


def set_stage(run_dir: Path, stage: str, state: str) -> None:
    info = read_run(run_dir)
    update_run(run_dir, stages={**info.stages, stage: state})


def detection_complete(run_dir: Path, info: RunInfo) -> bool:
    if "detect" in info.stages:
        return info.stages["detect"] == COMPLETE
    return (run_dir / "detection.json").is_file()  # written before run.json had stages


# --- binding every file to its run --------------------------------------------------------------
#
# run.json's ``files`` records, for each file a stage wrote, its sha256 and those of the files it
# was computed from; every reader checks both, so a file copied in from another run (another seed,
# another suite's cell of the same name) is refused instead of published as this run's numbers.
# A run folder written before ``run_id`` existed is read as before.

#: sha256 of each version of a file read in this process: (path, inode, size, mtime, ctime) -> hex.
_SHA256: dict[tuple[str, int, int, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """The sha256 of a file, hashed once per version of it in this process."""
    stat = path.stat()
    key = (str(path.absolute()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _SHA256:
        if len(_SHA256) >= 4096:
            _SHA256.clear()
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def computed_from(records: list[AttackRecord]) -> list[str]:
    """What the detect and adaptive stages' files are computed from: the sample, the reference
    inputs and every cell's arrays (paths relative to the run folder)."""
    return ["sample.npz", "reference.npz", *(f"adversarial/{record.slug}.npz" for record in records)]


def cell_files(slug: str) -> dict[str, list[str]]:
    """A cell's files and what they are computed from, for :func:`record_files`."""
    return {f"adversarial/{slug}.npz": ["sample.npz"],
            f"adversarial/{slug}.json": ["sample.npz", f"adversarial/{slug}.npz"]}


def record_files(run_dir: Path, files: dict[str, list[str]]) -> None:
    """Bind files a stage has just written to this run: record in run.json each one's sha256 and
    those of the files it was computed from ({path: [input paths]}, relative to the run folder)."""
    info = read_run(run_dir)
    if not info.run_id:  # a run folder from before run ids stays as it was
        return
    recorded = {relative: {"sha256": file_sha256(run_dir / relative),
                           "inputs": {name: file_sha256(run_dir / name) for name in inputs}}
                for relative, inputs in files.items()}
    update_run(run_dir, files={**info.files, **recorded})


def rerun_hint(run_dir: Path, relative: str) -> str:
    """How to get a file of the run again: the detect and adaptive stages' files by ``advdetect
    detect``, the others by a new audit."""
    if relative in ("detection.json", "adaptive.json") or relative.startswith("scores/"):
        return f"rerun 'advdetect detect {run_dir}' to redo the detect stage"
    return "rerun the same audit into a new folder"


#: Why a file whose sha256 differs from run.json's record is refused (checked before its contents,
#: so a truncated or edited file of a run with ``run_id`` is refused this way too).
FOREIGN = ("it does not belong to this run: its contents differ from what run.json recorded (copied from another "
           "run, or changed since?)")


def bound(run_dir: Path, path: Path, info: RunInfo | None = None) -> Path:
    """``path`` (a file of the run folder), once checked to be the file this run wrote and computed
    from this run's inputs; a DamagedRunFolder naming the file otherwise. A missing file is left for
    the reader to name; ``info`` is read from run.json when not given."""
    info = read_run(run_dir) if info is None else info
    if not info.run_id or not path.is_file():
        return path
    relative = path.relative_to(run_dir).as_posix()
    entry = info.files.get(relative)
    if entry is None:
        raise damaged(path, "it does not belong to this run: run.json records no such file (copied from another "
                            "run?)", rerun_hint(run_dir, relative))
    if file_sha256(path) != entry["sha256"]:
        raise damaged(path, FOREIGN, rerun_hint(run_dir, relative))
    for name, sha256 in entry["inputs"].items():
        source = run_dir / name
        if not source.is_file():
            raise damaged(source, "missing", rerun_hint(run_dir, name))
        current = file_sha256(source)
        if name in info.files and current != info.files[name]["sha256"]:
            raise damaged(source, FOREIGN, rerun_hint(run_dir, name))
        if current != sha256:
            raise damaged(path, f"it does not belong to this run: it was computed from another {name} than this "
                                f"run's (copied from another run?)", rerun_hint(run_dir, relative))
    return path


def sample_arrays(run_dir: Path, info: RunInfo | None = None) -> dict[str, np.ndarray]:
    path = bound(run_dir, run_dir / "sample.npz", info)
    arrays = read_arrays(path, {"x": ("f", (None, None, None, None)), "y": ("iu", (None,)), "pred": ("iu", (None,))})
    if not len(arrays["x"]) == len(arrays["y"]) == len(arrays["pred"]):
        raise damaged(path, "x, y and pred differ in length")
    return arrays


def reference_arrays(run_dir: Path, image_shape: tuple[int, ...],
                     info: RunInfo | None = None) -> dict[str, np.ndarray]:
    path = bound(run_dir, run_dir / "reference.npz", info)
    arrays = read_arrays(path, {"x": ("f", (None, *image_shape)), "y": ("iu", (None,))})
    if len(arrays["x"]) != len(arrays["y"]):
        raise damaged(path, "x and y differ in length")
    return arrays


def cell_paths(run_dir: Path, slug: str) -> tuple[Path, Path]:
    return run_dir / "adversarial" / f"{slug}.json", run_dir / "adversarial" / f"{slug}.npz"


def read_attack_records(run_dir: Path, info: RunInfo | None = None) -> list[AttackRecord]:
    """The records of every cell of the run; refuses a run whose attack stage did not finish."""
    info = info or read_run(run_dir)
    records = []
    for key, slug in info.cells:
        path, _ = cell_paths(run_dir, slug)
        if not path.exists():
            raise UsageError(f"{run_dir}: cell {key} has no results: the attack stage did not finish; run the same "
                             f"audit again into a new folder (finished cells come from the attack cache)")
        record: AttackRecord = parse(AttackRecord, read_checked_json(bound(run_dir, path, info)), path)
        if (record.key, record.slug) != (key, slug):
            raise damaged(path, f"it holds cell {json_preview(record.key)}, not {key}")
        records.append(record)
    return records


def cell_arrays(run_dir: Path, record: AttackRecord, n_correct: int, image_shape: tuple[int, ...],
                info: RunInfo | None = None) -> dict[str, np.ndarray]:
    """A cell's ``x_adv`` and ``fooled``, one row per correctly classified input."""
    _, path = cell_paths(run_dir, record.slug)
    arrays = read_arrays(bound(run_dir, path, info),
                         {"x_adv": ("f", (n_correct, *image_shape)), "fooled": ("b", (n_correct,))})
    if int(arrays["fooled"].sum()) != record.n_fooled:
        raise damaged(path, f"it marks {int(arrays['fooled'].sum())} inputs fooled, its record {record.n_fooled}")
    return arrays


def cell_fooled(run_dir: Path, record: AttackRecord, n_correct: int, info: RunInfo | None = None) -> np.ndarray:
    """Which of the correctly classified inputs the cell's attack fooled (its ``x_adv`` left unread)."""
    _, path = cell_paths(run_dir, record.slug)
    fooled = read_arrays(bound(run_dir, path, info), {"fooled": ("b", (n_correct,))}, only_checked=True)["fooled"]
    if int(fooled.sum()) != record.n_fooled:
        raise damaged(path, f"it marks {int(fooled.sum())} inputs fooled, its record {record.n_fooled}")
    return fooled


def result_rows(path: Path, hint: str) -> list[ResultRow]:
    """The result rows of a JSON list file, each checked."""
    data = read_checked_json(path, hint)
    if not isinstance(data, list):
        raise damaged(path, f"expected a list of result rows, found {type(data).__name__}", hint)
    return [parse(ResultRow, row, path, f"row {i + 1}: ", hint) for i, row in enumerate(data)]


def read_detection(run_dir: Path, info: RunInfo, records: list[AttackRecord]) -> list[ResultRow]:
    """The detect stage's rows; refuses an unfinished or partial detect stage."""
    hint = f"run 'advdetect detect {run_dir}' to redo the detect stage"
    if not detection_complete(run_dir, info):
        raise UsageError(f"{run_dir}: the detect stage has not finished, so a report would be built from part of "
                         f"the run; {hint}")
    path = bound(run_dir, run_dir / "detection.json", info)
    rows = result_rows(path, hint)
    have = {(r.attack, r.strength, r.detector) for r in rows}
    for record in records:
        for detector in info.detectors:
            if (record.attack, record.strength, detector) not in have:
                raise damaged(path, f"it has no row for {detector} on {record.key}", hint)
    return rows


def read_scores(run_dir: Path, record: AttackRecord, rows: list[ResultRow],
                info: RunInfo | None = None) -> dict[str, np.ndarray]:
    """The test scores of one cell's scored rows."""
    path = run_dir / "scores" / f"{record.slug}.npz"
    hint = f"run 'advdetect detect {run_dir}' to redo the detect stage"
    shapes = {}
    for row in rows:
        if row.auroc is not None:
            shapes[f"{row.protocol}__{row.detector}__clean"] = ("f", (row.n_clean,))
            shapes[f"{row.protocol}__{row.detector}__adversarial"] = ("f", (row.n_adv,))
    if not shapes and not path.exists():
        return {}
    return read_arrays(bound(run_dir, path, info), shapes, hint)


def read_masking(run_dir: Path, info: RunInfo | None = None) -> dict[str, Any] | None:
    """The attack stage's gradient-masking checks (``masking.json``); None for a run made before them
    or an out-of-distribution run."""
    path = run_dir / "masking.json"
    if not path.exists():
        return None
    data = read_checked_json(bound(run_dir, path, info))
    symptoms = data.get("symptoms") if isinstance(data, dict) else None
    if not isinstance(symptoms, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("observed"), bool)
            and isinstance(s.get("detail"), str) for s in symptoms):
        raise damaged(path, "expected {eps, n_inputs, symptoms: [{name, observed, detail}]}")
    return data


def read_adaptive(run_dir: Path, info: RunInfo) -> tuple[list[ResultRow], dict[str, np.ndarray]]:
    """The adaptive stage's rows and scores (none when the suite has no ``[adaptive]`` table);
    refuses an unfinished adaptive stage or one that lacks a row of a detector it attacks."""
    spec = info.suite.get("document", {}).get("adaptive")
    if not spec:
        return [], {}
    hint = f"run 'advdetect detect {run_dir}' to redo the detect and adaptive stages"
    if info.stages.get("adaptive") != COMPLETE:
        raise UsageError(f"{run_dir}: the adaptive stage has not finished, so a report would be built from part of "
                         f"the run; {hint}")
    path = bound(run_dir, run_dir / "adaptive.json", info)
    rows = result_rows(path, hint)
    for detector in spec["detectors"] or info.detectors:
        if not any(r.detector == detector and r.protocol == "adaptive" and r.strength == spec["eps"] for r in rows):
            raise damaged(path, f"it has no adaptive row for {detector}", hint)
    shapes = {}
    for row in rows:
        shapes[f"{row.detector}__clean"] = ("f", (row.n_clean,))
        shapes[f"{row.detector}__adversarial"] = ("f", (row.n_adv,))
        shapes[f"{row.detector}__oblivious"] = ("f", (None,))
    return rows, read_arrays(bound(run_dir, run_dir / "scores" / "adaptive.npz", info), shapes, hint)


def read_results(path: Path) -> dict[str, Any]:
    """A ``results.json`` document, its attack records and result rows checked."""
    document = read_checked_json(path)
    if not isinstance(document, dict):
        raise damaged(path, f"expected a JSON object, found {type(document).__name__}")
    for name in ("attacks", "results"):
        if not isinstance(document.get(name), list):
            raise damaged(path, f"the field {name!r} is missing or not a list")
    for i, attack in enumerate(document["attacks"]):
        parse(AttackRecord, attack, path, f"attack {i + 1}: ")
    for i, row in enumerate(document["results"]):
        parse(ResultRow, row, path, f"result {i + 1}: ")
    return document


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / MANIFEST
    manifest = read_checked_json(path)
    if not isinstance(manifest, dict):
        raise damaged(path, f"expected a JSON object, found {type(manifest).__name__}")
    for name, kinds in (("started_at", str), ("status", str), ("suite", str), ("clean_accuracy", (int, float)),
                        ("n", int), ("verdict", dict)):
        if name in manifest and not isinstance(manifest[name], kinds):
            raise damaged(path, f"the field {name!r} is {json_preview(manifest[name])}")
    verdict = manifest.get("verdict")
    if verdict is not None and not all(isinstance(verdict.get(k), int) for k in ("passed", "failed")):
        raise damaged(path, "its verdict lacks whole-number 'passed' and 'failed' counts")
    return manifest


def write_manifest(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Create or update the run's manifest; the first call records the command line."""
    path = run_dir / MANIFEST
    manifest = read_manifest(run_dir) if path.is_file() else {"schema": 1, "command": sys.argv}
    manifest.update(fields)
    write_json(path, manifest)
    return manifest


def json_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
