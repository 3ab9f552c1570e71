"""What every benchmark here shares: figures, turn-taking, waits, the command line and the report.

- Figures: ``ms``/``us`` (seconds to rounded milliseconds/microseconds),
  ``p99``, ``Samples`` (seconds by label, their medians).
- Turn-taking: ``rotation`` (the order of subjects in a turn), ``interleaved``
  (each subject once per repetition, the order rotating, each run timed).
- ``wait_quiet``: wait, untimed, until a process's CPU rate falls to a level.
- ``echo_commands`` (the commands the benchmarks send) and ``broken`` (the
  exit of a benchmark whose subject misbehaved).
- The command line (``arguments``) and the report: which code was measured
  (``Provenance``: where it was imported from, its commit, uncommitted
  changes, a fingerprint of its files, and whether they changed on disk
  during the run), aligned ``table``s, ``verdict``, and the JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aip.messages import Command

#: The repository root: benchmarks measure the packages beside this folder.
ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")
Timed = Callable[[], Awaitable[Any]]
Settle = Callable[[], Awaitable[dict[str, float]]]


# -- figures ---------------------------------------------------------------------------------------


def ms(seconds: float, places: int = 3) -> float:
    return round(seconds * 1000, places)


def us(seconds: float) -> float:
    return round(seconds * 1e6, 1)


def p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


@dataclass
class Samples:
    """Figures in seconds (wall times, CPU times), by label, gathered over repetitions."""

    times: dict[str, list[float]] = field(default_factory=dict)

    def add(self, label: str, seconds: float) -> None:
        self.times.setdefault(label, []).append(seconds)

    def median(self, label: str) -> float:
        return statistics.median(self.times[label])


# -- turns -----------------------------------------------------------------------------------------


def rotation(items: Sequence[T], turn: int) -> list[T]:
    """``items`` starting at ``turn`` (modulo their number): so that each goes first as often as the others."""
    shift = turn % len(items)
    return [*items[shift:], *items[:shift]]


async def timed(action: Timed) -> float:
    start = time.perf_counter()
    await action()
    return time.perf_counter() - start


async def interleaved(
    runs: Mapping[str, Timed], repeats: int | Mapping[str, int], settle: Settle | None = None
) -> Samples:
    """Run every action once per repetition, the order rotating, and time each.

    ``repeats`` may be a count per label: a label sits out the repetitions
    past its own count. ``settle``, when given, runs after each timed action
    (untimed) and returns extra figures to record under ``label:name``.
    """
    counts = repeats if isinstance(repeats, Mapping) else dict.fromkeys(runs, repeats)
    samples = Samples()
    for rep in range(max(counts.values(), default=0)):
        for label in rotation(list(runs), rep):
            if rep >= counts[label]:
                continue
            samples.add(label, await timed(runs[label]))
            if settle is not None:
                for name, value in (await settle()).items():
                    samples.add(f"{label}:{name}", value)
    return samples


async def wait_quiet(cpu: Callable[[], float], rate: float, limit: float, window: float = 0.25) -> bool:
    """Wait until ``cpu()`` (CPU seconds so far) grows by at most ``rate`` cores over two windows in a row.

    False if ``limit`` seconds passed first.
    """
    started = time.perf_counter()
    calm, before = 0, cpu()
    while calm < 2 and time.perf_counter() - started < limit:
        await asyncio.sleep(window)
        now = cpu()
        calm = calm + 1 if (now - before) / window <= rate else 0
        before = now
    return calm >= 2


# -- subjects --------------------------------------------------------------------------------------


def echo_commands(count: int, prefix: str, blob: str = "") -> list[Command]:
    """``echo`` commands with unique call_ids, as a UFO peer sends them (a repeated call_id is answered from memory).

    ``blob``, when given, travels as a parameter and so comes back in the result, as a screenshot would.
    """
    extra = {"blob": blob} if blob else {}
    return [Command(tool_name="echo", parameters={"value": i, **extra}, call_id=f"{prefix}-{i}") for i in range(count)]


def broken(reason: str) -> SystemExit:
    """The exit of a benchmark whose subject misbehaved: ``raise broken(...)``."""
    return SystemExit(f"benchmark broken: {reason}")


# -- command line and report -----------------------------------------------------------------------


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose ``--help`` is the benchmark's docstring, as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def code_fingerprint(packages: Sequence[str]) -> str:
    """A hash of the packages' Python files as they are on disk now."""
    digest = hashlib.sha256()
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def code_version(packages: Sequence[str]) -> dict[str, Any]:
    """Where the code under test lives, its commit, and whether it had uncommitted changes."""
    found: dict[str, Any] = {
        "source": str(ROOT),
        "fingerprint": code_fingerprint(packages),
        "commit": None,
        "dirty": None,
    }
    git = ["git", "-C", str(ROOT)]
    try:
        found["commit"] = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        changes = subprocess.run(
            [*git, "status", "--porcelain", "--", *packages], capture_output=True, text=True, check=True
        ).stdout.strip()
        found["dirty"] = bool(changes)
    except (OSError, subprocess.CalledProcessError):
        pass
    return found


class Provenance:
    """Which code a run measured, and for how long.

    Figures are only worth comparing when they say what they measured; the
    fingerprint, taken again at the end, tells whether the code changed on
    disk while a long run was going.
    """

    def __init__(self, packages: Sequence[str]) -> None:
        self.packages = tuple(packages)
        self.started = time.perf_counter()
        self.code = code_version(self.packages)

    def finish(self, figures: dict[str, Any]) -> None:
        """Record ``elapsed_s`` and whether the code changed during the run (``code.changed_during_run``)."""
        figures["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        self.code["changed_during_run"] = code_fingerprint(self.packages) != self.code["fingerprint"]

    def print(self, tail: str = ".") -> None:
        """The code line (``tail`` ends it) and, if the code changed during the run, a warning."""
        code = self.code
        state = "uncommitted changes" if code["dirty"] else "clean" if code["dirty"] is False else "not a git checkout"
        print(
            f"Code under test: {code['source']}, commit {code['commit']} ({state}), "
            f"fingerprint {code['fingerprint']}{tail}"
        )
        if code.get("changed_during_run"):
            print("WARNING: the code under test changed on disk during the run; the figures may mix two versions.")


def print_json(figures: Mapping[str, Any]) -> None:
    """Every figure on one line, the last of the output."""
    print(json.dumps(figures, sort_keys=True, default=str))


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns aligned: the first to the left, the others to the right."""
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        cells = [
            line[0].ljust(widths[0]),
            *(cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)),
        ]
        print("  ".join(cells).rstrip())
