"""Progress of long work that reaches wherever the output goes.

In a terminal it is a tqdm bar. Anywhere else (a flow run's log, a batch job, a file) a carriage-return
bar arrives as one line when the work ends, so progress is written as log lines instead: one every
`every` seconds and one at the end, each with the count, the rate and the time left.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm import tqdm

log = logging.getLogger("cxr.progress")
LOG_EVERY_S = 30.0


class Progress:
    """`update(n)` as work is done; `close()` (or leave the `with` block) when it ends."""

    def __init__(self, label: str, total: int, unit: str = "images", every: float = LOG_EVERY_S,
                 enabled: bool = True, interactive: bool | None = None):  # fmt: skip
        self.label, self.total, self.unit, self.every = label, int(total), unit, every
        self.done, self.enabled = 0, enabled
        self.start = self.last = time.monotonic()
        interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = tqdm(total=total, desc=label, unit=unit, leave=False) if enabled and interactive else None
        self.postfix: dict[str, Any] = {}

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Record `n` more units done (and figures to show beside the count, e.g. loss=0.31)."""
        self.done += n
        self.postfix.update(postfix)
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            log.info(self.line())

    def line(self) -> str:
        """`label: done/total unit (share), rate/s, ~time left` plus any figures."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label}: {self.done:,}/{self.total:,} {self.unit}"
        if self.total:
            text += f" ({self.done / self.total:.0%})"
        text += f", {rate:.1f} {self.unit}/s"
        if self.done < self.total and rate > 0:
            text += f", ~{_duration((self.total - self.done) / rate)} left"
        else:
            text += f", {_duration(elapsed)}"
        return text + "".join(f", {k} {v}" for k, v in self.postfix.items())

    def close(self) -> None:
        """End the bar, or write the final line."""
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            log.info(self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
