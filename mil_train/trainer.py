"""`Trainer`: fits any registered MIL model on collated bag batches.

The loss is the weighted sum of the terms `model.compute_loss(batch)` returns (weight 1 for a term
not named in `loss_weights`; a name the model does not return stops `fit` after the first batch).
After each epoch the Trainer evaluates the validation loader, logs one CSV row, keeps the best weights
by the monitored quantity (saving them as a checkpoint when asked), stops early after `patience`
epochs without improvement, and finally restores the best weights.

    trainer = Trainer(model, lr=5e-4, epochs=50, patience=10, monitor="val_auroc")
    history = trainer.fit(make_loader(train_bags, batch_size=1, shuffle=True), make_loader(val_bags))
    print(trainer.evaluate(make_loader(test_bags)))

Training conveniences (each off by default): `loss_weights` values may be schedules over optimizer
steps (mil_train.schedules, as torchmil's annealing_scheduler_dict); `class_weights` weighs each
bag's classification loss by its class (mil_train.sampling, which also has a balanced sampler to
pass to make_loader); `logger` takes any object with `.log(dict, step)`, or a list of them
(mil_train.loggers: CSV, TensorBoard); `last_checkpoint_path` keeps the state after each epoch, and
`fit(..., resume=True)` continues an interrupted run from it, bit for bit.

`precision="bf16"` runs the forward and the loss under bfloat16 autocast (CPU or CUDA; "fp16" on CUDA,
with a GradScaler); parameters, gradients, the loss and the checkpoint stay float32.

Under torchrun (a process group set up by `mil_train.distributed.init_from_env`), the Trainer trains
data-parallel: give each rank a loader over its own share of the bags
(`mil_train.distributed.balanced_shards`); see mil_train/distributed.py for what the run does.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mil_train import distributed as dist_utils
from mil_train.checkpoint import load_checkpoint_payload, save_checkpoint
from mil_train.loggers import log_all, write_rows_csv
from mil_train.metrics import LOWER_IS_BETTER, METRIC_NAMES, REGRESSION_METRIC_NAMES, SURVIVAL_METRIC_NAMES
from mil_train.models.base import MILModel
from mil_train.sampling import class_weighted
from mil_train.schedules import LossWeightSchedule, weight_at

OptimizerArg = torch.optim.Optimizer | Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer] | None
SchedulerArg = Any  # an LR scheduler instance, or a callable optimizer -> scheduler


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch so model init, dropout and shuffling repeat run to run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_loader(
    bags: Sequence[Any],
    batch_size: int = 1,
    shuffle: bool = False,
    seed: int = 0,
    collate_fn: Callable | None = None,
    **kwargs: Any,
) -> DataLoader:
    """A DataLoader over bags with `mil_train.data.collate` and its own seeded shuffling generator.

    The generator makes the shuffle order a function of `seed` alone, independent of how much of
    the global RNG model init or dropout consumed.
    """
    if collate_fn is None:
        from mil_train.data.collate import collate as collate_fn
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(bags, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn, generator=generator, **kwargs)


class UnknownLossTermError(ValueError):
    """`loss_weights` names a term that the model's `compute_loss` does not return (a typo would
    otherwise be ignored silently and train with the default weights)."""

    def __init__(self, unknown: list[str], terms: list[str], model_name: str) -> None:
        self.unknown, self.terms, self.model_name = unknown, terms, model_name
        super().__init__(
            f"loss_weights names {', '.join(map(repr, unknown))}, but {model_name}'s compute_loss returns "
            f"the terms {', '.join(map(repr, terms))}; weigh those names"
        )


class ResumeError(ValueError):
    """The last checkpoint cannot continue this run (another model, seed or loader, or no training state)."""


# Per-epoch sums of the loss terms: float64 where the device has it.
_SUM_DTYPE = {"mps": torch.float32}


def _reduce_sums(
    sums: dict[str, float], n_bags: int, parts: list[tuple[dict[str, float], int]] | None = None
) -> tuple[dict[str, float], int]:
    """Sum per-term totals and bag counts over the ranks (a rank without bags adds nothing)."""
    if parts is None:
        parts = dist_utils.all_gather_objects((sums, n_bags))
    totals: dict[str, float] = {}
    for part_sums, _ in parts:
        for name, value in part_sums.items():
            totals[name] = totals.get(name, 0.0) + value
    return totals, sum(n for _, n in parts)


def _monitor_mode(monitor: str, mode: str | None) -> str:
    if mode is not None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        return mode
    return "min" if monitor.endswith(("loss", *LOWER_IS_BETTER)) else "max"


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    """Trains a `MILModel`; see the module docstring.

    Args:
        model: any registered MIL model.
        lr, weight_decay: for the default optimizer, Adam.
        optimizer: an optimizer instance over `model`'s parameters, or a callable params -> optimizer.
        scheduler: an LR scheduler instance or a callable optimizer -> scheduler; stepped once per
            epoch (ReduceLROnPlateau with the monitored value).
        loss_weights: weight per loss-term name, a number or a `mil_train.schedules.LossWeightSchedule`
            over optimizer steps (each epoch's row then logs the weight at its end as weight_<name>);
            terms not listed weigh 1. A name that the model's `compute_loss` does not return raises
            UnknownLossTermError after the first training batch.
        class_weights: one weight per class (mil_train.sampling.auto_class_weights): in training, each
            bag's classification loss is multiplied by its class's weight; None (default) weighs all 1.
        logger: an object with `.log(metrics: dict, step: int)`, or a list of them (mil_train.loggers):
            each gets every epoch's row with step = the epoch.
        last_checkpoint_path: where the state after each epoch is saved (the last weights, optimizer,
            LR scheduler, RNG and shuffling state, history, best weights): `fit(..., resume=True)`
            continues from it. Single-process runs only.
        epochs: maximum number of epochs.
        patience: stop after this many epochs without improvement of `monitor`; None never stops early.
        monitor: "val_loss" or "val_<metric>" (auroc, accuracy, balanced_accuracy, f1; "auroc" alone
            means "val_auroc"). Without a validation loader the Trainer monitors "train_loss".
        mode: "min" or "max"; default "min" for losses, "max" for metrics.
        device: torch device the model and batches move to.
        seed: seeds Python/numpy/torch at the start of `fit` (dropout, sampling); distributed, rank r
            uses seed + r.
        progress: tqdm bar over epochs on stderr.
        log_csv: path of a CSV log, one row per epoch, rewritten atomically each epoch.
        checkpoint_path: where the best model is saved (mil_train.checkpoint format).
        class_names, provenance: stored in the checkpoint.
        feature_stats: the training features' statistics (mil_train.feature_stats.compute_feature_stats),
            stored in the checkpoint; mil-export puts them in the model for the out-of-domain check.
        grad_clip: max gradient norm, or None.
        precision: "fp32" (default), "bf16" (autocast to bfloat16 on the CPU or a CUDA device: the matrix
            products run in bf16, the parameters, their gradients and the loss stay float32; fast on CPUs
            with AVX512_BF16 or AMX, slow on others) or "fp16" (CUDA only, autocast with a GradScaler).
        distributed: train data-parallel over the initialised process group (DDP, `Join` for uneven
            shares, metrics reduced over ranks, only rank 0 writes the log and checkpoints); None
            (default) does so whenever a process group of more than one rank is initialised.
            Each rank's loaders hold that rank's share of the bags.
    """

    def __init__(
        self,
        model: MILModel,
        *,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        optimizer: OptimizerArg = None,
        scheduler: SchedulerArg = None,
        loss_weights: dict[str, float] | None = None,
        epochs: int = 100,
        patience: int | None = None,
        monitor: str = "val_loss",
        mode: str | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        progress: bool = True,
        log_csv: str | os.PathLike | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        class_names: list[str] | None = None,
        provenance: dict[str, Any] | None = None,
        grad_clip: float | None = None,
        feature_stats: dict[str, Any] | None = None,
        distributed: bool | None = None,
        precision: str = "fp32",
        class_weights: Sequence[float] | None = None,
        logger: Any = None,
        last_checkpoint_path: str | os.PathLike | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision == "fp16" and torch.device(device).type != "cuda":
            raise ValueError("precision='fp16' needs a CUDA device; on the CPU use 'bf16'")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {patience}")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        if distributed is None:
            distributed = dist_utils.world_size() > 1
        if distributed and not dist_utils.is_initialized():
            raise ValueError("distributed=True needs a process group; call mil_train.distributed.init_from_env() "
                             "in each process (under torchrun or mil-train --nproc)")
        self.distributed = bool(distributed)
        if self.distributed and last_checkpoint_path is not None:
            raise ValueError("last_checkpoint_path (resuming) is for single-process runs; leave it out under a process group")
        self.is_main = dist_utils.is_main()
        # DDP around compute_loss; its constructor broadcasts rank 0's parameters, so all ranks start equal.
        self._ddp = dist_utils.wrap_model(self.model, self.device) if self.distributed else None
        self.optimizer = self._build_optimizer(optimizer, lr, weight_decay)
        self.scheduler = self._build_scheduler(scheduler)
        self.loss_weights = dict(loss_weights or {})
        self.epochs = epochs
        self.patience = patience
        self.monitor = self._normalise_monitor(monitor)
        self.mode = _monitor_mode(self.monitor, mode)
        self.seed = seed
        self.progress = progress
        self.log_csv = Path(log_csv) if log_csv is not None else None
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.class_names = class_names
        self.provenance = dict(provenance or {})
        self.feature_stats = feature_stats
        self.grad_clip = grad_clip
        self.precision = precision
        # fp16's narrow range needs the loss scaled; bf16 has float32's range and needs none
        self._scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        self.loggers = [] if logger is None else list(logger) if isinstance(logger, (list, tuple)) else [logger]
        self.last_checkpoint_path = Path(last_checkpoint_path) if last_checkpoint_path is not None else None
        self.history: list[dict[str, float]] = []
        self.best_epoch: int | None = None
        self.best_value: float | None = None
        self.global_step = 0  # optimizer steps taken: the clock of the loss-weight schedules

    # -- set-up -----------------------------------------------------------------------------------

    def _build_optimizer(self, optimizer: OptimizerArg, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        if optimizer is None:
            return torch.optim.Adam(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        if isinstance(optimizer, torch.optim.Optimizer):
            return optimizer
        return optimizer(self.model.parameters())

    def _build_scheduler(self, scheduler: SchedulerArg) -> Any:
        if scheduler is None or isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
            return scheduler
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            return scheduler
        return scheduler(self.optimizer)

    @staticmethod
    def _normalise_monitor(monitor: str) -> str:
        task_metrics = (*METRIC_NAMES, *REGRESSION_METRIC_NAMES, *SURVIVAL_METRIC_NAMES)
        if monitor in task_metrics:
            monitor = f"val_{monitor}"
        allowed = {"val_loss", "train_loss", *(f"val_{m}" for m in task_metrics)}
        if monitor not in allowed and not monitor.startswith(("val_", "train_")):
            raise ValueError(f"monitor must be one of {sorted(allowed)} (or a val_/train_ loss term), got {monitor!r}")
        return monitor

    # -- one step, one pass -----------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        """The forward and the loss under the chosen precision (backward and the step run outside)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self._scaler is None:
            loss.backward()
        else:
            self._scaler.scale(loss).backward()
            self._scaler.unscale_(self.optimizer)  # grad_clip sees the true gradients
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self._scaler is None:
            self.optimizer.step()
        else:
            self._scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
            self._scaler.update()

    def _to_device(self, batch: Any) -> Any:
        return batch.to(self.device) if hasattr(batch, "to") else batch

    def _check_weight_names(self, terms: dict[str, torch.Tensor]) -> None:
        unknown = sorted(set(self.loss_weights) - set(terms))
        if unknown:
            raise UnknownLossTermError(unknown, list(terms), self.model.name or type(self.model).__name__)

    def _weighted_loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(weight_at(self.loss_weights.get(name, 1.0), self.global_step) * value for name, value in terms.items())

    def _scheduled_weights(self) -> dict[str, float]:
        """weight_<name> of each scheduled term at the current step, for the epoch's row."""
        return {f"weight_{name}": weight_at(weight, self.global_step)
                for name, weight in self.loss_weights.items() if isinstance(weight, LossWeightSchedule)}

    def _join(self) -> contextlib.AbstractContextManager:
        """Uneven shares: ranks that run out shadow the others' all-reduces (see mil_train.distributed)."""
        if self._ddp is None:
            return contextlib.nullcontext()
        from torch.distributed.algorithms.join import Join

        sync = dist_utils.OptimizerSync(self.optimizer, self._ddp.device, self._ddp.process_group)
        return Join([self._ddp, sync])

    def _train_epoch(self, loader: DataLoader, check_weight_names: bool = False) -> dict[str, float]:
        self.model.train()
        step = self._ddp if self._ddp is not None else self.model.compute_loss
        sums: dict[str, torch.Tensor] = {}  # on the device: no host sync per step for the bookkeeping
        n_bags = 0
        with self._join(), class_weighted(self.model, self.class_weights):
            for batch in loader:
                batch = self._to_device(batch)
                with self._autocast():
                    _, terms = step(batch)
                terms = {name: value.float() for name, value in terms.items()}
                if check_weight_names and n_bags == 0:  # the first batch shows which terms the model returns
                    self._check_weight_names(terms)
                loss = self._weighted_loss(terms)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training loss became {loss.item()}; lower the learning rate or set grad_clip"
                    )
                self._backward_and_step(loss)
                self.global_step += 1
                size = int(batch["X"].shape[0])
                n_bags += size
                for name, value in {"loss": loss, **terms}.items():
                    weighted = value.detach().to(_SUM_DTYPE.get(self.device.type, torch.float64)) * size
                    sums[name] = weighted if name not in sums else sums[name] + weighted
        totals = {name: float(total) for name, total in sums.items()}
        if self.distributed:
            totals, n_bags = _reduce_sums(totals, n_bags)
        if n_bags == 0:
            raise ValueError("the training loader yielded no bags")
        return {name: total / n_bags for name, total in totals.items()}

    @torch.no_grad()
    def _eval_pass(self, loader: DataLoader, keep_attention: bool = False) -> dict[str, Any]:
        """Logits, labels, mean loss terms (and per-bag attention) over a loader, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        logits, labels, attention = [], [], []
        sums: dict[str, float] = {}
        n_bags = 0
        try:
            for batch in loader:
                batch = self._to_device(batch)
                if keep_attention:
                    out = self.model(
                        batch["X"],
                        batch.get("mask", None),
                        edge_index=batch.get("edge_index", None),
                        edge_weight=batch.get("edge_weight", None),
                        coords=batch.get("coords", None),
                    )
                    mask = batch.get("mask", None)
                    for i in range(out.attention.shape[0]):
                        row = out.attention[i]  # (bag,)
                        attention.append((row[mask[i]] if mask is not None else row).cpu())
                with self._autocast():
                    batch_logits, terms = self.model.compute_loss(batch)
                batch_logits = batch_logits.float()
                terms = {name: value.float() for name, value in terms.items()}
                size = int(batch_logits.shape[0])
                n_bags += size
                for name, value in {"loss": self._weighted_loss(terms), **terms}.items():
                    sums[name] = sums.get(name, 0.0) + float(value) * size
                logits.append(batch_logits.cpu())
                labels.append(batch["Y"].reshape(size, -1).cpu())
        finally:
            self.model.train(was_training)
        if self.distributed:  # every rank's share, in rank order
            parts = dist_utils.all_gather_objects((logits, labels, attention, sums, n_bags))
            logits = [t for part in parts for t in part[0]]
            labels = [t for part in parts for t in part[1]]
            attention = [t for part in parts for t in part[2]]
            sums, n_bags = _reduce_sums(sums, n_bags, parts=[(part[3], part[4]) for part in parts])
        if n_bags == 0:
            raise ValueError("the evaluation loader yielded no bags")
        result = {
            "logits": torch.cat(logits),  # (n_bags, n_classes)
            "Y": torch.cat(labels).squeeze(-1),  # (n_bags,)
            "losses": {name: total / n_bags for name, total in sums.items()},
        }
        if keep_attention:
            result["attention"] = attention
        return result

    # -- public API -------------------------------------------------------------------------------

    def evaluate(self, loader: DataLoader) -> dict[str, float]:
        """Mean loss, each loss term, and the task's metrics over `loader` (eval mode, no grad):
        classification AUROC, accuracy, balanced accuracy, F1; regression MAE, RMSE, R²; survival the
        c-index. Distributed: over every rank's loader together (the same numbers on every rank)."""
        result = self._eval_pass(loader)
        return {**result["losses"], **self.model.task.metrics(result["logits"], result["Y"])}

    def predict(self, loader: DataLoader) -> dict[str, Any]:
        """Per-bag outputs in loader order (distributed: every rank's loader, in rank order).

        Returns {"logits": (n_bags, n_classes), "probabilities": (n_bags, n_classes), "Y": (n_bags,),
        "attention": list of (N_i,) tensors, padding removed}; regression and survival models give
        their task's outputs instead of "probabilities" ("values"; "risk", "hazards", "survival"), and
        Y is (n_bags, 2) (time, event) for survival.
        """
        result = self._eval_pass(loader, keep_attention=True)
        return {
            "logits": result["logits"],
            **self.model.task.outputs(result["logits"]),
            "Y": result["Y"],
            "attention": result["attention"],
        }

    def fit(
        self, train_loader: DataLoader, val_loader: DataLoader | None = None, resume: bool = False
    ) -> list[dict[str, float]]:
        """Train; returns the history (one dict per epoch) and leaves the best weights in the model.

        resume=True continues from `last_checkpoint_path` when that file exists (else starts afresh):
        the epochs after the saved one run as they would have without the interruption, given the same
        loaders, settings and seed; a run that had finished (its last epoch, or early stopping) only
        restores its best weights. Raising `epochs` extends a run that finished by reaching them.
        """
        monitor = self.monitor if val_loader is not None else "train_loss"
        mode = self.mode if val_loader is not None else "min"
        # Distributed: each rank its own stream (dropout, sampling), as each bag gets fresh noise in one process.
        seed_everything(self.seed + (dist_utils.rank() if self.distributed else 0))
        self.history, self.best_epoch, self.best_value, self.global_step = [], None, None, 0
        best_state, first_epoch, stopped_early = None, 1, False
        if resume and self.last_checkpoint_path is not None and self.last_checkpoint_path.exists():
            best_state, first_epoch, stopped_early = self._restore(train_loader)
        epochs = range(first_epoch, self.epochs + 1) if not stopped_early else range(0)
        bar = tqdm(epochs, desc="epochs", file=sys.stderr, disable=not (self.progress and self.is_main), leave=False)
        for epoch in bar:
            row: dict[str, float] = {"epoch": epoch}
            row.update({f"train_{k}": v for k, v in self._train_epoch(train_loader, epoch == 1).items()})
            if val_loader is not None:
                row.update({f"val_{k}": v for k, v in self.evaluate(val_loader).items()})
            row["lr"] = self.optimizer.param_groups[0]["lr"]
            row.update(self._scheduled_weights())
            if monitor not in row:
                raise ValueError(f"monitor {monitor!r} is not among the logged values {sorted(row)}")
            self.history.append(row)
            self._write_log()
            value = row[monitor]
            self._step_scheduler(value)
            if self._improved(value, mode):
                self.best_epoch, self.best_value = epoch, value
                best_state = copy.deepcopy(self.model.state_dict())
                self._save_best(epoch, monitor)
            bar.set_postfix({monitor: f"{value:.4f}", "best": self.best_epoch})
            stopped_early = self.patience is not None and epoch - (self.best_epoch or 0) >= self.patience
            if self.is_main:
                log_all(self.loggers, row, epoch)
            self._save_last(best_state, train_loader, stopped_early)  # last: a logger that fails redoes the epoch
            if stopped_early:
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        if self.distributed:
            dist_utils.barrier()  # rank 0's checkpoint and log are written when fit returns on any rank
        return self.history

    # -- resuming ---------------------------------------------------------------------------------

    def _save_last(self, best_state: dict | None, train_loader: DataLoader, stopped_early: bool) -> None:
        """The state after this epoch, everything `_restore` needs to go on as if never stopped."""
        if self.last_checkpoint_path is None:
            return
        state = {
            "epoch": len(self.history) and int(self.history[-1]["epoch"]),
            "global_step": self.global_step,
            "history": self.history,
            "best_epoch": self.best_epoch,
            "best_value": None if self.best_value is None else float(self.best_value),
            "best_state_dict": {k: v.detach().cpu() for k, v in (best_state or {}).items()},
            "stopped_early": stopped_early,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": None if self._scaler is None else self._scaler.state_dict(),
            "rng": _rng_state(),
            "loader_generators": [g.get_state() for g in _loader_generators(train_loader)],
        }
        provenance = {**self.provenance, "seed": self.seed, "epoch": state["epoch"], "torch_version": str(torch.__version__)}
        save_checkpoint(self.model, self.last_checkpoint_path, class_names=self.class_names, provenance=provenance,
                        feature_stats=self.feature_stats, training_state=state)

    def _restore(self, train_loader: DataLoader) -> tuple[dict | None, int, bool]:
        """Load `last_checkpoint_path`; returns (best weights, the next epoch, whether it stopped early)."""
        payload = load_checkpoint_payload(self.last_checkpoint_path)
        state = payload.get("training_state")
        if state is None:
            raise ResumeError(f"{self.last_checkpoint_path} holds no training state (a best-model checkpoint?); "
                             "resume from the last checkpoint the Trainer wrote")
        if payload["model_name"] != self.model.name or payload["config"] != dict(self.model.config):
            raise ResumeError(f"{self.last_checkpoint_path} is a run of {payload['model_name']} {payload['config']}, "
                             f"not of this model, {self.model.name} {dict(self.model.config)}")
        if payload["provenance"].get("seed") != self.seed:
            raise ResumeError(f"{self.last_checkpoint_path} ran with seed {payload['provenance'].get('seed')}, "
                             f"this run has seed {self.seed}; resume with the same seed")
        self.model.load_state_dict(payload["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self._scaler is not None and state["scaler"] is not None:
            self._scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        generators = _loader_generators(train_loader)
        if len(generators) != len(state["loader_generators"]):
            raise ResumeError("the training loader's shuffling differs from the interrupted run's (shuffle or sampler)")
        for generator, saved in zip(generators, state["loader_generators"]):
            generator.set_state(saved)
        self.history = [dict(row) for row in state["history"]]
        self.best_epoch, self.best_value, self.global_step = state["best_epoch"], state["best_value"], state["global_step"]
        best_state = state["best_state_dict"] or None
        return best_state, int(state["epoch"]) + 1, bool(state["stopped_early"])

    # -- bookkeeping ------------------------------------------------------------------------------

    def _improved(self, value: float, mode: str) -> bool:
        if self.best_value is None:  # the first epoch is always a candidate, even with a NaN metric
            return True
        if math.isnan(value):
            return False
        if math.isnan(self.best_value):
            return True
        return value < self.best_value if mode == "min" else value > self.best_value

    def _step_scheduler(self, value: float) -> None:
        if self.scheduler is None:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(value)
        else:
            self.scheduler.step()

    def _save_best(self, epoch: int, monitor: str) -> None:
        if self.checkpoint_path is None or not self.is_main:
            return
        provenance = {
            **self.provenance,
            "epoch": epoch,
            "monitor": monitor,
            "monitor_value": float(self.best_value),
            "seed": self.seed,
            "metrics": {k: float(v) for k, v in self.history[-1].items()},
            "torch_version": str(torch.__version__),
        }
        if self.distributed:
            provenance["world_size"] = dist_utils.world_size()
        save_checkpoint(self.model, self.checkpoint_path, class_names=self.class_names, provenance=provenance,
                        feature_stats=self.feature_stats)

    def _write_log(self) -> None:
        """Rewrite the whole CSV each epoch via a temp file, so a crash never leaves a torn row."""
        if self.log_csv is None or not self.is_main:
            return
        write_rows_csv(self.log_csv, self.history)


def _loader_generators(loader: DataLoader) -> list[torch.Generator]:
    """The generators that drive a loader's order (its own, its sampler's), each once."""
    found: list[torch.Generator] = []
    for candidate in (getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)):
        if isinstance(candidate, torch.Generator) and all(candidate is not g for g in found):
            found.append(candidate)
    return found


def _rng_state() -> dict[str, Any]:
    """Python's, numpy's and torch's global RNG states as tensors, lists and numbers (weights_only-loadable)."""
    version, words, gauss = random.getstate()
    _, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "words": list(words), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    python, numpy_state = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["words"]), python["gauss"]))
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
