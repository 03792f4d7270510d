"""Progress of long loops (training passes, featurization blocks) for whoever is watching.

Wrap the iterable of work units with :func:`progress`:

* on a terminal (standard error is a TTY), a tqdm progress bar is shown on standard error;
* otherwise, inside a running AiiDA process (a calcfunction, a work chain step, also under the daemon), report lines
  go to the process log, every 10 % of the units and at the end, so that ``verdi process report <pk>`` shows how far
  the process got;
* otherwise (a script with redirected output, a test), the iterable passes through silently.

::

    for block in progress(blocks, total=n_blocks, description='training SGDClassifier'):
        ...
"""

from __future__ import annotations

import math
import sys
import time
import typing as t
from collections.abc import Iterable, Iterator

__all__ = ('progress',)

T = t.TypeVar('T')

#: Fraction of the work units between two report lines in the process log.
REPORT_STEP = 0.1


def _stderr_is_terminal() -> bool:
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def _current_process() -> t.Any:
    """The AiiDA process that is running in this thread, or ``None``."""
    from aiida.engine import Process

    return Process.current()


def _report_progress(
    iterable: Iterable[T], total: int | None, description: str, unit: str, process: t.Any
) -> Iterator[T]:
    """Yield the items and send a report line to ``process`` at every ``REPORT_STEP`` of ``total`` and at the end."""
    start = time.monotonic()
    steps = round(1 / REPORT_STEP)
    reported_step = 0
    done = 0
    for item in iterable:
        yield item
        done += 1
        if total and done < total:
            step = math.floor(done * steps / total)
            if step > reported_step:
                reported_step = step
                elapsed = time.monotonic() - start
                process.report(f'{description}: {100 * done // total}% ({done}/{total} {unit}, {elapsed:.1f} s)')
    process.report(f'{description}: done, {done} {unit} in {time.monotonic() - start:.1f} s')


def progress(
    iterable: Iterable[T], total: int | None = None, description: str = 'working', *, unit: str = 'blocks'
) -> Iterator[T]:
    """Iterate over ``iterable``, showing progress where someone can see it (see the module documentation).

    Where the progress goes is decided when the iteration starts. A loop left early reports nothing more.

    :param iterable: the work units, for example blocks of rows.
    :param total: the number of units; taken from ``len(iterable)`` if not given. Without it, the process log gets
        only the final line.
    :param description: what is being done, the start of every line (for example ``'training SGDClassifier'``).
    :param unit: the name of the units in the lines.
    """
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if _stderr_is_terminal():
        from tqdm import tqdm

        yield from tqdm(iterable, total=total, desc=description, unit=f' {unit}', file=sys.stderr, dynamic_ncols=True)
        return
    process = _current_process()
    if process is not None:
        yield from _report_progress(iterable, total, description, unit, process)
        return
    yield from iterable
