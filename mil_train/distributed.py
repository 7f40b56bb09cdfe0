"""Data-parallel training over processes: torch DDP, gloo on CPU and NCCL on CUDA.

Run `mil-train` under torchrun, or let `mil-train --nproc N` start N processes on this machine with the
same environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR=127.0.0.1, MASTER_PORT):

    torchrun --nproc-per-node 2 -m mil_train.cli ABMIL bags/ -o model.pt
    mil-train ABMIL bags/ -o model.pt --nproc 2              # the same, on one machine

What a distributed run does:
  - every rank loads the same data and makes the same split; each then trains on its share of the
    training bags (`balanced_shards`: balanced by bag size, i.e. instances, not by bag count) and
    evaluates its share of the validation bags;
  - the model is wrapped in DistributedDataParallel around `compute_loss`, so gradients are averaged
    over the ranks at each step (the effective batch is batch_size x world size; the learning rate is
    not rescaled);
  - ranks with fewer batches do not hang the others: the epoch runs inside
    `torch.distributed.algorithms.Join`; a rank that has run out shadows the others' gradient
    all-reduces with zeros (gradients stay divided by the world size), and at the end of the epoch
    the parameters and the optimizer state are taken from a rank that ran to the end, so every rank
    starts the next epoch identical;
  - the logged losses and metrics are reduced over the ranks (validation predictions are gathered,
    so AUROC is the AUROC of the whole validation set); only rank 0 writes the log and checkpoints;
  - rank r seeds its own random stream (seed + r: dropout, sampling); buffers a model updates in
    training (e.g. prototypes) follow rank 0's, which DDP broadcasts before each step;
  - models with parameters that some training steps leave out of the graph declare
    `ddp_find_unused_parameters = True` (mil_train.models.base); DDP's unused-parameter search is not
    switched on for the others.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Joinable, JoinHook

from mil_runtime.errors import DeviceError

# -- where this process stands --------------------------------------------------------------------


def env_world_size() -> int:
    """WORLD_SIZE as torchrun (or `launch_local`) set it; 1 outside a launch."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_rank() -> int:
    """RANK as torchrun set it; 0 outside a launch (so single-process code counts as rank 0)."""
    return int(os.environ.get("RANK", "0") or 0)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0, or a single process: the one that writes logs and checkpoints."""
    return rank() == 0


def init_from_env(device: str | torch.device = "cpu", *, timeout_s: float | None = None) -> torch.device:
    """Join the process group that torchrun's environment describes; returns this rank's device.

    Outside a launch (WORLD_SIZE unset or 1) nothing happens and `device` comes back as given.
    CUDA: NCCL, and a device without an index becomes `cuda:LOCAL_RANK` (one GPU per process);
    anything else: gloo. Raises DeviceError (one line) when this rank's GPU does not exist.
    """
    device = torch.device(device)
    n = env_world_size()
    if n <= 1:
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", str(env_rank())) or 0)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index >= count:
            raise DeviceError(
                f"--device {device}: rank {env_rank()} needs GPU {device.index}, but this machine has {count} "
                "CUDA device(s); start at most as many processes per machine as there are GPUs"
            )
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not is_initialized():
        kwargs: dict[str, Any] = {}
        if timeout_s is not None:
            kwargs["timeout"] = timedelta(seconds=timeout_s)
        dist.init_process_group(backend, **kwargs)
    return device


def shutdown() -> None:
    """Leave the process group (a no-op outside one)."""
    if is_initialized():
        dist.destroy_process_group()


# -- each rank's share ----------------------------------------------------------------------------


def balanced_shards(sizes: Sequence[int], n: int) -> list[list[int]]:
    """Split item indices into `n` shards of near-equal total size (longest-processing-time first).

    Items go, largest first, to the shard with the least total so far (ties: fewer items, then lower
    shard), so each shard's total is within the largest item of every other's. Deterministic: every
    rank computes the same split from the same sizes. Each shard lists its indices in ascending order.
    """
    if n < 1:
        raise ValueError(f"the number of shards must be >= 1, got {n}")
    loads, counts = [0] * n, [0] * n
    shards: list[list[int]] = [[] for _ in range(n)]
    for index in sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i)):
        target = min(range(n), key=lambda s: (loads[s], counts[s], s))
        shards[target].append(index)
        loads[target] += int(sizes[index])
        counts[target] += 1
    return [sorted(shard) for shard in shards]


def bag_size(bag: Any) -> int:
    """The number of instances of a bag (what the shards balance)."""
    return int(bag["X"].shape[0])


# -- the wrapped model ----------------------------------------------------------------------------


class LossForward(nn.Module):
    """`forward(batch) = model.compute_loss(batch)`, so DDP's hooks see the training step the Trainer
    runs (DDP only intercepts `forward`; the Trainer calls `compute_loss`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> Any:
        return self.model.compute_loss(batch)


def needs_unused_parameter_search(model: nn.Module) -> bool:
    """The model's own declaration (`ddp_find_unused_parameters`, False unless a model says so)."""
    return bool(getattr(model, "ddp_find_unused_parameters", False))


def wrap_model(model: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """DDP around `LossForward(model)`; parameters are broadcast from rank 0 here (a collective)."""
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        LossForward(model), device_ids=device_ids, find_unused_parameters=needs_unused_parameter_search(model)
    )


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


class OptimizerSync(Joinable):
    """Join partner of the optimizer: after an uneven epoch, every rank takes the optimizer state of a
    rank that ran to the end (DDP's own join hook does the same for the parameters). A rank that
    joined early skipped `optimizer.step()` for the steps it shadowed, so its Adam moments and step
    counts would otherwise drift from the others' and the parameters with them."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, process_group: Any) -> None:
        super().__init__()
        self.optimizer = optimizer
        self._device = device
        self._process_group = process_group

    def join_hook(self, **kwargs: Any) -> JoinHook:
        return _OptimizerSyncHook(self)

    @property
    def join_device(self) -> torch.device:
        return self._device

    @property
    def join_process_group(self) -> Any:
        return self._process_group


class _OptimizerSyncHook(JoinHook):
    def __init__(self, owner: OptimizerSync) -> None:
        self.owner = owner

    def post_hook(self, is_last_joiner: bool) -> None:
        group, device = self.owner.join_process_group, self.owner.join_device
        n, me = dist.get_world_size(group), dist.get_rank(group)
        last = torch.zeros(n, device=device)
        last[me] = float(is_last_joiner)
        dist.all_reduce(last, group=group)  # which ranks ran to the end
        finished = [r for r in range(n) if last[r].item() > 0]
        if len(finished) == n:  # nobody ran out early: the states never diverged
            return
        source = finished[0]
        payload = [_to_cpu(self.owner.optimizer.state_dict()) if me == source else None]
        dist.broadcast_object_list(payload, src=source, group=group, device=device)
        if me != source:
            self.owner.optimizer.load_state_dict(payload[0])  # casts the state to each parameter's device


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order ([value] outside a process group). Tensors travel on CPU."""
    if not is_initialized():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, _to_cpu(value))
    return gathered


