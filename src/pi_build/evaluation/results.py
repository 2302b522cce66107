"""The results file: one JSON line per finished episode, appended the moment the episode ends.

It is what makes a long evaluation safe to interrupt: a rerun with the same file reads it, skips
the episodes it holds and runs the rest. Only the driver writes it (workers return their results
to the driver), through `pi_build.io.append_line`, which writes each line with one write(2) and
flushes it to disk; a crash can leave at most one torn line, at the end, without its newline.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pi_build import io
from pi_build.errors import InputError
from pi_build.evaluation.protocol import Episode, EpisodeKey

KEY_FIELDS = ("suite", "task_id", "trial", "seed")


def record_key(record: dict[str, Any]) -> EpisodeKey:
    return (record["suite"], record["task_id"], record["trial"], record["seed"])


def episodes_path(report_path: Path) -> Path:
    """Where the episode lines of a report live: `run.json` -> `run.episodes.jsonl` beside it."""
    return report_path.with_name(f"{report_path.stem}.episodes.jsonl")


class ResultsFile:
    """The JSON-lines file of finished episodes; one record per (suite, task_id, trial, seed)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> dict[EpisodeKey, dict[str, Any]]:
        """Every finished episode in the file, each once (the first line of a key wins).

        A torn last line (no final newline: the writer died mid-line) is dropped, and the file is
        rewritten without it so that the next append starts on a line of its own.
        """
        if not self.path.exists():
            return {}
        text = self.path.read_text(encoding="utf-8")
        complete, _, torn = text.rpartition("\n")
        if torn:
            io.atomic_write(self.path, complete + "\n" if complete else "")
        records: dict[EpisodeKey, dict[str, Any]] = {}
        for number, line in enumerate(complete.splitlines(), start=1):
            if line.strip():
                record = self._parse(line, number)
                records.setdefault(record_key(record), record)
        return records

    def _parse(self, line: str, number: int) -> dict[str, Any]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            record, problem = None, f"not JSON ({e.msg})"
        else:
            problem = "not an episode record"
        if not isinstance(record, dict) or not all(field in record for field in KEY_FIELDS):
            raise InputError(
                f"{self.path} line {number} is {problem}; this file was not written by pi-run libero: "
                "move it aside or choose another --out"
            )
        return record

    def finished(self, plan: Iterable[Episode], policy: dict[str, Any] | None = None) -> dict[EpisodeKey, dict[str, Any]]:
        """The episodes of `plan` already in the file. Records of other episodes stay in the file
        but are left out; a record run under another step budget, or by another policy (other
        engines), stops the run: mixing them would silently change what the success rate measures."""
        records = self.read()
        done = {}
        for episode in plan:
            record = records.get(episode.key)
            if record is None:
                continue
            if policy is not None and record.get("engines") != policy:
                raise InputError(
                    f"{self.path} holds {episode.label} run by other engines ({record.get('engines')}), not by this "
                    f"run's ({policy}); choose another --out, or remove that file to start over"
                )
            if record.get("max_steps") != episode.max_steps:
                raise InputError(
                    f"{self.path} holds {episode.label} run with max_steps {record.get('max_steps')}, "
                    f"but this run uses {episode.max_steps}; choose another --out or the same --max-steps"
                )
            done[episode.key] = record
        return done

    def append(self, record: dict[str, Any]) -> None:
        io.append_line(self.path, json.dumps(record, allow_nan=False, separators=(",", ":")))
