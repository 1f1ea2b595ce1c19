"""What folding server/service.py's three `except Unavailable: if not s.closed: raise` blocks (`_reply_side`, `_send`,
`_send_side`) into one helper would cost per reply (round 29: the lead kept them apart for that reason): the inline
try/except (zero-cost in CPython 3.11+ while nothing raises) against a class-based context manager and a
`contextlib.contextmanager` generator around the same no-op send, median ns per call over alternating rounds.

    nice -n 5 .venv/bin/python bench/reply_guard.py
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import timeit
from collections.abc import Iterator
from typing import Any


class Unavailable(Exception):
    pass


class Session:
    closed = False


s = Session()


def send() -> None:
    pass


class _UnlessClosed:
    """The helper a fold would add: swallow Unavailable once the session is closed."""

    __slots__ = ("s",)

    def __init__(self, s: Session) -> None:
        self.s = s

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        return kind is not None and issubclass(kind, Unavailable) and self.s.closed


@contextlib.contextmanager
def unless_closed(s: Session) -> Iterator[None]:
    try:
        yield
    except Unavailable:
        if not s.closed:
            raise


def inline() -> None:
    try:
        send()
    except Unavailable:
        if not s.closed:
            raise


def with_class() -> None:
    with _UnlessClosed(s):
        send()


def with_generator() -> None:
    with unless_closed(s):
        send()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=200_000)
    a = parser.parse_args()
    cases = {"inline try/except": inline, "class helper": with_class, "contextmanager helper": with_generator}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(a.rounds):  # alternating: the box's load falls on all alike
        for name, f in cases.items():
            times[name].append(timeit.timeit(f, number=a.calls) / a.calls * 1e9)
    base = statistics.median(times["inline try/except"])
    print(f"{'case':24} {'median ns/call':>14} {'vs inline':>10}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:24} {m:14.0f} {m / base:9.2f}x")


if __name__ == "__main__":
    main()
