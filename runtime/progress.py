"""Progress of long work, in one style for every binary of the zoo.

    bar = Progress(total, "fine-tuning seed 0")
    bar.update(done, loss=0.31, **{"val acc": "92.0%"})
    bar.log("epoch 40: learning rate cut to 0.001")   # never on the bar's line
    bar.close()

On a terminal the bar is one line redrawn in place ("label  37/300 [=====>    ] 12s  loss
0.3100"). When the output is not a terminal (a log file, a cluster job) there are no carriage
returns or escape codes: one plain line is printed every `interval` seconds, and a last one
when the work ends. Messages from `log` always start on a line of their own. `total` may be
None when the amount of work is unknown. With `delay`, nothing is shown unless the work is
still going after that many seconds: short work stays silent.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

LOG_INTERVAL = 15.0


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


class Progress:
    """A progress line (see the module docstring)."""

    def __init__(self, total: int | None, label: str, stream: TextIO | None = None,
                 interval: float | None = None, unit: str = "", delay: float = 0.0):
        self.total, self.label, self.unit, self.delay = total, label, unit, delay
        self.stream = stream or sys.stdout
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.1 if self.live else LOG_INTERVAL)
        self.start = time.monotonic()
        self.done = 0
        self.metrics: dict = {}
        self._last = -float("inf")
        self._drawn = False
        self._closed = False
        self._shown = False

    def _text(self) -> str:
        elapsed = time.monotonic() - self.start
        parts = [self.label]
        if self.total:
            width = len(str(self.total))
            parts.append(f"{self.done:>{width}}/{self.total}{self.unit}")
            if self.live:
                filled = int(20 * min(self.done / self.total, 1.0))
                parts.append("[" + "=" * filled + (">" if filled < 20 else "")
                             + " " * max(19 - filled, 0) + "]")
        else:
            parts.append(f"{self.done}{self.unit}")
        parts.append(f"{elapsed:.0f}s")
        parts += [f"{k} {_format(v)}" for k, v in self.metrics.items()]
        return "  ".join(parts)

    def _clear(self) -> None:
        if self.live and self._drawn:
            self.stream.write("\r\033[K")
            self._drawn = False

    def _draw(self, final: bool = False) -> None:
        now = time.monotonic()
        if now - self.start < self.delay and not self._shown:
            return  # short work stays silent
        if not final and now - self._last < self.interval:
            return
        self._shown = True
        self._last = now
        if self.live:
            self.stream.write("\r\033[K" + self._text() + ("\n" if final else ""))
            self._drawn = not final
        else:
            self.stream.write(self._text() + "\n")
        self.stream.flush()

    def update(self, done: int, **metrics) -> None:
        """Set the amount of work done and the metrics shown beside it."""
        self.done = done
        self.metrics.update(metrics)
        if not self._closed:
            self._draw()

    def log(self, message: str) -> None:
        """Print `message` on its own line (the bar is redrawn under it)."""
        self._clear()
        self.stream.write(message + "\n")
        self.stream.flush()
        self._last = -float("inf")
        if self.live and not self._closed:
            self._draw()

    def close(self) -> None:
        """Print the final state of the bar on a line of its own, once."""
        if not self._closed:
            self._draw(final=True)
            self._closed = True
