"""Training loggers: where the Trainer sends each epoch's row.

A logger is any object with a `.log(metrics: dict, step: int)` method, the hook torchmil's Trainer
takes (a Weights & Biases run is one: `Trainer(model, logger=wandb.init(...))`). The Trainer calls it
once per epoch with the epoch's row (train_*/val_* losses and metrics, lr, scheduled weights) and
step = the epoch number. Two are built in:

- `CSVLogger(path)`: one row per call; the whole file is rewritten through a temp file each time, so
  a crash never leaves a torn row and a column that appears later (a new loss term) gets a header.
- `TensorBoardLogger(log_dir)`: one scalar per key, through `torch.utils.tensorboard`, which needs the
  `tensorboard` package (`pip install tensorboard`); without it the constructor says so.

`mil-train --log-dir DIR` writes DIR/metrics.csv and, when tensorboard is importable, DIR's event files.
"""

from __future__ import annotations

import csv
import numbers
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol


class Logger(Protocol):
    def log(self, metrics: Mapping[str, Any], step: int) -> None: ...


def write_rows_csv(path: Path, rows: list[Mapping[str, Any]]) -> None:
    """All rows as one CSV, written atomically (mil_runtime.atomic); the header is every key in order of
    first appearance, so a column that appears later (a new loss term) is blank in earlier rows."""
    from mil_runtime.atomic import atomic_write

    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_write(path, "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


class CSVLogger:
    """One CSV row per `log` call (a `step` column first), rewritten atomically each time.

    A file already at `path` keeps the rows of the steps before the first one logged here, so a
    resumed run (whose first step is the interrupted run's next) continues its log, while a fresh run
    (step 1) starts the file anew.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] | None = None  # read on the first `log`, when its step is known

    def _earlier_rows(self, step: int) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        return [row for row in rows if (row.get("step") or "").isdigit() and int(row["step"]) < step]

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self.rows is None:
            self.rows = self._earlier_rows(step)
        self.rows.append({"step": step, **metrics})
        write_rows_csv(self.path, self.rows)

    def close(self) -> None:
        pass


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class TensorBoardLogger:
    """Each numeric value of a row as a TensorBoard scalar under its key, at `step`."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        if not tensorboard_available():
            raise ImportError("TensorBoardLogger needs the tensorboard package: pip install tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.writer.add_scalar(key, float(value), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def log_all(loggers: Iterable[Any], metrics: Mapping[str, Any], step: int) -> None:
    """Send one row to every logger (each gets its own copy, so none can change what the others see)."""
    for logger in loggers:
        logger.log(dict(metrics), step)
