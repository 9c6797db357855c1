"""Progress of long work: the images of a run, the jobs of a grid. Where stderr is a terminal, a tqdm bar (count,
rate, ETA), with the log records our console handler writes printed above it; elsewhere (a log file, CI, a pipe) a
plain line at most once a minute and one at the end, never a bar's carriage returns::

    [14:02:11] tent: 12000/30000 images, 40%, 1 min 10 s elapsed, ETA 1 min 45 s; fog@5
    [14:04:56] tent: 30000/30000 images, 100%, done in 2 min 55 s

    with Progress(total, "tent", unit="images", enabled=progress) as bar:
        for batch in loader:
            ...
            bar.update(len(batch))
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, TextIO

LINE_INTERVAL_S = 60.0
# tqdm's unit for the rate (12.5img/s); the plain lines use the plural.
TQDM_UNITS = {"images": "img", "jobs": "job"}


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:      # a closed stream
        return False


def duration(seconds: float) -> str:
    """12 s, 3 min 5 s, 2 h 10 min."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class Progress:
    """A count towards ``total``, drawn as a tqdm bar on a terminal, else written as plain lines (see the module).
    Its methods are tqdm's (``update``, ``set_postfix_str``, ``close``), so it stands in where a tqdm bar is
    expected. Disabled, it draws and writes nothing. ``clock`` and ``interval_s`` are for tests."""

    def __init__(self, total: int, label: str, unit: str = "images", enabled: bool = True,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 interval_s: float = LINE_INTERVAL_S):
        self.total, self.label, self.unit = int(total), label, unit
        self.count, self.detail = 0, ""
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.clock, self.interval_s = clock, interval_s
        self.started = self.last_line = clock()
        self.closed = False
        self._bar = None
        self._redirected: list[tuple[logging.StreamHandler, TextIO]] = []
        if enabled and _is_terminal(self.stream):
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, desc=label, unit=TQDM_UNITS.get(unit, unit), file=self.stream,
                             dynamic_ncols=True, mininterval=0.5)
            self._redirect_console()

    # ------------------------------------------------------------------ counting
    def update(self, n: int = 1) -> None:
        self.update_to(self.count + n)

    def update_to(self, count: int) -> None:
        step, self.count = count - self.count, count
        if self._bar is not None:
            if step:
                self._bar.update(step)
        elif self.enabled and not self.closed and self.clock() - self.last_line >= self.interval_s:
            self._write_line()

    def set_total(self, total: int) -> None:
        """A total found to differ once counted (a stream shorter than its segments)."""
        self.total = int(total)
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def set_postfix_str(self, text: str) -> None:
        """What follows the count (the current domain, failed jobs), as tqdm's method of this name."""
        self.detail = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)

    def close(self) -> None:
        """The final line (or the bar's last state); once."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
            for handler, stream in self._redirected:
                handler.setStream(stream)
        elif self.enabled:
            self._write_line(final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ plain lines
    def line(self, final: bool = False) -> str:
        """The plain line for the count now: done, total, percentage, elapsed time and ETA (at the end: done in, or
        stopped at)."""
        elapsed = self.clock() - self.started
        percent = f", {100 * self.count / self.total:.0f}%" if self.total else ""
        text = f"{self.label}: {self.count}/{self.total} {self.unit}{percent}"
        if final:
            finished = self.count >= self.total
            text += f", {'done in' if finished else 'stopped after'} {duration(elapsed)}"
        else:
            text += f", {duration(elapsed)} elapsed"
            if 0 < self.count < self.total and elapsed > 0:
                text += f", ETA {duration((self.total - self.count) * elapsed / self.count)}"
        return text + (f"; {self.detail}" if self.detail else "")

    def _write_line(self, final: bool = False) -> None:
        self.last_line = self.clock()
        self.stream.write(f"[{time.strftime('%H:%M:%S')}] {self.line(final)}\n")
        self.stream.flush()

    # ------------------------------------------------------------------ the terminal
    def _redirect_console(self) -> None:
        """Our console handlers writing to the bar's stream write above the bar while it is drawn (else a log
        record would be drawn over by the bar, or the bar cut in two)."""
        for handler in logging.getLogger().handlers:
            if getattr(handler, "_suite_console", False) and getattr(handler, "stream", None) is self.stream:
                self._redirected.append((handler, handler.setStream(_AboveTheBars(self.stream))))


class _AboveTheBars:
    """A stream that clears tqdm's bars on it while a text is written, then draws them again."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        from tqdm import tqdm
        with tqdm.external_write_mode(file=self.stream):
            self.stream.write(text)
            self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()

