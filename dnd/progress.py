"""Progress bars: tqdm with ETA and the current loss on a terminal, quiet lines in logs."""
from __future__ import annotations

import sys
import time
from typing import Iterable

from tqdm.auto import tqdm


class Progress:
    """`for step in Progress(range(a, b), total=b, desc=...)`; call `.update_loss(x)` each step.

    On a terminal this is a tqdm bar (ETA, loss); in a log (not a tty) it prints one
    line every `log_every` steps instead of redrawing a bar.
    """

    def __init__(self, iterable: Iterable, *, total: int | None = None, initial: int = 0,
                 desc: str = "", log_every: int = 50, stream=None):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.iterable, self.total, self.desc, self.log_every = iterable, total, desc, log_every
        self.initial = initial
        self.postfix: dict = {}
        self.bar = tqdm(iterable, total=total, initial=initial, desc=desc, file=self.stream,
                        dynamic_ncols=True) if self.tty else None

    def __iter__(self):
        if self.bar is not None:
            yield from self.bar
            return
        start, n = time.time(), 0
        for i, item in enumerate(self.iterable):
            yield item
            n = i + 1
            done = self.initial + n
            if n % self.log_every == 0 or (self.total and done == self.total):
                rate = n / max(time.time() - start, 1e-9)
                eta = (self.total - done) / rate if self.total else float("nan")
                post = " ".join(f"{k}={v}" for k, v in self.postfix.items())
                print(f"{self.desc} {done}/{self.total or '?'} {rate:.2f} it/s eta {eta:.0f}s {post}",
                      file=self.stream, flush=True)

    def set(self, **values) -> None:
        self.postfix = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)
