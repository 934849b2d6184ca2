"""How every benchmark leaves its result: one JSON file, written whole or not at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.runfiles import write_json


def write_result(path: Path, result: dict[str, Any]) -> int:
    """Write ``result`` to ``path`` (atomically: a benchmark stopped half-way never leaves a truncated file in
    results/); say where; return the exit code 0."""
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_json(path, result)}")
    return 0
