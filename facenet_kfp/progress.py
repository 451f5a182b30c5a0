"""Progress reporting for long steps: periodic log lines (read in the KFP UI) and a tty bar.

A local run (`make run`) shows each step's progress lines and nothing else of its log:
`progress_message` finds them in a log line, and ``FACENET_PROGRESS_EVERY`` (seconds, set by
the local runner for its steps) caps the interval between two lines of any `Progress`, so a
long step reports at least that often even where its own interval is longer.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time

log = logging.getLogger("facenet_kfp")

EVERY_ENV = "FACENET_PROGRESS_EVERY"
_CLOCK = r"\d+(?::\d\d)+"
_NUMBER = r"\d[\d,]*(?:\.\d+)?"
# What `Progress.status` writes: "desc: done[/total] unit [(pct%)], rate unit/s, (time left|time
# elapsed|done in time)".
PROGRESS_LINE = re.compile(rf".+?: {_NUMBER}(?:/{_NUMBER})? \S+(?: \(\d+%\))?, {_NUMBER} \S+/s, "
                           rf"(?:{_CLOCK} (?:left|elapsed)|done in {_CLOCK})")
# The prefixes a step's log lines carry: the KFP executor's ("[KFP Executor 2026-01-01 10:00:00,000
# INFO]: ") and `kfp_io.configure_logging`'s ("10:00:00 INFO facenet_kfp.extract: ").
_LOG_PREFIX = re.compile(r"^(?:\[KFP Executor [^\]]*\]:|\d\d:\d\d:\d\d (?:INFO|WARNING) [\w.]+:)\s*")


def progress_message(line: str) -> str | None:
    """The `Progress` message of a step's log line (without the log prefix), or None if it is not one."""
    message = _LOG_PREFIX.sub("", line.strip(), count=1)
    return message if PROGRESS_LINE.fullmatch(message) else None


def _fmt_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:d}:{secs:02d}"


def _every(every: float) -> float:
    """`every`, capped by ``$FACENET_PROGRESS_EVERY`` when that is a positive number."""
    try:
        cap = float(os.environ.get(EVERY_ENV, "inf"))
    except ValueError:
        return every
    return min(every, cap) if cap > 0 and not math.isnan(cap) else every


class Progress:
    """Counts work done and reports `done/total`, rate and time left.

    A log line goes out every `every` seconds (at most ``$FACENET_PROGRESS_EVERY``)
    and at the end; when stderr is a terminal a one-line bar is redrawn in place as
    well. `scale`/`unit` let byte counts print as MB.
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "items",
                 every: float = 5.0, scale: float = 1.0, bar: bool | None = None,
                 logger: logging.Logger = log):
        self.desc, self.total, self.unit = desc, total, unit
        self.every, self.scale, self.logger = _every(every), scale, logger
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

    def status(self, now: float | None = None, final: bool = False) -> str:
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
        if final:
            text += f", done in {_fmt_seconds(elapsed)}"
        elif self.total and rate > 0:
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
        self.logger.info("%s", self.status(now, final=True))
