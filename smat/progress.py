"""Progress bars: tqdm on a terminal; in a log file (a Snakemake job's), one plain line every 30 s.

tqdm redraws its bar with carriage returns, which turn a log file into one enormous line; off a terminal
each update is written as its own line instead, and less often.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_SECONDS = 30.0


class _LineBar(tqdm):
    """tqdm that writes each update on a new line (for files)."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        self.fp.write((msg or self.__str__()) + "\n")
        self.fp.flush()
        return True

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)   # shown with the next timed update


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """`tqdm(iterable, **kwargs)` on a terminal; a line-per-update bar every 30 s otherwise."""
    stream = kwargs.get("file") or sys.stderr
    if kwargs.get("disable") or stream.isatty():
        return tqdm(iterable, **kwargs)
    kwargs.setdefault("mininterval", LOG_INTERVAL_SECONDS)
    kwargs.pop("leave", None)
    return _LineBar(iterable, ascii=True, **kwargs)
