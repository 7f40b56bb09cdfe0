"""mil-train end to end: MUSK1 csv, a torchmil folder, and one-line errors with documented exit codes."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mil_runtime.errors import InputNotFoundError, InvalidInputError, OutputError
from mil_train.checkpoint import load_checkpoint
from mil_train.cli import bag_labels, main, parse_loss_weights, parse_model_args, split
from mil_train.data.readers import read_mil_csv
from mil_train.models import ABMIL
from mil_train.models import registry
from mil_train.trainer import Trainer, UnknownLossTermError, make_loader


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def musk(shared_data):
    """../shared/data/mil/musk1.csv, or skip (same rule as tests/conftest.py shared_file)."""
    path = shared_data / "mil" / "musk1.csv"
    if not path.exists():
        pytest.skip("needs ../shared/data/mil/musk1.csv, which is not on this machine")
    return path


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.faults
def test_trains_on_musk1_and_checkpoint_loads_weights_only(tmp_path, musk):
    out, log = tmp_path / "abmil.pt", tmp_path / "log.csv"
    result = run([
        "ABMIL", musk, "-o", out, "--epochs", 3, "--lr", 5e-4, "--batch-size", 4, "--log", log,
        "--model-arg", "gated=true", "--model-arg", "embed_dims=[32]", "--class-names", "non-musk,musk", "--seed", 3,
    ])
    assert result.exit_code == 0, result.output
    model, payload = load_checkpoint(out)  # torch.load(weights_only=True) inside
    assert payload["model_name"] == "ABMIL"
    assert payload["config"]["in_dim"] == 166 and payload["config"]["n_classes"] == 1
    assert payload["config"]["gated"] is True and payload["config"]["embed_dims"] == [32]
    assert payload["class_names"] == ["non-musk", "musk"]
    assert payload["provenance"]["n_bags"] == 92
    assert payload["provenance"]["n_val"] == 19  # ceil(0.2 * 92)
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and "val_auroc" in rows[0]
    # The saved weights are the best epoch's: re-scoring them reproduces the logged validation loss.
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert payload["provenance"]["epoch"] == int(best["epoch"])
    bags = read_mil_csv(musk)
    _, val_idx = split(bag_labels(bags), 0.2, seed=3)
    with torch.no_grad():
        logits = torch.cat([model(bags[i]["X"].unsqueeze(0)).logits[:, 0] for i in val_idx])
    targets = torch.stack([bags[i]["Y"] for i in val_idx]).float()
    val_loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert float(val_loss) == pytest.approx(float(best["val_loss"]), rel=1e-4)


def test_same_seed_gives_identical_checkpoints(tmp_path, musk):
    for name in ("a.pt", "b.pt"):
        assert run(["ABMIL", musk, "-o", tmp_path / name, "--epochs", 1, "--batch-size", 8]).exit_code == 0
    a, _ = load_checkpoint(tmp_path / "a.pt")
    b, _ = load_checkpoint(tmp_path / "b.pt")
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v)


def torchmil_folder(root, n_bags=12, dim=5, n_classes=3):
    rng = np.random.default_rng(0)
    for folder in ("features", "labels"):
        (root / folder).mkdir(parents=True)
    for i in range(n_bags):
        np.save(root / "features" / f"bag{i:02d}.npy", rng.normal(size=(4 + i % 3, dim)).astype(np.float32))
        np.save(root / "labels" / f"bag{i:02d}.npy", np.array(i % n_classes))
    return root


def test_multiclass_torchmil_folder_infers_dims(tmp_path):
    data = torchmil_folder(tmp_path / "bags")
    out = tmp_path / "m.pt"
    result = run(["ABMIL", data, "-o", out, "--epochs", 2, "--val-fraction", 0.25, "--class-names", "a,b,c"])
    assert result.exit_code == 0, result.output
    _, payload = load_checkpoint(out)
    assert payload["config"]["in_dim"] == 5 and payload["config"]["n_classes"] == 3
    assert payload["class_names"] == ["a", "b", "c"]


def test_model_arg_parsing():
    assert parse_model_args(("gated=true", "att_dim=64", "dropout=0.25", "embed_dims=[8, 4]", "att_act=relu")) == {
        "gated": True, "att_dim": 64, "dropout": 0.25, "embed_dims": [8, 4], "att_act": "relu",
    }
    assert parse_model_args(("gated=True",)) == {"gated": True}


@pytest.mark.faults
@pytest.mark.parametrize(
    "args, code, message",
    [
        (["ABMIL", "{tmp}/missing.csv"], InputNotFoundError.exit_code, "does not exist"),
        (["NoSuchMIL", "{data}"], InvalidInputError.exit_code, "unknown model 'NoSuchMIL'; choose one of"),
        (["ABMIL", "{data}", "--model-arg", "gated"], InvalidInputError.exit_code, "not key=value"),
        (["ABMIL", "{data}", "--model-arg", "heads=4"], InvalidInputError.exit_code, "cannot build ABMIL"),
        (["ABMIL", "{data}", "--model-arg", "in_dim=7"], InvalidInputError.exit_code, "data has 5 features"),
        (["ABMIL", "{data}", "--class-names", "a,b"], InvalidInputError.exit_code, "3 classes"),
        (["ABMIL", "{tmp}/notes.txt"], InvalidInputError.exit_code, "neither a MIL .csv"),
        (["ABMIL", "{tmp}/bad.csv"], InvalidInputError.exit_code, "cannot read"),
        (["ABMIL", "{data}", "--loss-weight", "cls"], InvalidInputError.exit_code, "is not NAME=W"),
        (["ABMIL", "{data}", "--loss-weight", "cls=heavy"], InvalidInputError.exit_code, "W must be a number"),
        (["ABMIL", "{data}", "--loss-weight", "cls=-1"], InvalidInputError.exit_code, "finite number >= 0"),
        (["ABMIL", "{data}", "--loss-weight", "cls=nan"], InvalidInputError.exit_code, "finite number >= 0"),
        (["ABMIL", "{data}", "--loss-weight", "cls=1", "--loss-weight", "cls=2"], InvalidInputError.exit_code,
         "given twice"),
        (["ABMIL", "{data}", "--loss-weight", "clss=0.5"], InvalidInputError.exit_code,
         "--loss-weight names clss, which ABMIL does not compute; its loss terms are cls"),
        (["ABMIL", "{data}", "--precision", "fp16"], InvalidInputError.exit_code, "--precision fp16 needs --device cuda"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code(tmp_path, args, code, message):
    data = torchmil_folder(tmp_path / "bags")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "bad.csv").write_text("1,1,0.5\n1,oops,0.2\n")
    args = [a.format(tmp=tmp_path, data=data) for a in args] + ["-o", str(tmp_path / "m.pt"), "--epochs", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mil-train: error:") and message in lines[0]
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.faults
def test_missing_output_folder_is_an_output_error(tmp_path):
    data = torchmil_folder(tmp_path / "bags")
    result = run(["ABMIL", data, "-o", tmp_path / "nowhere" / "m.pt", "--epochs", 1])
    assert result.exit_code == OutputError.exit_code
    assert "does not exist" in result.output


def test_clam_h5_folder_with_text_labels(tmp_path):
    import h5py

    rng = np.random.default_rng(1)
    root = tmp_path / "h5"
    root.mkdir()
    rows = ["slide_id,label"]
    for i in range(8):
        with h5py.File(root / f"s{i}.h5", "w") as h5:
            h5["features"] = rng.normal(size=(3 + i, 4)).astype(np.float32)
            h5["coords"] = np.stack([np.arange(3 + i) * 256, np.zeros(3 + i)], axis=1).astype(np.int64)
        rows.append(f"s{i}.svs,{'tumour' if i % 2 else 'normal'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "m.pt"
    no_labels = run(["ABMIL", root, "-o", out, "--epochs", 1])
    assert no_labels.exit_code == InvalidInputError.exit_code and "--labels" in no_labels.output
    result = run(["ABMIL", root, "-o", out, "--epochs", 1, "--labels", tmp_path / "labels.csv", "--val-fraction", 0.25])
    assert result.exit_code == 0, result.output
    _, payload = load_checkpoint(out)
    assert payload["config"]["in_dim"] == 4 and payload["config"]["n_classes"] == 1
    assert payload["class_names"] == ["normal", "tumour"]


# -- --loss-weight ------------------------------------------------------------------------------


class AuxTermABMIL(ABMIL):
    """ABMIL plus an auxiliary term (sum of squared weights), so a second term can be weighed."""

    name = "_TestCliAuxABMIL"

    def compute_loss(self, batch):
        logits, terms = super().compute_loss(batch)
        terms["aux"] = sum((p**2).sum() for p in self.parameters())
        return logits, terms


@pytest.fixture
def aux_model_registered(monkeypatch):
    """Registered for one test only, so registry-wide tests never see it."""
    monkeypatch.setitem(registry._REGISTRY, AuxTermABMIL.name, AuxTermABMIL)
    return AuxTermABMIL.name


def test_parse_loss_weights():
    assert parse_loss_weights(("cls=2", " aux = 0.25", "extra=0")) == {"cls": 2.0, "aux": 0.25, "extra": 0.0}
    assert parse_loss_weights(()) == {}


def test_loss_weights_weigh_the_named_terms_and_are_recorded(tmp_path, aux_model_registered):
    data = torchmil_folder(tmp_path / "bags", n_classes=2)
    out, log = tmp_path / "m.pt", tmp_path / "log.csv"
    result = run([aux_model_registered, data, "-o", out, "--epochs", 2, "--log", log,
                  "--loss-weight", "aux=0.25", "--loss-weight", "cls=2"])
    assert result.exit_code == 0, result.output
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:  # the logged total is the weighted sum of the logged terms
        for split_name in ("train", "val"):
            expected = 2.0 * float(row[f"{split_name}_cls"]) + 0.25 * float(row[f"{split_name}_aux"])
            assert float(row[f"{split_name}_loss"]) == pytest.approx(expected, rel=1e-5)
    _, payload = load_checkpoint(out)
    assert payload["provenance"]["loss_weights"] == {"aux": 0.25, "cls": 2.0}


def test_no_loss_weights_records_an_empty_table(tmp_path):
    out = tmp_path / "m.pt"
    assert run(["ABMIL", torchmil_folder(tmp_path / "bags"), "-o", out, "--epochs", 1]).exit_code == 0
    _, payload = load_checkpoint(out)
    assert payload["provenance"]["loss_weights"] == {}


def test_unknown_loss_weight_names_every_term_of_the_model(tmp_path, aux_model_registered):
    data = torchmil_folder(tmp_path / "bags", n_classes=2)
    out, log = tmp_path / "m.pt", tmp_path / "log.csv"
    result = run([aux_model_registered, data, "-o", out, "--epochs", 3, "--log", log,
                  "--loss-weight", "aux=0.5", "--loss-weight", "instance=0.3"])
    assert result.exit_code == InvalidInputError.exit_code, result.output
    lines = result.output.strip().splitlines()
    assert lines == [
        "mil-train: error: --loss-weight names instance, which _TestCliAuxABMIL does not compute; "
        "its loss terms are cls, aux"
    ]
    assert not out.exists() and not log.exists()  # stopped within the first epoch


class CountingABMIL(ABMIL):
    """Counts compute_loss calls, to show where the Trainer stops."""

    calls = 0

    def compute_loss(self, batch):
        CountingABMIL.calls += 1
        return super().compute_loss(batch)


def test_trainer_stops_after_the_first_batch_on_an_unknown_term(tmp_path):
    bags = _folder_bags(tmp_path)
    model = CountingABMIL(in_dim=5, n_classes=3)
    CountingABMIL.calls = 0
    trainer = Trainer(model, epochs=2, progress=False, loss_weights={"cls": 1.0, "typo": 2.0})
    with pytest.raises(UnknownLossTermError) as info:
        trainer.fit(make_loader(bags, batch_size=2))
    assert CountingABMIL.calls == 1
    assert info.value.unknown == ["typo"] and info.value.terms == ["cls"]
    assert "'typo'" in str(info.value) and "'cls'" in str(info.value)


def _folder_bags(tmp_path):
    from mil_train.data.torchmil_folder import TorchmilFolderDataset

    dataset = TorchmilFolderDataset(torchmil_folder(tmp_path / "bags"))
    return [dataset[i] for i in range(len(dataset))]
