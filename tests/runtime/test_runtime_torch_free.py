"""The runtime works in a Python where torch, mil_train and mil_export cannot be imported.

A sitecustomize.py on PYTHONPATH installs a meta-path finder that raises ImportError for those
packages before anything else runs, so the check covers the `mil-infer` console script too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from runtime_fixtures import FEATURE_DIM, make_feature_file

BLOCKER = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = ("torch", "mil_train", "mil_export")

    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked by the torch-free test: {name}")
            return None

    sys.meta_path.insert(0, BlockTorch())
    """
)

PREDICT = textwrap.dedent(
    """
    import json, sys
    try:
        import torch
    except ImportError as exc:
        blocked = str(exc)
    else:
        sys.exit("torch was importable")
    import mil_runtime
    import mil_runtime.cli, mil_runtime.pipeline  # the slide route of mil-infer too
    bag = mil_runtime.read_feature_file(sys.argv[2])
    prediction = mil_runtime.load_model(sys.argv[1], device="cpu").predict(bag.features)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "mil_train", "mil_export"))
    print(json.dumps({"blocked": blocked, "leaked": leaked,
                      "probabilities": prediction.probabilities.tolist(),
                      "attention": prediction.attention.tolist()}))
    """
)


def blocked_env(folder: Path) -> dict[str, str]:
    (folder / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run(args, env) -> subprocess.CompletedProcess:
    return subprocess.run(list(map(str, args)), capture_output=True, text=True, env=env, timeout=120)


def mil_infer_script() -> Path:
    script = Path(sys.executable).with_name("mil-infer")
    assert script.exists(), f"console script missing next to {sys.executable}; reinstall milkit"
    return script


def test_runtime_runs_without_torch(tmp_path, binary_model):
    model, model_path = binary_model
    env = blocked_env(tmp_path)
    features = np.random.default_rng(11).standard_normal((9, FEATURE_DIM)).astype(np.float32)
    source = make_feature_file(tmp_path / "bag.h5", features)
    with torch.no_grad():
        eager = model(torch.from_numpy(features)[None])
        expected_p = torch.sigmoid(eager.logits)[0].numpy()
        expected_attention = eager.attention[0].numpy()

    # the blocker is really active: a plain `import torch` fails in that environment
    proof = run([sys.executable, "-c", "import torch"], env)
    assert proof.returncode != 0 and "blocked by the torch-free test: torch" in proof.stderr

    library = run([sys.executable, "-c", PREDICT, model_path, source], env)
    assert library.returncode == 0, library.stderr
    result = json.loads(library.stdout)
    assert "blocked by the torch-free test" in result["blocked"]
    assert result["leaked"] == []
    np.testing.assert_allclose(result["probabilities"], expected_p, atol=1e-5)
    np.testing.assert_allclose(result["attention"], expected_attention, atol=1e-5)

    script = mil_infer_script()
    help_text = run([script, "--help"], env)
    assert help_text.returncode == 0 and "Exit codes" in help_text.stdout, help_text.stderr
    cli = run([script, source, "--model", model_path, "--json", "--out", tmp_path / "out"], env)
    assert cli.returncode == 0, cli.stderr
    assert abs(json.loads(cli.stdout)["probabilities"]["positive"] - float(expected_p[0])) < 1e-5
    assert (tmp_path / "out" / "bag.json").is_file()
