"""Experiment results on disk: one results.json per run, written atomically, read back so a rerun resumes."""

from __future__ import annotations

import json
import os
from typing import Iterable


def write_json_atomically(path: str, data: dict) -> None:
    """Write via a temporary file (flushed to disk) and a rename, so an interrupted run never leaves a
    half-written file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str) -> dict | None:
    """The JSON object in `path`, or None when there is no such file; a file that is not JSON fails naming it."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): remove it "
                             "or restore it from a complete run") from None


class Results:
    """WORKDIR/results.json of an experiment: `data` is what an earlier run left there, so a rerun skips the
    cells it finished; `save()` (and `add`) write it atomically after every cell.

    `settings` are what the numbers depend on, stored as data["settings"]. A file made with other settings is
    refused with a ValueError naming the keys that differ (on_mismatch="refuse": never mix two runs' cells)
    or started over (on_mismatch="restart": for caches such as a recorded trace)."""

    def __init__(self, workdir: str, settings: dict | None = None, on_mismatch: str = "refuse"):
        if on_mismatch not in ("refuse", "restart"):
            raise ValueError(f"on_mismatch={on_mismatch!r}; expected 'refuse' or 'restart'")
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "results.json")
        self.data = read_json(self.path) or {}
        self.resumed = bool(self.data)  # False: a fresh start (no file, or one made with other settings)
        if settings is not None:
            settings = json.loads(json.dumps(settings))  # as it reads back: tuples become lists
            previous = self.data.get("settings")
            if self.data and previous != settings:
                if on_mismatch == "refuse":
                    previous = previous or {}
                    differ = sorted(k for k in set(settings) | set(previous) if settings.get(k) != previous.get(k))
                    raise ValueError(f"{self.path} was made with other settings (differing: {differ}); use another "
                                     "--workdir or remove it")
                self.data, self.resumed = {}, False
            self.data["settings"] = settings

    @property
    def cells(self) -> list[dict]:
        return self.data.setdefault("cells", [])

    def find(self, key: dict) -> dict | None:
        """The finished cell whose fields include `key`, or None."""
        return next((c for c in self.cells if all(c.get(k) == v for k, v in key.items())), None)

    def todo(self, keys: Iterable[dict]) -> list[dict]:
        """The keys (dicts of a cell's identifying fields) that have no finished cell yet, in order."""
        return [key for key in keys if self.find(key) is None]

    def add(self, cell: dict) -> None:
        """Append a finished cell and save."""
        self.cells.append(cell)
        self.save()

    def save(self) -> None:
        write_json_atomically(self.path, self.data)
