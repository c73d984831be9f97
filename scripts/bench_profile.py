"""Summarise py-spy's ``--format raw`` output (collapsed stacks, one ``frames count`` per line).

``python scripts/bench_profile.py a.raw [b.raw ...] [--top N]`` prints, per file, the functions
with the most samples on top of the stack (self) and anywhere in the stack (inclusive, counted
once per sample), as percentages of all samples, plus the split by thread. The benchmark calls
:func:`summary` on the profiles it records with ``--profile``.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _name(frame: str) -> str:
    """``func (path/to/mod.py:12)`` → ``mod.py:func``; lines dropped so a function counts once."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{m.group('func')}"


def load(path: Path) -> tuple[Counter[str], Counter[str], Counter[str], int]:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0]
        if thread.startswith("thread ") or thread.startswith("process "):
            label = frames[1] if len(frames) > 1 and not frames[1].startswith("<") else thread
            threads[re.sub(r"_\d+$", "", label.split(" (")[0])] += count
            frames = frames[1:]
        names = [_name(f) for f in frames]
        total += count
        if names:
            own[names[-1]] += count
        for n in set(names):
            inclusive[n] += count
    return own, inclusive, threads, total


def summary(path: Path, top: int = 15, title: str = "") -> str:
    own, inclusive, threads, total = load(path)
    if not total:
        return f"{title or path.name}: no samples\n"
    lines = [f"{title or path.name}: {total} samples"]
    lines.append("  by thread: " + ", ".join(f"{t} {100 * c / total:.0f}%"
                                           for t, c in threads.most_common(6)))
    lines.append("  self (top of stack):")
    lines += [f"    {100 * c / total:5.1f}%  {n}" for n, c in own.most_common(top)]
    lines.append("  inclusive (pecd and library frames):")
    shown = 0
    for n, c in inclusive.most_common():
        if any(skip in n for skip in ("threading.py", "<module>", "click/", "runpy.py",
                                      "concurrent/futures/thread.py:_worker", "asyncio/runners",
                                      "asyncio/base_events.py:run_", "asyncio/events.py:_run",
                                      "pecd/cli.py", "pecd:<module>")):
            continue
        lines.append(f"    {100 * c / total:5.1f}%  {n}")
        shown += 1
        if shown >= top:
            break
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    for f in args.files:
        print(summary(f, args.top))


if __name__ == "__main__":
    main()
