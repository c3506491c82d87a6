"""The worker's run reports: one JSON file per update run under
`<checkpoint_dir>/reports/`, written atomically, and the newest one read back
(the next run uses it to recognise a run that finished but did not ack)."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from service.fileutil import write_text_atomic

log = logging.getLogger(__name__)

REPORTS_DIR = "reports"


def write_report(checkpoint_dir: Path, version: int, report: dict[str, Any]) -> Path:
    """`<checkpoint_dir>/reports/<UTC time>-v<version>.json`, written atomically."""
    folder = Path(checkpoint_dir) / REPORTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = folder / f"{stamp}-v{version}.json"
    write_text_atomic(path, json.dumps(report, indent=2) + "\n", durable=True)
    log.info("report %s", path)
    return path


def latest_report(checkpoint_dir: Path) -> dict[str, Any] | None:
    """The newest report that parses, or None."""
    folder = Path(checkpoint_dir) / REPORTS_DIR
    paths = sorted(folder.glob("*-v*.json")) if folder.is_dir() else []
    for path in reversed(paths):
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return None
