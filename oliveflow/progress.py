"""What a person watching ``oliveflow run`` sees: one line per step of long work, progress while it runs, and the
rest of the output in the run's log file.

``task(...)`` marks a piece of long work (a stage, the embedded model's build, a model's conversion). Its start and
end are logged to ``oliveflow.progress``; while a console is installed (``console(...)``, the CLI) it also gets a
live bar on a terminal, or a progress line every ``EVERY_SECONDS`` elsewhere (CI, a log), so the console is never
silent for longer than that. Where the work has a step count it calls ``advance()``; where a library runs its own
tqdm bar (AWQ's layers, the Trainer's steps), that bar's count is shown; otherwise the time spent.

``quiet(log_file)`` sends everything else to the run's log file: the process's stdout and stderr (file descriptors
1 and 2, so that C++ libraries and ``print`` calls are caught too: ModelBuilder prints, the Trainer prints its loss
dicts, onnxruntime logs from C++), Python warnings (through logging) and every library's log handlers, which write
to those streams. The console keeps a copy of the original stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

log = logging.getLogger("oliveflow.progress")

EVERY_SECONDS = 10.0  # the longest the console stays silent during long work
_LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _sized_terminal(stream: TextIO) -> bool:
    """A terminal tqdm can draw on: one with no size (a pty nobody sized) gets lines, as a log does."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return stream.isatty() and size.columns > 0 and size.lines > 0


STARTED = time.monotonic()  # the command's start (this module is imported first thing): the console's clock


class _Console:
    """The stream people read, when the run started, when it last got a line, and the work under way (innermost
    last: only that one shows progress)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = _sized_terminal(stream)
        self.started, self.last_line = STARTED, time.monotonic()
        self.lock = threading.Lock()
        self.active: list[Task] = []

    def line(self, text: str) -> None:
        elapsed = int(time.monotonic() - self.started)
        text = f"[{elapsed // 60:3d}:{elapsed % 60:02d}] {text}"
        with self.lock:
            if self.live:
                from tqdm import tqdm

                tqdm.write(text, file=self.stream)  # above the live bar, which is redrawn below it
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
            self.last_line = time.monotonic()


_CONSOLE: _Console | None = None


class _ConsoleHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if _CONSOLE is not None:
            _CONSOLE.line(self.format(record))


@contextlib.contextmanager
def console(stream: TextIO) -> Iterator[None]:
    """Show ``oliveflow.progress`` on ``stream`` (with bars when it is a terminal) for the block."""
    global _CONSOLE
    previous, _CONSOLE = _CONSOLE, _Console(stream)
    handler = _ConsoleHandler(logging.INFO)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    # oliveflow's own warnings say what to change (examples cut to max_seq_len...): a person sees them too.
    warnings_handler = _ConsoleHandler(logging.WARNING)
    warnings_handler.setFormatter(logging.Formatter("warning: %(message)s"))
    ours = logging.getLogger("oliveflow")
    ours.addHandler(warnings_handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        ours.removeHandler(warnings_handler)
        _CONSOLE = previous


def say(message: str, *args: object) -> None:
    """One line for the person running the command (and the log)."""
    log.info(message, *args)


def _foreign_bar() -> str:
    """The newest live tqdm bar that a library runs (AWQ's layers, the Trainer's steps), as "desc n/total"."""
    try:
        from tqdm.std import tqdm
    except ImportError:
        return ""
    try:
        bars = [bar for bar in list(getattr(tqdm, "_instances", ())) if not getattr(bar, "oliveflow", False)]
    except RuntimeError:  # a bar opened or closed while we looked: next time
        return ""
    if not bars:
        return ""
    bar = max(bars, key=lambda b: b.start_t)
    count = f"{bar.n}/{bar.total}" if bar.total else str(bar.n)
    return " ".join(part for part in (bar.desc.rstrip(": "), count, "" if bar.unit == "it" else bar.unit) if part)


class Task:
    """A piece of long work in progress: ``advance()`` counts its steps, ``outcome`` ends its last line."""

    def __init__(self, name: str, total: int | None, unit: str) -> None:
        self.name, self.total, self.unit, self.done = name, total, unit, 0
        self.outcome = ""
        self.started = time.monotonic()

    def advance(self, steps: int = 1) -> None:
        self.done += steps

    def status(self) -> str:
        if self.total:
            return f"{self.done}/{self.total} {self.unit}"
        return _foreign_bar()


@contextlib.contextmanager
def without_library_bars() -> Iterator[None]:
    """transformers' own tqdm bars off for the block (work that shows its progress through ``task``)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def steps(total: int, unit: str = "step") -> Callable[[int], None]:
    """Give the innermost work under way a step count (no line of its own); returns its ``advance``. Without a
    console, or outside any work, a no-op."""
    work = _CONSOLE.active[-1] if _CONSOLE is not None and _CONSOLE.active else None
    if work is None:
        return lambda steps=1: None
    work.total, work.unit, work.done = total, unit, 0
    return work.advance


