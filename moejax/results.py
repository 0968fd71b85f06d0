"""Experiment results on disk."""

from __future__ import annotations

import json
import os


def write_json_atomically(path: str, data: dict) -> None:
    """Write via a temporary file and a rename, so an interrupted run never leaves a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
