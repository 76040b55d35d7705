"""Progress of a batch job on stderr: a tqdm bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress"]


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Images done out of ``total`` (``initial`` of them before this run), images per second
    and the time left.

    On a terminal (``stream.isatty()``) a tqdm bar; otherwise one line
    ``progress: D/T images (F failed), R images/s, about X left`` every ``every_s`` seconds
    and one at :meth:`close`.
    ``enabled=False`` reports nothing.
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        every_s: float = 30.0,
    ) -> None:
        self.total, self.done, self.failed = total, initial, 0
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.every_s = every_s
        self._initial = initial
        self._start = time.perf_counter()
        self._last_line = self._start
        self._last_done = initial
        self._bar: Any = None
        if enabled and _isatty(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, unit="img", file=self.stream, dynamic_ncols=True, smoothing=0.1
            )

    def update(self, images: int = 1, failed: int = 0) -> None:
        """Count ``images`` more as done, ``failed`` of them failed."""
        self.done += images
        self.failed += failed
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(images)
            if self.failed:
                self._bar.set_postfix(failed=self.failed, refresh=False)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.every_s:
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self._start
        new = self.done - self._initial
        rate = new / elapsed if elapsed > 0 else 0.0
        left = (
            f", about {_duration((self.total - self.done) / rate)} left"
            if rate > 0 and self.done < self.total
            else ""
        )
        failed = f" ({self.failed} failed)" if self.failed else ""
        print(
            f"progress: {self.done}/{self.total} images{failed}, {rate:.2f} images/s{left}",
            file=self.stream,
            flush=True,
        )
        self._last_line, self._last_done = now, self.done

    def note(self, line: str) -> None:
        """Print one line (a skipped image) without breaking the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """Finish the bar, or print the last line."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.done != self._last_done:
            self._line(time.perf_counter())


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