@contextlib.contextmanager
def task(name: str, total: int | None = None, unit: str = "step") -> Iterator[Task]:
    """Long work named ``name``: a start line, progress while it runs (see the module), an end line with its time."""
    work = Task(name, total, unit)
    say("%s ...", name)
    shown, stop, ticker = _CONSOLE, threading.Event(), None
    if shown is not None:
        shown.active.append(work)
        ticker = threading.Thread(target=_tick, args=(work, shown, stop), daemon=True, name="oliveflow-progress")
        ticker.start()
    try:
        yield work
    except BaseException:
        _stop(work, shown, stop, ticker)
        say("%s: failed after %.0f s", name, time.monotonic() - work.started)
        raise
    _stop(work, shown, stop, ticker)
    say("%s: done in %.1f s%s", name, time.monotonic() - work.started, f" ({work.outcome})" if work.outcome else "")


def _stop(work: Task, shown: _Console | None, stop: threading.Event, ticker: threading.Thread | None) -> None:
    stop.set()
    if ticker is not None:
        ticker.join()
    if shown is not None:
        shown.active.remove(work)


def _tick(work: Task, shown: _Console, stop: threading.Event) -> None:
    """While ``work`` is the innermost work under way: a live bar on a terminal, else a line when the console has
    been silent for EVERY_SECONDS."""
    bar = None
    try:
        while not stop.wait(min(1.0, EVERY_SECONDS / 4)):
            innermost = shown.active[-1] is work
            if shown.live:
                bar = _draw(bar, work, shown, innermost)
            elif innermost and time.monotonic() - shown.last_line >= EVERY_SECONDS:
                status = work.status()
                shown.line(f"{work.name}: {status + ', ' if status else ''}{time.monotonic() - work.started:.0f} s")
    finally:
        if bar is not None:
            with shown.lock:
                bar.close()


def _draw(bar, work: Task, shown: _Console, innermost: bool):
    """The terminal's tqdm bar for ``work``: opened while it is the innermost work, redrawn, closed otherwise."""
    from tqdm import tqdm

    with shown.lock:
        if not innermost:
            if bar is not None:
                bar.close()
            return None
        if bar is None:
            bar = tqdm(total=work.total, desc=work.name, unit=work.unit, file=shown.stream, leave=False,
                       dynamic_ncols=True, mininterval=0.5, initial=work.done,
                       # no count of its own: the time, and a library's bar after it ("finetune: 00:08, 26/60")
                       bar_format=None if work.total else "{desc}: {elapsed}{postfix}")
            bar.oliveflow = True  # not a library's bar: _foreign_bar skips it
        if work.total:
            if bar.total != work.total:  # a count given once the work was under way (steps())
                bar.total, bar.unit, bar.bar_format = work.total, work.unit, None
            bar.update(work.done - bar.n)
        else:
            bar.set_postfix_str(_foreign_bar(), refresh=False)
        bar.refresh()
        return bar


def log_file(home: Path) -> Path:
    """A new file for this run's log: ``$OLIVEFLOW_HOME/logs/run-<UTC time>-<pid>.log``."""
    folder = home / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}.log"


@contextlib.contextmanager
def quiet(path: Path) -> Iterator[TextIO]:
    """Send the process's stdout, stderr, warnings and log records to ``path`` for the block; yield a stream on the
    original stderr for the console. The file descriptors and ``sys.stdout``/``sys.stderr`` are restored at the
    end, whatever happens."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = os.dup(1), os.dup(2)
    screen = os.fdopen(os.dup(2), "w", encoding=sys.stderr.encoding or "utf-8", errors="replace")
    root, ours = logging.getLogger(), logging.getLogger("oliveflow")
    level = ours.level
    # On file descriptor 2, not on the log file: a handler that a library creates in the block (Prefect's console
    # handler, at import) keeps this stream, and writes to the console after the block, not to a closed file.
    text = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    with open(path, "ab", buffering=0) as target:
        os.dup2(target.fileno(), 1)
        os.dup2(target.fileno(), 2)
        # Records of loggers without a handler of their own (oliveflow's, warnings) go to the log with a time.
        handler = logging.StreamHandler(text)
        handler.setFormatter(logging.Formatter(_LINE_FORMAT))
        try:
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                root.addHandler(handler)
                # oliveflow's INFO records (the fine-tune's memory plan...) too; the root keeps its level, so that
                # libraries without a level of their own (httpx: a line per Prefect API call) stay at WARNING.
                ours.setLevel(min(level or logging.INFO, logging.INFO))
                logging.captureWarnings(True)
                yield screen
        finally:
            logging.captureWarnings(False)
            root.removeHandler(handler)
            ours.setLevel(level)
            text.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            screen.close()
