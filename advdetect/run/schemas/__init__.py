"""JSON Schemas of the run folder's JSON files, generated from their declarations in
:mod:`advdetect.run.records` (the same declarations that validate a file read back):

- ``results.schema.json``: ``results.json`` (:class:`~advdetect.run.records.Results`);
- ``run.schema.json``: ``run.json`` (:class:`~advdetect.run.records.RunInfo`).

They ship beside this module; ``python -m advdetect.run.schemas`` regenerates them after a record
changes (``--check`` only says whether they are current), and a test holds them equal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from advdetect.run.records import Record, Results, RunInfo, validator

FOLDER = Path(__file__).parent
#: Each shipped schema and the record it describes.
SCHEMAS: dict[str, type[Record]] = {"results.schema.json": Results, "run.schema.json": RunInfo}
DIALECT = "https://json-schema.org/draft/2020-12/schema"


def generate(record: type[Record]) -> dict[str, Any]:
    """The JSON Schema of a record's JSON form (draft 2020-12)."""
    return {"$schema": DIALECT, **validator(record).json_schema()}


def schema_text(record: type[Record]) -> str:
    return json.dumps(generate(record), indent=2) + "\n"


def stale(folder: Path = FOLDER) -> list[str]:
    """The names of the schemas in ``folder`` that differ from their records' declarations."""
    return [name for name, record in SCHEMAS.items()
            if not (folder / name).is_file() or (folder / name).read_text(encoding="utf-8") != schema_text(record)]


def write(folder: Path = FOLDER) -> list[Path]:
    """(Re)write every schema into ``folder``."""
    paths = []
    for name, record in SCHEMAS.items():
        (folder / name).write_text(schema_text(record), encoding="utf-8")
        paths.append(folder / name)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m advdetect.run.schemas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the shipped schemas are current")
    args = parser.parse_args(argv)
    if args.check:
        names = stale()
        for name in names:
            sys.stderr.write(f"{FOLDER / name} is stale: run python -m advdetect.run.schemas\n")
        return 1 if names else 0
    for path in write():
        sys.stdout.write(f"wrote {path}\n")
    return 0
