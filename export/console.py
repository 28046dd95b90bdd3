"""What `python -m export` (so `make models`, the first step of `make serve`) shows on the console
(issue 28): one progress bar per stage (per model: train, export, each variant) and a summary table
(time per stage, each model's headline metric, where the log is). Everything else (torch.onnx's and
ONNX Runtime's messages, Python's and native alike; warnings; BentoML's store messages; training's
evaluation lines; the commands' own detailed lines) goes to a log file,
``$SUITE_ARTIFACTS/logs/models-<UTC time>.log``. A failed stage prints its error and the log's path.

The console is the process's stdout and stderr as they were at the start, kept on duplicated file
descriptors; ``output_to`` then points descriptors 1 and 2 (where C++ code writes straight to) and
``sys.stdout``/``sys.stderr`` at the log. Live bars are drawn on stderr when it is a terminal; when
it is not, each stage prints one line, its final state, on stdout.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from training.artifacts import artifacts_root

log = logging.getLogger("export")
KEEP_LOGS = 20  # the newest models-*.log files kept in the logs folder
DEFAULT_COLUMNS = 100  # a bar's width on a terminal that does not say its own
ERROR_LINES = 12  # a longer error shows its first line and last lines on the console (all of it in the log)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Stages without a count of their own (export, variants) show their elapsed time and result.
STAGE_FORMAT = "{desc}: {percentage:3.0f}%|{bar:10}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


def _flush_native() -> None:
    """C's stdio buffers (a library's printf), so that nothing buffered while the descriptors
    pointed at the log comes out on the console later."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


def _flush_python() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


@contextlib.contextmanager
def output_to(path: Path):
    """Everything written to stdout and stderr inside the block goes to ``path`` (appended): Python's
    ``sys.stdout``/``sys.stderr`` and file descriptors 1 and 2, where native code (torch.onnx's and
    ONNX Runtime's C++ messages) and subprocesses write. Restored afterwards, even on an error."""
    _flush_python()
    _flush_native()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    # Never closed: a library's handler made inside the block keeps writing to the log, not to a closed file.
    stream = open(fd, "w", buffering=1, encoding="utf-8", errors="replace")
    saved = [os.dup(1), os.dup(2)]
    streams = sys.stdout, sys.stderr
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = stream
        yield stream
    finally:
        _flush_python()
        _flush_native()
        sys.stdout, sys.stderr = streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for dup in saved:
            os.close(dup)


def _console_stream(stream):
    """A stream that keeps writing where ``stream`` writes once descriptors 1 and 2 point elsewhere:
    a duplicate of its descriptor, or ``stream`` itself when it has none (pytest's capture)."""
    try:
        fileno = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return stream
    return open(os.dup(fileno), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                errors="replace")


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, OSError, ValueError):
        return False