def barrier() -> None:
    if is_initialized():
        dist.barrier()


# -- starting N processes on this machine ---------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env(rank_: int, nproc: int, port: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """What torchrun sets for worker `rank_` of `nproc` on one machine, talking over loopback."""
    env = dict(os.environ if base is None else base)
    env.update({
        "RANK": str(rank_), "LOCAL_RANK": str(rank_), "GROUP_RANK": "0", "ROLE_RANK": str(rank_),
        "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "ROLE_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    })
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: gloo's pairs over loopback, not the host name
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # as torchrun: no oversubscription
    return env


def launch_local(
    nproc: int, command: Sequence[str], *, env: Mapping[str, str] | None = None, grace_s: float = 20.0,
    timeout_s: float | None = None,
) -> int:
    """Run `command` as `nproc` processes on this machine with torchrun's worker environment.

    Returns 0 when every process exits 0. When one fails, the others get `grace_s` to end by
    themselves (a data error stops every rank at the same place, and rank 0 prints its line); those
    still running then (waiting in a collective for the failed rank) are terminated. The exit code is
    rank 0's when rank 0 failed, else the first failure's. After `timeout_s` (None: no limit) every
    process still running is terminated and the result is 124.
    """
    port = free_port()
    base = {**os.environ, **(env or {})}
    procs = [subprocess.Popen(list(command), env=worker_env(r, nproc, port, base)) for r in range(nproc)]
    first_failure: int | None = None
    start = time.monotonic()
    try:
        while True:
            codes = [p.poll() for p in procs]
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                _stop(procs)
                return 124
            if all(c == 0 for c in codes):
                return 0
            failed = [c for c in codes if c not in (None, 0)]
            if failed and first_failure is None:
                first_failure, since = failed[0], time.monotonic()
            if first_failure is not None and (None not in codes or time.monotonic() - since > grace_s):
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop(procs)
        return 130
    _stop(procs)  # those still waiting for the failed rank
    own = codes[0] if codes[0] not in (None, 0) else first_failure  # rank 0's own failure, else the first
    return own if own > 0 else 128 - own  # killed by signal S: 128 + S, as a shell reports it


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
