"""Progress reporting for long steps: periodic log lines (read in the KFP UI) and a tty bar."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("facenet_kfp")


def _fmt_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:d}:{secs:02d}"


class Progress:
    """Counts work done and reports `done/total`, rate and time left.

    A log line goes out every `every` seconds (and at the end); when stderr is a
    terminal a one-line bar is redrawn in place as well. `scale`/`unit` let byte
    counts print as MB.
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "items",
                 every: float = 5.0, scale: float = 1.0, bar: bool | None = None,
                 logger: logging.Logger = log):
        self.desc, self.total, self.unit = desc, total, unit
        self.every, self.scale, self.logger = every, scale, logger
        self.bar = sys.stderr.isatty() if bar is None else bar
        self.done = 0
        self.start = self.last = time.monotonic()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.bar:
            self._draw(now)
        if now - self.last >= self.every:
            self.last = now
            self.logger.info("%s", self.status(now))

    def status(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        done = self.done / self.scale
        text = f"{self.desc}: {done:,.1f}" if self.scale != 1 else f"{self.desc}: {self.done:,}"
        if self.total:
            total = self.total / self.scale
            text += f"/{total:,.1f}" if self.scale != 1 else f"/{self.total:,}"
            text += f" {self.unit} ({100.0 * self.done / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate / self.scale:,.1f} {self.unit}/s"
        if self.total and rate > 0:
            text += f", {_fmt_seconds((self.total - self.done) / rate)} left"
        else:
            text += f", {_fmt_seconds(elapsed)} elapsed"
        return text

    def _draw(self, now: float) -> None:
        width = 30
        frac = min(self.done / self.total, 1.0) if self.total else 0.0
        filled = "#" * int(frac * width)
        sys.stderr.write(f"\r[{filled:<{width}}] {self.status(now)}\033[K")
        sys.stderr.flush()

    def close(self) -> None:
        now = time.monotonic()
        if self.bar:
            self._draw(now)
            sys.stderr.write("\n")
        self.logger.info("%s (done in %s)", self.status(now), _fmt_seconds(now - self.start))