class _Sink:
    """Where a bar draws when the console is not a terminal (only its final state is printed)."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


# Headline metrics as people read them: metric -> value -> text.
_METRICS = {
    "accuracy": lambda v: f"accuracy {100 * v:.2f} %",
    "mean_iou": lambda v: f"mean IoU {100 * v:.1f} %",
    "psnr_gain_blind": lambda v: f"PSNR gain {v:+.2f} dB (blind)",
    "psnr_gain": lambda v: f"PSNR gain {v:+.2f} dB",
    "heldout_nats_per_char": lambda v: f"{v:.3f} nats/char (perplexity {math.exp(v):.2f})",
    "class_agreement": lambda v: f"class agreement {100 * v:.1f} %",
}


def headline(metric: str | None, value) -> str:
    """``metric = value`` as the summary shows it (units where the metric has them)."""
    if not metric or value is None:
        return "-"
    try:
        return _METRICS[metric](float(value)) if metric in _METRICS else f"{metric} {float(value):.4g}"
    except (TypeError, ValueError):
        return f"{metric} {value}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


@dataclass
class Row:
    """One model of the summary: time per stage and its headline metric."""

    model: str
    stages: dict[str, float | str] = field(default_factory=dict)  # stage -> seconds, or a word ("in store")
    metric: str = "-"


class Stage:
    """One stage of one model: a bar on the console while it runs, its time in the summary."""

    def __init__(self, console: "Console", model: str, what: str, total: int | None):
        self.console, self.model, self.what, self.total = console, model, what, total
        self.desc = f"[{model}] {what}"
        self.result = ""  # shown after the bar's counts on its final line
        self._bar: tqdm | None = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def bar(self, iterable=None, **kwargs) -> tqdm:
        """This stage's bar over ``iterable`` (the training loop's steps: ``progress=stage.bar``);
        ``kwargs`` as tqdm's, the description and where it draws are the stage's."""
        kwargs.update(desc=self.desc, file=self.console.bar_file, leave=True)
        if self.console.live and not self.console.columns:  # a terminal of unknown width: a fixed one
            kwargs.update(dynamic_ncols=False, ncols=DEFAULT_COLUMNS)
        else:
            kwargs.setdefault("dynamic_ncols", True)
        if self._bar is not None:
            self._bar.close()
        self._bar = tqdm(iterable, **kwargs)
        return self._bar

    def advance(self, result: str = "") -> None:
        """One of the stage's ``total`` steps done; ``result``: what it gave (shown on the bar)."""
        if self._bar is None:
            self.bar(total=self.total, bar_format=STAGE_FORMAT)
        if result:
            self.done(result)
        self._bar.update()

    def done(self, result: str) -> None:
        """What the stage gave, for its bar's final line."""
        self.result = result
        if self._bar is not None:
            self._bar.set_postfix_str(result, refresh=False)

    def _tick(self) -> None:
        while not self._stop.wait(1.0):  # the elapsed time keeps moving between a stage's steps
            bar = self._bar
            if bar is not None and not bar.disable:
                with contextlib.suppress(Exception):
                    bar.refresh()

    def __enter__(self) -> "Stage":
        self.started = time.monotonic()
        if self.total is not None:
            self.bar(total=self.total, bar_format=STAGE_FORMAT)
        if self.console.live:
            self._ticker = threading.Thread(target=self._tick, name=f"bar {self.desc}", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        seconds = time.monotonic() - self.started
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        bar = self._bar
        if bar is None:  # a stage that drew nothing (training stopped before its bar)
            bar = self.bar(total=1, bar_format=STAGE_FORMAT)
        if exc is not None:
            self.done("failed")
        elif self.result:
            bar.set_postfix_str(self.result, refresh=False)
        bar.refresh()
        bar.close()
        if not self.console.live:  # no terminal: the bar's final state, once
            self.console.print(str(bar))
        self.console.row(self.model).stages[self.what] = seconds
        if exc is not None:
            self.console.failed_stage = f"[{self.model}] {self.what} failed after {_duration(seconds)}"


class Console:
    """The console of one `python -m export` run and its log file (``verbose``: no log, everything
    on the console as before issue 28, the bars and the summary as well)."""

    def __init__(self, verbose: bool = False, name: str = "models"):
        self.verbose = verbose
        # Verbose, nothing is redirected: the streams themselves (tqdm then clears a bar before a line).
        self.out = sys.stdout if verbose else _console_stream(sys.stdout)
        self.err = sys.stderr if verbose else _console_stream(sys.stderr)
        self.live = _isatty(self.err)  # bars drawn as they go; else one line per stage
        self.columns = 0  # the terminal's width, where it tells (a pseudo-terminal may say 0)
        if self.live:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                self.columns = os.get_terminal_size(self.err.fileno()).columns
        self.bar_file = self.err if self.live else _Sink()
        self.rows: dict[str, Row] = {}
        self.failed_stage = ""  # which stage raised, for the error's line
        self.started = time.monotonic()
        self.log_path: Path | None = None
        if not verbose:
            logs = artifacts_root() / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            self.log_path = logs / f"{name}-{stamp}.log"
            if self.log_path.exists():
                self.log_path = logs / f"{name}-{stamp}-{os.getpid()}.log"
            self.log_path.touch()
            for old in sorted(logs.glob(f"{name}-*.log"), key=lambda p: p.stat().st_mtime)[:-KEEP_LOGS]:
                old.unlink(missing_ok=True)

    @property
    def log_shown(self) -> str:
        """The log's path as the console shows it: relative to the working folder when under it."""
        if self.log_path is None:
            return "-"
        try:
            return str(self.log_path.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(self.log_path)

    def print(self, text: str = "", err: bool = False) -> None:
        stream = self.err if err else self.out
        if self.live and not err:  # keep the order of bars (stderr) and lines (stdout) on a terminal
            self.err.flush()
        print(text, file=stream, flush=True)

    @contextlib.contextmanager
    def quiet(self):
        """The block's output (and its log records and warnings) into the log; the console keeps
        only what this class prints."""
        if self.verbose:
            root = logging.getLogger()
            if not root.handlers:
                logging.basicConfig(level=logging.INFO, format="%(message)s")
            yield
            return
        handler = logging.FileHandler(self.log_path, mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root = logging.getLogger()
        level = root.level
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        try:
            with output_to(self.log_path):
                yield
        finally:
            logging.captureWarnings(False)
            root.removeHandler(handler)
            root.setLevel(level)
            handler.close()

    def stage(self, model: str, what: str, total: int | None = None) -> Stage:
        return Stage(self, model, what, total)

    def row(self, model: str) -> Row:
        return self.rows.setdefault(model, Row(model))

    def metric(self, model: str, metric: str | None, value, note: str = "") -> None:
        self.row(model).metric = headline(metric, value) + (f" ({note})" if note else "")

    def start(self, what: str) -> None:
        self.print(what + (f"; details in {self.log_shown}" if self.log_path else ""))

    def failed(self, error: BaseException) -> None:
        """The error on the console (its last lines, when long) with the log's path; the
        traceback into the log."""
        import traceback

        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write("".join(traceback.format_exception(error)))
        lines = f"{type(error).__name__}: {error}".rstrip().splitlines()
        if len(lines) > ERROR_LINES:
            lines = [lines[0], f"... ({len(lines) - ERROR_LINES} lines; all in the log)", *lines[-ERROR_LINES + 1:]]
        self.print(f"{self.failed_stage or 'failed'}: " + "\n".join(lines), err=True)
        if self.log_path is not None:
            self.print(f"details: {self.log_shown}", err=True)

    def summary(self) -> None:
        """The table: each model's time per stage and headline metric, the total, the log."""
        if self.rows:
            stages = list(dict.fromkeys(s for row in self.rows.values() for s in row.stages))
            header = ["model", *stages, "headline metric"]
            cells = [[row.model, *(self._cell(row.stages.get(s)) for s in stages), row.metric]
                     for row in self.rows.values()]
            widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header) - 1)]
            for r in [header, *cells]:
                self.print("  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]).rstrip())
        where = f"; log: {self.log_shown}" if self.log_path else ""
        self.print(f"done in {_duration(time.monotonic() - self.started)}{where}")

    @staticmethod
    def _cell(value) -> str:
        if value is None:
            return "-"
        return value if isinstance(value, str) else _duration(value)
