"""What the hostile-input tests check about an output folder, for both suites (stdlib only)."""
from __future__ import annotations

import hashlib
from pathlib import Path

LEFTOVER_MARKS = (".tmp", ".sds-head-staging-", ".sds-head-probe-")


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder` (hidden ones included; symlinks not followed)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def leftovers(folder: Path) -> list[str]:
    """Temporary files, staging folders and probes left anywhere under `folder`."""
    if not folder.exists():
        return []
    return [str(p) for p in folder.rglob("*") if any(mark in p.name for mark in LEFTOVER_MARKS)]
