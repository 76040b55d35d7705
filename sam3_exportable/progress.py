"""Named, timed stages of a long job (build, export, save, ...), and how they are reported."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

__all__ = ["Stages"]


class Stages:
    """Times named stages and reports them: ``[name] detail`` when one starts, the lines it
    notes, ``[name] done in X s`` when it ends.

    ``stream=None`` reports nothing (library use); ``on_done(name, seconds)`` is called after
    each stage (the bench records peak memory there). :attr:`seconds` keeps every stage's
    time in order.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        on_done: Callable[[str, float], None] | None = None,
    ) -> None:
        self.stream = stream
        self.on_done = on_done
        self.seconds: dict[str, float] = {}

    @classmethod
    def printing(cls) -> Stages:
        """Stages reported on standard output (the command line's)."""
        return cls(stream=sys.stdout)

    def note(self, line: str) -> None:
        """Report one indented line under the current stage."""
        if self.stream is not None:
            print(f"  {line}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[Stages]:
        if self.stream is not None:
            print(f"[{name}] {detail}".rstrip(), file=self.stream, flush=True)
        start = time.perf_counter()
        yield self
        seconds = time.perf_counter() - start
        self.seconds[name] = seconds
        if self.stream is not None:
            print(f"[{name}] done in {seconds:.1f} s", file=self.stream, flush=True)
        if self.on_done is not None:
            self.on_done(name, seconds)

    def summary(self) -> str:
        """``timings: build 1.0 s, ..., total X s``."""
        total = sum(self.seconds.values())
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        return f"timings: {parts}, total {total:.1f} s"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.seconds)
