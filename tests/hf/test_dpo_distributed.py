"""The preference scorers across 2 CPU ranks (gloo): ICA, LossDiff-IRM and DRIFT for DPO under DDP, ZeRO-3 and
FSDP2 (the last through the test-only routing patch in tests/hf/fsdp2_cpu.py).

Each case launches tests/hf/pair_multirank_worker.py with torchrun under a timeout, so a hang fails instead of
blocking CI. At learning rate 0 every rank and the single process score the same model: the scores must agree to
1e-5 of the largest (seen: 0 for ICA and LossDiff-IRM, 3e-16 for DRIFT under DDP and FSDP2, 1e-7 under ZeRO-3), and
both ranks must hold identical weights. The train set has 13 pairs, so the ranks' shares of every scoring pass differ
and a rank that made fewer forwards would hang its peer.
"""

import json
import os
import sys

import numpy as np
import pytest

from tests.helpers import run_under_timeout

pytestmark = pytest.mark.slow
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pair_multirank_worker.py")
TIMEOUT = 300
METHODS = ("ica", "lossdiff_irm", "drift")


def _launch(out_dir, nproc, mode, *options):
    cmd = [sys.executable, WORKER, str(out_dir), f"mode={mode}", *options]
    if nproc > 1:
        port = str(29600 + os.getpid() % 1000)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port]
        cmd += [WORKER, str(out_dir), f"mode={mode}", *options]
    run_under_timeout(cmd, TIMEOUT)
    return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(nproc)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("single"), 1, "single")[0]


@pytest.mark.parametrize("mode", ["ddp", "zero3", "fsdp2"])
def test_preference_scorers_on_two_ranks_score_like_one(tmp_path, single, mode):
    ranks = _launch(tmp_path, 2, mode)
    for method in METHODS:
        ref, mine, other = single[method], ranks[0][method], ranks[1][method]
        assert mine["history_steps"] == ref["history_steps"] and mine["history_steps"]
        assert mine["weights"] == other["weights"]  # identical weights on every rank
        np.testing.assert_allclose(mine["weights"], ref["weights"], atol=1e-6)
        assert any(np.nanmax(np.abs(v)) > 0 for v in ref["scores"].values())  # something was scored
        for name, expected in ref["scores"].items():  # (IRM is 0 at learning rate 0: the policy is the reference)
            expected, got = np.asarray(expected, float), np.asarray(mine["scores"][name], float)
            scale = max(float(np.nanmax(np.abs(expected))), 1e-9)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * scale, err_msg=f"{method} {name}")
        if mode == "zero3":  # really partitioned
            assert mine["zero3_params"] == mine["params"] > 0
        if mode == "fsdp2":  # really sharded (FSDP2 leaves its last group unsharded after a forward)
            assert mine["dtensor_params"] > mine["params"] // 2


def test_pair_scorers_resume_on_two_ranks_under_fsdp2(tmp_path):
    """drift_state.json in the checkpoint, artifacts written, and a resumed run ends with the unbroken run's weights
    and history on both ranks, for each scorer (FSDP2: sharded model and optimizer checkpoints)."""
    ranks = _launch(tmp_path, 2, "fsdp2", "resume=1")
    for method in METHODS:
        for r in ranks:
            a, b = r[method]["unbroken"], r[method]["resumed"]
            assert a["history_steps"] and b["history_steps"] == a["history_steps"], method
            np.testing.assert_allclose(b["weights"], a["weights"], rtol=1e-6, err_msg=method)
            assert a["weights"] == ranks[0][method]["unbroken"]["weights"]  # identical on every rank
        assert ranks[0][method]["checkpoint_state"] and ranks[0][method]["artifacts"], method
