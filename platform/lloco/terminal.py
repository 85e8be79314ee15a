"""What a command shows in the user's terminal: its own lines, progress bars, and nothing of Ray's unless asked.

Ray writes a lot by default: its loggers (Serve, Ray Data's periodic progress log, Train), the raylet's warnings
and every worker's stdout and stderr forwarded to the driver. A command that starts or joins Ray calls
`quiet_ray` once, before Ray starts: unless ``--verbose``, all of that goes to one log file under the data dir
(named once on stderr) and lloco's own structured logs show warnings and errors only. Long jobs draw `progress`
bars on stderr, and only when it is a terminal, so pipes and CI logs stay clean.

Library use (tests, `ray job submit` entry points called from code) keeps Ray's defaults until `quiet_ray`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

RAY_LOG = Path("logs") / "ray.log"  # under the data dir
VERBOSE_HELP = "Show Ray's own logs and lloco's info logs here (else Ray's go to DATA_DIR/logs/ray.log)."

_ray_to_terminal = True


def quiet_logs(verbose: bool = False) -> None:
    """lloco's structured logs at info level when ``verbose``, else warnings and errors (LLOCO_LOG_LEVEL wins)."""
    logging.getLogger("lloco").setLevel(
        os.environ.get("LLOCO_LOG_LEVEL", "INFO" if verbose else "WARNING").upper()
    )


def quiet_ray(data_dir: Path, verbose: bool = False) -> Path | None:
    """Send Ray's output to ``data_dir/logs/ray.log`` (returned) unless ``verbose``; lloco logs warnings only.

    Call before Ray starts. Ray, Ray Data and Serve set up their loggers when first imported, so they are
    imported here and their handlers replaced; workers' output stays out of this process by `ray_log_to_driver`.
    """
    global _ray_to_terminal
    import ray  # noqa: F401 - each import installs its console handlers, replaced below
    import ray.data
    import ray.serve  # noqa: F401

    quiet_logs(verbose)
    _ray_to_terminal = verbose
    if verbose:
        return None
    log_file = Path(data_dir).expanduser() / RAY_LOG
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setLevel(logging.INFO)  # Ray Data logs every scheduling loop at DEBUG
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d %(message)s")
    )
    # Ray's loggers hand their records up to the root logger, which writes the file. Handlers on "ray" itself
    # would not last: ray.init(configure_logging=False) clears them. Other libraries' warnings land there too.
    logging.getLogger().addHandler(handler)
    ray_loggers = [name for name in logging.root.manager.loggerDict if name.startswith("ray.")]
    for name in ["ray", *ray_loggers]:
        logger = logging.getLogger(name)
        if name == "ray" or logger.handlers:
            for old in logger.handlers:
                old.close()
            logger.handlers = []
            logger.propagate = True
    _route_cluster_messages(handler)
    _native_stderr_to(log_file)
    # Ray Data's own progress bars (tqdm) draw on stderr when it is a terminal; ours replace them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"Ray's logs: {log_file} (--verbose shows them here)", file=sys.stderr)
    return log_file


def _route_cluster_messages(handler: logging.Handler) -> None:
    """The raylet's warnings to the driver ("(raylet) WARNING: N worker processes have been started ...") are
    printed by a thread of Ray's driver whatever `log_to_driver` says, through ``print_to_stdstream`` of
    ``ray._private.worker``, its one writer, looked up at each call: it is replaced by one writing to ``handler``.
    """
    from ray._private import worker

    def to_log(data: dict, ignore_prefix: bool) -> None:
        for line in data.get("lines", []):
            handler.handle(logging.makeLogRecord({"name": f"ray.{data.get('pid', 'cluster')}", "msg": line}))

    worker.print_to_stdstream = to_log


def _native_stderr_to(log_file: Path) -> None:
    """Ray's C++ core writes its warnings and errors to file descriptor 2 directly, past Python's logging: point
    descriptor 2 at the log file (processes started from here, such as the raylet, inherit it) and keep Python's
    ``sys.stderr``, which our messages and bars use, on the terminal. Only for a process whose ``sys.stderr`` is
    descriptor 2 (not under a test runner that captures it)."""
    try:
        if sys.stderr.fileno() != 2:
            return
    except (AttributeError, OSError, ValueError):
        return
    sys.stderr.flush()
    encoding = sys.stderr.encoding
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding=encoding, errors="backslashreplace")
    descriptor = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(descriptor, 2)
    os.close(descriptor)


def ray_log_to_driver() -> bool:
    """`ray.init(log_to_driver=...)`: whether workers' stdout and stderr reach this terminal."""
    return _ray_to_terminal


def progress(transient: bool = False) -> Progress:
    """Progress bars on stderr (use as a context manager); drawing nothing when stderr is not a terminal.

    Each task takes a ``detail`` field shown after its bar (``add_task(name, total=n, detail="")``); a task
    with ``total=None`` shows a spinner only.
    """
    console = Console(stderr=True)
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
        console=console,
        transient=transient,
        disable=not console.is_terminal,
    )


def finetune_bars(bars: Progress, tenants: list[str]) -> Callable[[str, dict[str, Any]], None]:
    """One bar per tenant of a finetune job; the returned function is the job's ``on_step``."""
    tasks = {tenant: bars.add_task(f"finetune {tenant}", total=None, detail="") for tenant in tenants}

    def on_step(tenant: str, metrics: dict[str, Any]) -> None:
        detail = f"epoch {metrics['epoch']:.2f}  loss {metrics['loss']:.3f}"
        bars.update(tasks[tenant], total=metrics["total_steps"], completed=metrics["step"], detail=detail)

    return on_step
