"""Progress bars for everything a user waits for: tqdm on stderr, calm when stderr is a log file."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs):
    """A tqdm bar on stderr; redrawn at most every 5 s when stderr is a log file rather than a terminal."""
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 5.0)
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)


def warn(message: str) -> None:
    """One line on stderr, on a line of its own even while a progress bar is drawn."""
    tqdm.write(message, file=sys.stderr)


def close_bars() -> None:
    """Close every open bar, so that a line printed next (an error, `interrupted`) starts a line of its own; also a
    bar drawn by a constructor that Ctrl-C or SIGTERM cut short, which tqdm's `close` leaves on its line."""
    for bar in list(getattr(tqdm, "_instances", ())):
        if not hasattr(bar, "last_print_t") and getattr(bar, "sp", None) is not None:
            bar.sp("")
            bar.fp.write("\r")
        bar.close()
