"""metrics.jsonl: one JSON record a line, appended as a run logs; a resumed run logs a step again, its last record
counts. Non-finite numbers are written as null."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TextIO

from polyak.errors import UserError

FILE = "metrics.jsonl"


def open_for_append(run_dir: Path) -> TextIO:
    """The run's metrics file, opened to append; a line torn by a killed writer is cut off first."""
    path = Path(run_dir) / FILE
    if path.is_file():
        with open(path, "rb+") as f:
            f.truncate(f.read().rfind(b"\n") + 1)
    return open(path, "a")


def append(f: TextIO, record: dict) -> None:
    record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    f.write(json.dumps(record) + "\n")
    f.flush()


def read(run_dir: Path) -> dict[int, dict]:
    """Every logged step's last record, by step."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {FILE}")
    records = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{number}: not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{path}:{number}: a record needs an integer 'step'")
        records[record["step"]] = record
    return dict(sorted(records.items()))
