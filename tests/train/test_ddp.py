"""Data-parallel training over 2 CPU processes (gloo on loopback: MASTER_ADDR=127.0.0.1, GLOO_SOCKET_IFNAME=lo).

One launch of this file as a script, by `mil_train.distributed.launch_local` (what `mil-train --nproc`
runs), puts 2 processes in one process group; each runs the scenarios below and saves what it saw.
The tests compare that with single-process truth computed here: the same bags' gradients accumulated
in one process (SGD), the whole validation set scored in one process, the checkpoint loaded and
exported in one process. Each scenario catches its own exception, so one failure leaves the others'
results (a failure that hangs a collective stops at the group's 120 s timeout).
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from mil_train import distributed
from mil_train.data.bag import make_bag
from mil_train.data.collate import collate
from mil_train.models.base import MILModel, MILOutput, masked_softmax
from mil_train.trainer import Trainer, make_loader

IN_DIM = 6
SGD_LR = 0.05
SGD_TRAIN_SIZES = (3, 17, 5, 11, 8, 2, 13, 6)
SGD_SHARES = ([0, 2, 4, 6], [1, 3, 5, 7])  # 4 steps each, bag t of rank r at step t
SGD_VAL_SIZES = (4, 9, 7, 5, 12)
UNEVEN_SIZES = (60, 20, 10, 10, 10, 10, 10, 10)  # balanced by size: rank 0 gets 2 bags, rank 1 gets 6
UNEVEN_LR, UNEVEN_EPOCHS = 1e-2, 3
BRANCHY_SIZES = (5, 8, 6, 9, 7, 4)
LAUNCH_TIMEOUT_S = 300


# -- bags and models shared by the workers and the tests -------------------------------------------


def make_bags(sizes, seed: int, n_classes: int = 2) -> list:
    """Bags whose label shifts the mean of the first features, so the task is learnable."""
    generator = torch.Generator().manual_seed(seed)
    bags = []
    for i, n in enumerate(sizes):
        label = i % n_classes
        X = torch.randn(n, IN_DIM, generator=generator)
        X[:, label % IN_DIM] += 1.5
        bags.append(make_bag(X=X, Y=torch.tensor(float(label) if n_classes == 2 else label)))
    return bags


def small_abmil(seed: int) -> MILModel:
    from mil_train.models import create_model

    torch.manual_seed(seed)
    return create_model("ABMIL", in_dim=IN_DIM, n_classes=1, att_dim=8)


class BranchyMIL(MILModel):
    """CLAM-like: one attention pool, and per class an instance classifier that only bags of that class
    train (CLAM's in-class branch without subtyping), so each step leaves the other classes' out of
    the graph. It declares so."""

    name = "BranchyMIL-test"
    ddp_find_unused_parameters = True

    def __init__(self, in_dim: int = IN_DIM, n_classes: int = 3) -> None:
        super().__init__(n_classes=n_classes, in_dim=in_dim)
        self.attention = nn.Linear(in_dim, 1)
        self.classifier = nn.Linear(in_dim, n_classes)
        self.branches = nn.ModuleList(nn.Linear(in_dim, 2) for _ in range(n_classes))

    def forward(self, X, mask=None, *, edge_index=None, edge_weight=None, coords=None) -> MILOutput:
        attention = masked_softmax(self.attention(X).squeeze(-1), mask)  # (batch, bag)
        pooled = torch.einsum("bn,bnd->bd", attention, X)  # (batch, dim)
        return MILOutput(logits=self.classifier(pooled), attention=attention)

    def compute_loss(self, batch):
        out = self(batch["X"], batch.get("mask", None))
        Y = batch["Y"].reshape(-1).long()
        instance = out.logits.new_zeros(())
        for b in range(Y.shape[0]):  # only the bag's own class branch runs, as in CLAM's loop over classes
            top = out.attention[b].argmax()
            logits = self.branches[int(Y[b])](batch["X"][b, top])  # (2,)
            instance = instance + nn.functional.cross_entropy(logits[None], torch.ones(1, dtype=torch.long))
        return out.logits, {"cls": self.classification_loss(out.logits, Y), "instance": instance / Y.shape[0]}


class UndeclaredBranchyMIL(BranchyMIL):
    name = "UndeclaredBranchyMIL-test"
    ddp_find_unused_parameters = False


def unused_in_a_step(model: MILModel, bags: list) -> set[str]:
    """Parameters that some one-bag training step leaves without a gradient (what DDP must search for)."""
    unused: set[str] = set()
    model.train()
    for bag in bags:
        model.zero_grad(set_to_none=True)
        _, terms = model.compute_loss(collate([bag]))
        sum(terms.values()).backward()
        unused |= {k for k, p in model.named_parameters() if p.requires_grad and p.grad is None}
    model.zero_grad(set_to_none=True)
    return unused


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}


def write_mil_csv(path: Path, n_bags: int = 16, seed: int = 5, positive=lambda bag: bag % 2 == 1) -> None:
    """A classic MIL csv (instance label, bag id, features): positive bags hold a few shifted instances."""
    rng = np.random.default_rng(seed)
    rows = []
    for bag in range(n_bags):
        n = int(rng.integers(4, 12))
        X = rng.normal(size=(n, IN_DIM))
        y = np.zeros(n)
        if positive(bag):
            y[: max(1, n // 3)] = 1
            X[y == 1, 0] += 3.0
        rows += [[y[i], bag, *X[i]] for i in range(n)]
    np.savetxt(path, np.asarray(rows), delimiter=",", fmt="%.6g")


def cli_args(out: Path) -> list[str]:
    return [
        "ABMIL", str(out / "bags.csv"), "-o", str(out / "cli.pt"), "--log", str(out / "cli_log.csv"),
        "--epochs", "3", "--lr", "0.01", "--val-fraction", "0.25", "--seed", "1", "--model-arg", "att_dim=8",
        "--nproc", "2",
    ]


# -- what each of the 2 processes runs -------------------------------------------------------------


def scenario_sgd(out: Path, rank: int) -> dict:
    train, val = make_bags(SGD_TRAIN_SIZES, seed=1), make_bags(SGD_VAL_SIZES, seed=2)
    model = small_abmil(seed=100 + rank)  # a different init per rank: DDP must start them from rank 0's
    val_share = distributed.balanced_shards([distributed.bag_size(b) for b in val], 2)[rank]
    trainer = Trainer(
        model, optimizer=lambda params: torch.optim.SGD(params, lr=SGD_LR), epochs=1, progress=False,
        log_csv=out / f"sgd_log_rank{rank}.csv", checkpoint_path=out / f"sgd_rank{rank}.pt",
    )
    history = trainer.fit(
        make_loader([train[i] for i in SGD_SHARES[rank]]), make_loader([val[i] for i in val_share])
    )
    return {"state": state_of(model), "history": history, "distributed": trainer.distributed}


def scenario_uneven(out: Path, rank: int) -> dict:
    bags = make_bags(UNEVEN_SIZES, seed=3)
    share = distributed.balanced_shards([distributed.bag_size(b) for b in bags], 2)[rank]
    model = small_abmil(seed=7)
    trainer = Trainer(model, lr=UNEVEN_LR, epochs=UNEVEN_EPOCHS, progress=False)  # Adam: its state must follow too
    history = trainer.fit(make_loader([bags[i] for i in share], shuffle=True, seed=rank))
    return {"state": state_of(model), "history": history, "n_local": len(share)}


def scenario_branchy(out: Path, rank: int) -> dict:
    bags = make_bags(BRANCHY_SIZES, seed=4, n_classes=3)
    share = [i for i in range(len(bags)) if i % 2 == rank]  # each rank sees every class
    torch.manual_seed(11)
    model = BranchyMIL()
    initial = state_of(model)
    trainer = Trainer(model, lr=2e-2, epochs=4, progress=False)
    history = trainer.fit(make_loader([bags[i] for i in share]))
    return {"initial": initial, "state": state_of(model), "history": history}


def scenario_cli(out: Path, rank: int) -> dict:
    from mil_train.cli import main

    try:
        main(cli_args(out), standalone_mode=False)  # --nproc 2 inside a launch of 2: trains here
    except SystemExit as exc:  # an error line and its code
        raise RuntimeError(f"mil-train exited {exc.code}") from None
    return {"done": True}


def scenario_cli_one_val_bag(out: Path, rank: int) -> dict:
    """One validation bag for two ranks: rank 1's share is empty, and it must still take part."""
    from mil_train.cli import main

    args = cli_args(out)
    args[1] = str(out / "one_positive.csv")  # a class of one bag: split() cannot stratify, so 1 bag can be drawn
    args[args.index("--val-fraction") + 1] = "0.05"  # ceil(0.05 * 16) = 1
    args[args.index("-o") + 1] = str(out / "cli_one_val.pt")
    args[args.index("--log") + 1] = str(out / "cli_one_val_log.csv")
    args[args.index("--epochs") + 1] = "1"
    try:
        main(args, standalone_mode=False)
    except SystemExit as exc:
        raise RuntimeError(f"mil-train exited {exc.code}") from None
    return {"done": True}


def scenario_undeclared(out: Path, rank: int) -> dict:
    """Last: the same model without its declaration must fail the way DDP fails (proof it is needed)."""
    bags = make_bags(BRANCHY_SIZES, seed=4, n_classes=3)
    share = [i for i in range(len(bags)) if i % 2 == rank]
    torch.manual_seed(11)
    trainer = Trainer(UndeclaredBranchyMIL(), lr=2e-2, epochs=1, progress=False)
    try:
        trainer.fit(make_loader([bags[i] for i in share]))
    except RuntimeError as exc:
        return {"raised": str(exc)}
    return {"raised": None}


SCENARIOS = [
    ("sgd", scenario_sgd), ("uneven", scenario_uneven), ("branchy", scenario_branchy), ("cli", scenario_cli),
    ("cli_one_val", scenario_cli_one_val_bag), ("undeclared", scenario_undeclared),
]


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    distributed.init_from_env("cpu", timeout_s=120)
    rank = distributed.rank()
    results: dict = {"world_size": distributed.world_size()}
    for name, scenario in SCENARIOS:
        try:
            results[name] = scenario(out, rank)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    torch.save(results, out / f"results_rank{rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
    sys.exit(0)


# -- the launch ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Both ranks' results of one 2-process launch."""
    out = tmp_path_factory.mktemp("ddp")
    write_mil_csv(out / "bags.csv")
    write_mil_csv(out / "one_positive.csv", positive=lambda bag: bag == 3)
    env = {"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    code = distributed.launch_local(2, [sys.executable, __file__, str(out)], env=env, timeout_s=LAUNCH_TIMEOUT_S)
    assert code == 0, f"the 2-process launch ended with {code}"
    results = [torch.load(out / f"results_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in results] == [2, 2]
    return out, results


def scenario(ddp, name: str) -> list[dict]:
    _, results = ddp
    both = [r[name] for r in results]
    for rank, result in enumerate(both):
        assert "error" not in result, f"rank {rank}, scenario {name}:\n{result['error']}"
    return both


def assert_same_state(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), f"{key} differs"
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=f"{key} differs")


# -- single-process truth --------------------------------------------------------------------------


def sgd_reference():
    """One process, step t: the gradients of bag t of each rank, summed over ranks and divided by 2
    (DDP's average), then one SGD step; the losses are those each bag had at its step."""
    train = make_bags(SGD_TRAIN_SIZES, seed=1)
    model = small_abmil(seed=100)  # rank 0's init
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR)
    losses = []
    model.train()
    for t in range(len(SGD_SHARES[0])):
        optimizer.zero_grad()
        for share in SGD_SHARES:
            _, terms = model.compute_loss(collate([train[share[t]]]))
            losses.append(float(terms["cls"].detach()))
            (terms["cls"] / len(SGD_SHARES)).backward()
        optimizer.step()
    return model, losses


def uneven_reference():
    """One process, Adam: at each step the gradients of the bags the ranks still have (a rank that ran
    out adds zeros; the sum is still divided by 2), in each rank's own shuffled order; the best epoch's
    weights by the training loss, as the Trainer keeps them. Returns (best state, train loss per epoch)."""
    bags = make_bags(UNEVEN_SIZES, seed=3)
    shares = distributed.balanced_shards([distributed.bag_size(b) for b in bags], 2)
    loaders = [make_loader([bags[i] for i in share], shuffle=True, seed=rank) for rank, share in enumerate(shares)]
    model = small_abmil(seed=7)
    optimizer = torch.optim.Adam(model.parameters(), lr=UNEVEN_LR)
    model.train()
    losses, best = [], None
    for _ in range(UNEVEN_EPOCHS):
        batches = [list(loader) for loader in loaders]
        epoch_losses = []
        for t in range(max(map(len, batches))):
            optimizer.zero_grad()
            for rank_batches in batches:
                if t < len(rank_batches):
                    _, terms = model.compute_loss(rank_batches[t])
                    epoch_losses.append(float(terms["cls"].detach()))
                    (terms["cls"] / 2).backward()
            optimizer.step()
        losses.append(float(np.mean(epoch_losses)))
        if best is None or losses[-1] < best[0]:
            best = (losses[-1], state_of(model))
    return best[1], losses


def test_parameters_are_identical_on_both_ranks_after_k_steps(ddp):
    rank0, rank1 = scenario(ddp, "sgd")
    assert rank0["distributed"] and rank1["distributed"]
    assert_same_state(rank0["state"], rank1["state"])  # bit for bit


def test_sgd_equals_one_process_accumulating_the_same_bags(ddp):
    rank0, _ = scenario(ddp, "sgd")
    model, losses = sgd_reference()
    assert_same_state(rank0["state"], state_of(model), atol=1e-6)
    assert not torch.allclose(rank0["state"]["classifier.weight"], state_of(small_abmil(seed=100))["classifier.weight"])
    # the logged training loss is the mean over both ranks' bags
    assert rank0["history"][0]["train_loss"] == pytest.approx(float(np.mean(losses)), abs=1e-6)


def test_validation_metrics_are_those_of_the_whole_validation_set(ddp):
    rank0, rank1 = scenario(ddp, "sgd")
    model, _ = sgd_reference()
    val = make_bags(SGD_VAL_SIZES, seed=2)
    alone = Trainer(model, progress=False).evaluate(make_loader(val))  # one process, every bag
    for rank in (rank0, rank1):
        row = rank["history"][0]
        assert row["val_loss"] == pytest.approx(alone["loss"], abs=1e-6)
        assert row["val_auroc"] == pytest.approx(alone["auroc"], abs=1e-9)
        assert row["val_accuracy"] == pytest.approx(alone["accuracy"], abs=1e-9)


def test_only_rank_0_writes_the_log_and_checkpoints(ddp):
    out, _ = ddp
    scenario(ddp, "sgd")
    assert (out / "sgd_log_rank0.csv").is_file() and (out / "sgd_rank0.pt").is_file()
    assert not (out / "sgd_log_rank1.csv").exists() and not (out / "sgd_rank1.pt").exists()


def test_uneven_bag_counts_finish_with_the_ranks_in_step(ddp):
    rank0, rank1 = scenario(ddp, "uneven")
    assert (rank0["n_local"], rank1["n_local"]) == (2, 6)  # by size, not by count
    assert len(rank0["history"]) == len(rank1["history"]) == UNEVEN_EPOCHS
    assert rank0["history"] == rank1["history"]
    assert_same_state(rank0["state"], rank1["state"])
    # ...and they trained as one process would: the rank that ran out took the optimizer state of the
    # rank that ran on (else its Adam moments lag, and its second step of the next epoch goes astray)
    state, losses = uneven_reference()
    assert [row["train_loss"] for row in rank0["history"]] == pytest.approx(losses, abs=1e-6)
    assert_same_state(rank0["state"], state, atol=1e-6)


def test_a_clam_like_model_with_unused_branches_trains(ddp):
    rank0, rank1 = scenario(ddp, "branchy")
    assert_same_state(rank0["state"], rank1["state"])
    assert not torch.equal(rank0["state"]["branches.0.weight"], rank0["initial"]["branches.0.weight"])
    losses = [row["train_loss"] for row in rank0["history"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_without_its_declaration_the_model_fails_under_ddp(ddp):
    for result in scenario(ddp, "undeclared"):
        assert result["raised"] is not None and "find_unused_parameters" in result["raised"]


def test_rank_0_checkpoint_loads_in_one_process_and_exports(ddp, tmp_path):
    from mil_export.onnx_export import export_checkpoint
    from mil_runtime import contract
    from mil_runtime.session import open_session
    from mil_train.checkpoint import load_checkpoint
    from mil_train.cli import bag_labels, split
    from mil_train.data.readers import read_mil_csv

    out, _ = ddp
    scenario(ddp, "cli")
    model, payload = load_checkpoint(out / "cli.pt")  # weights_only, no process group here
    provenance = payload["provenance"]
    assert provenance["world_size"] == 2 and (provenance["n_train"], provenance["n_val"]) == (12, 4)
    with open(out / "cli_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    # The checkpoint is the best epoch's, and its logged validation loss (reduced over the ranks) is
    # what one process scores on the whole validation split.
    bags = read_mil_csv(out / "bags.csv")
    _, val_idx = split(bag_labels(bags), 0.25, 1)
    alone = Trainer(model, progress=False).evaluate(make_loader([bags[i] for i in val_idx]))
    assert float(rows[provenance["epoch"] - 1]["val_loss"]) == pytest.approx(alone["loss"], abs=1e-6)

    onnx_path = export_checkpoint(out / "cli.pt", tmp_path / "cli.onnx")
    bag = bags[val_idx[0]]
    features = bag["X"][None].numpy()
    outputs = open_session(onnx_path, device="cpu").run(
        {contract.FEATURES: features, contract.MASK: np.ones(features.shape[:2], dtype=bool)}
    )
    with torch.no_grad():
        eager = model.probabilities(model(bag["X"][None]).logits).numpy()
    np.testing.assert_allclose(outputs[contract.PROBABILITIES], eager, atol=1e-5)


def test_a_rank_without_validation_bags_still_validates_with_the_others(ddp):
    from mil_train.checkpoint import load_checkpoint

    out, _ = ddp
    scenario(ddp, "cli_one_val")
    _, payload = load_checkpoint(out / "cli_one_val.pt")
    assert payload["provenance"]["n_val"] == 1 and "val_loss" in payload["provenance"]["metrics"]


# -- single process: shares, declarations, the --nproc wiring ---------------------------------------


def test_balanced_shards_balance_instances_not_bags():
    assert distributed.balanced_shards([100, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4]]
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5):
        sizes = rng.integers(1, 10_000, size=37).tolist()
        shards = distributed.balanced_shards(sizes, n)
        assert sorted(i for shard in shards for i in shard) == list(range(37))  # each bag exactly once
        loads = [sum(sizes[i] for i in shard) for shard in shards]
        assert max(loads) - min(loads) <= max(sizes)
        assert shards == distributed.balanced_shards(sizes, n)  # every rank computes the same split
    assert distributed.balanced_shards([3], 2) == [[0], []]


def test_declarations_match_what_autograd_leaves_unused():
    """Every registered model declares `ddp_find_unused_parameters` exactly when some training step
    leaves parameters out of the graph (the detector is shown to see a model that does)."""
    from mil_train.data import with_graph
    from mil_train.models import create_model, list_models

    assert unused_in_a_step(BranchyMIL(), make_bags((5, 6, 7), seed=0, n_classes=3))
    assert not MILModel.ddp_find_unused_parameters
    wrong = []
    for name in list_models():
        for n_classes in (1, 3):
            torch.manual_seed(0)
            model = create_model(name, in_dim=IN_DIM, n_classes=n_classes)
            bags = []
            for i, n in enumerate((5, 14, 9)):
                grid = torch.stack([torch.arange(n) // 4, torch.arange(n) % 4], dim=1)
                bag = make_bag(X=torch.randn(n, IN_DIM), Y=torch.tensor(i % max(2, n_classes)), coords=grid)
                bags.append(with_graph(bag, model.graph_rule) if model.uses_graph and model.graph_rule else bag)
            needs = bool(unused_in_a_step(model, bags))
            if needs != model.ddp_find_unused_parameters:
                wrong.append((name, n_classes, needs))
    assert not wrong, f"(model, n_classes, leaves parameters unused) against the declaration: {wrong}"


def test_distributed_without_a_process_group_is_refused():
    with pytest.raises(ValueError, match="init_from_env"):
        Trainer(small_abmil(0), distributed=True)
    assert Trainer(small_abmil(0)).distributed is False


@pytest.fixture
def no_launch(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


def test_nproc_starts_the_same_command_on_this_machine(tmp_path, monkeypatch, no_launch):
    from mil_train import cli

    seen = {}

    def fake_launch(nproc, command, *, env=None, **_):
        seen.update(nproc=nproc, command=list(command), env=dict(env or {}))
        return 6

    monkeypatch.setattr(distributed, "launch_local", fake_launch)
    args = ["ABMIL", str(tmp_path / "bags.csv"), "-o", str(tmp_path / "m.pt"), "--nproc", "3", "--epochs", "2"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 6  # the workers' exit code comes back
    assert seen["nproc"] == 3 and seen["command"] == [sys.executable, "-m", "mil_train.cli", *args]
    assert seen["env"][cli.COMMAND_ENV]


@pytest.mark.parametrize(
    "extra, env, code, message",
    [
        (["--nproc", "2"], {"WORLD_SIZE": "4", "RANK": "0"}, 6, "leave --nproc out under torchrun"),
        (["--nproc", "2", "--device", "cuda:1"], {}, 6, "pass --device cuda, not --device cuda:1"),
    ],
)
def test_nproc_refusals_are_one_line(tmp_path, monkeypatch, no_launch, extra, env, code, message):
    from mil_train import cli

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed, "launch_local", lambda *a, **k: pytest.fail("nothing may start"))
    write_mil_csv(tmp_path / "bags.csv", n_bags=4)
    result = CliRunner().invoke(cli.main, ["ABMIL", str(tmp_path / "bags.csv"), "-o", str(tmp_path / "m.pt"), *extra])
    assert result.exit_code == code
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mil-train: error: ") and message in lines[0]


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs")
def test_nproc_with_more_gpus_than_there_are_is_a_device_error(tmp_path, no_launch, monkeypatch):
    from mil_train import cli

    monkeypatch.setattr(distributed, "launch_local", lambda *a, **k: pytest.fail("nothing may start"))
    result = CliRunner().invoke(cli.main, ["ABMIL", str(tmp_path / "b.csv"), "-o", str(tmp_path / "m.pt"),
                                           "--nproc", "2", "--device", "cuda"])
    assert result.exit_code == 11 and len(result.output.strip().splitlines()) == 1


# -- real launches of the command (slow: each starts 2 more Python processes) -----------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["nproc", "torchrun"])
def test_mil_train_runs_under_its_launcher_and_torchrun(tmp_path, launcher):
    from mil_train.checkpoint import load_checkpoint

    write_mil_csv(tmp_path / "bags.csv")
    args = [a for a in cli_args(tmp_path) if a not in ("--nproc", "2")]
    args[args.index("--log")] = "--log-csv"  # torchrun's parser would take --log for its --log-dir
    if launcher == "nproc":
        command = [sys.executable, "-m", "mil_train.cli", *args, "--nproc", "2"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                   "127.0.0.1", "--master-port", str(_free_port()), "-m", "mil_train.cli", *args]
    done = subprocess.run(command, env=_child_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("mil-train: best epoch") == 1  # rank 0 alone speaks
    _, payload = load_checkpoint(tmp_path / "cli.pt")
    assert payload["provenance"]["world_size"] == 2


@pytest.mark.slow
def test_a_data_error_under_nproc_is_one_line_with_its_code(tmp_path):
    write_mil_csv(tmp_path / "bags.csv")
    command = [sys.executable, "-m", "mil_train.cli", *cli_args(tmp_path), "--class-names", "a,b,c"]
    done = subprocess.run(command, env=_child_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 6, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mil-train: error: --class-names gives 3 names")
