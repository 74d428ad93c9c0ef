"""Training metrics: `metrics.jsonl`, one JSON object per event."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..io import atomic_path

METRICS_NAME = "metrics.jsonl"


def write_metrics(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric records after `step` (they were logged by a run that died before
    its next checkpoint, and the resumed run logs them again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if rec.get("step", 0) <= step:
            kept.append(line)
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(k + "\n" for k in kept), encoding="utf-8")
