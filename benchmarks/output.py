"""How every benchmark leaves its result: one JSON file, written whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_result(path: Path, result: dict[str, Any]) -> int:
    """Write ``result`` to ``path`` as indented JSON through a temporary sibling and a rename (a benchmark
    stopped half-way never leaves a truncated file in results/); say where; return the exit code 0."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(path)
    print(f"wrote {path}")
    return 0
