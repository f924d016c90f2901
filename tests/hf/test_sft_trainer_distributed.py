"""Multi-process DRIFT: DDP, ZeRO-2, ZeRO-3 and FSDP2 over 2 CPU ranks (gloo), with and without LoRA.

FSDP2 runs accelerate's real ``fully_shard`` path through a test-only routing patch (tests/hf/fsdp2_cpu.py); every
FSDP2 case asserts that the parameters were DTensors at every step, so a silent DDP fallback cannot pass.

Each case launches tests/hf/multirank_worker.py with torchrun under a timeout, so a hang fails instead of blocking CI.
Scores are compared at learning rate 0 (the model every rank and the single process score is then the same one):
tolerance 1e-5 of the largest score (seen: 1e-15 for DDP and ZeRO-2, 1e-7 for ZeRO-3).
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest

from tests.helpers import run_under_timeout

pytestmark = pytest.mark.slow
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multirank_worker.py")
N_TRAIN = 27  # odd: the two ranks' shards differ in size
TIMEOUT = 240


def _launch(out_dir, nproc, **opts):
    args = [f"{k}={v}" for k, v in {"n_train": N_TRAIN, **opts}.items()]
    if nproc == 1:
        cmd = [sys.executable, WORKER, str(out_dir), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(29500 + os.getpid() % 1000),
            WORKER,
            str(out_dir),
            *args,
        ]
    run_under_timeout(cmd, TIMEOUT)
    return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(nproc)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    cache = {}

    def get(lora, trainer="sft"):
        if (lora, trainer) not in cache:
            out = tmp_path_factory.mktemp(f"single{lora}{trainer}")
            cache[lora, trainer] = _launch(out, 1, lr=0, lora=lora, trainer=trainer)[0]
        return cache[lora, trainer]

    return get


def _assert_sharded(ranks, model_class):
    """FSDP2 really ran: every parameter a DTensor after every step, on every rank, in fully_shard's class."""
    for r in ranks:
        assert r["model_class"] == model_class
        assert r["sharded"] and all(n == total > 0 for n, total in r["sharded"].values())


@pytest.mark.parametrize(
    "mode,lora,extra",
    [
        ("ddp", 0, {}),
        ("ddp", 1, {}),
        ("zero2", 1, {"ga": 2}),  # LoRA and accumulation in one launch (each launch costs ~15 s of start-up)
        ("zero3", 0, {}),
        ("zero3", 1, {"gc": 1, "ga": 2}),
        ("fsdp2", 0, {"trainer": "callback"}),  # DriftCallback on a plain transformers.Trainer
        # FSDP2 with LoRA and checkpointing: the captured-features case below (its scores are checked the same way)
    ],
)
def test_two_ranks_score_like_one(tmp_path, single, mode, lora, extra):
    ranks = _launch(tmp_path, 2, mode=mode, lora=lora, lr=0, **extra)
    ref = single(lora, extra.get("trainer", "sft"))
    if mode == "fsdp2":
        _assert_sharded(ranks, "FSDPPeftModel" if lora else "FSDPLlamaForCausalLM")
    for r in ranks:
        assert r["num_refreshes"] == 2
        assert r["num_scored"] == [N_TRAIN, N_TRAIN]  # every example scored once, none missed
    # every rank holds identical weights and draws the identical index stream
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["drawn"] == ranks[1]["drawn"] and len(ranks[0]["drawn"]) > 0
    if not extra.get("ga"):
        assert ranks[0]["drawn"] == ref["drawn"]
    scores, expected = np.array(ranks[0]["scores"]), np.array(ref["scores"])
    assert np.abs(expected).max() > 0
    assert np.abs(scores - expected).max() <= 1e-5 * np.abs(expected).max()
    if lora:
        assert ranks[0]["feature_names"] and all("lora_" in n for n in ranks[0]["feature_names"])


@pytest.mark.parametrize(
    "mode,extra", [("ddp", {}), ("zero3", {"lora": 1, "gc": 1, "ga": 2}), ("fsdp2", {"lora": 1, "gc": 1, "ga": 2})]
)
def test_captured_features_score_like_a_full_rescoring(tmp_path, single, mode, extra):
    """Features captured in each rank's training backward, stale rows recomputed (budget large enough to cover
    them): the same scores as a single process recomputing every row, identical weights on both ranks. Under FSDP2
    the captured activations and output gradients are full-width although the weights are sharded."""
    ranks = _launch(tmp_path, 2, mode=mode, lr=0, capture=1, budget=100, check=4, **extra)
    ref = single(extra.get("lora", 0))
    if mode == "fsdp2":
        _assert_sharded(ranks, "FSDPPeftModel")
    for r in ranks:
        assert r["num_scored"] == [N_TRAIN, N_TRAIN]
        # 3 steps x global batch 4 between refreshes: the rows trained since the last refresh were captured, the
        # rest recomputed
        assert all(0 < n < N_TRAIN for n in r["num_recomputed"])
        # the check recomputed 4 cached rows (each on the rank holding it): at learning rate 0 they agree exactly
        assert r["agreement"] == [pytest.approx(1.0, abs=1e-5)] * 2
    assert ranks[0]["weights"] == ranks[1]["weights"]
    scores, expected = np.array(ranks[0]["scores"]), np.array(ref["scores"])
    assert np.abs(scores - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("mode", ["ddp", "zero3", "fsdp2"])
def test_scoring_without_reweighting_leaves_training_untouched(tmp_path, mode):
    """uniform mix 1.0: DRIFT refreshes (rollouts, feature passes) but the loss curve is plain SFT's, step for step."""
    common = dict(mode=mode, lr=1e-2, ga=2, steps=8, first=2, every=2)
    drift = _launch(tmp_path / "drift", 2, mix=1.0, **common)
    plain = _launch(tmp_path / "plain", 2, drift=0, **common)
    assert drift[0]["num_refreshes"] == 4
    assert len(drift[0]["losses"]) == 8
    np.testing.assert_allclose(drift[0]["losses"], plain[0]["losses"], rtol=1e-6)
    if mode == "fsdp2":
        _assert_sharded(drift + plain, "FSDPLlamaForCausalLM")
    if mode == "ddp":  # really data parallel: both ranks hold the same weights after every step
        assert drift[0]["param_sums"] == drift[1]["param_sums"]


@pytest.mark.parametrize(
    "mode,capture,bf16",
    # captured features (the default) on DDP, and FSDP2 under TRL's default bf16; the sampler's epoch, which this is
    # about, does not depend on capture
    [("ddp", 1, 0), ("fsdp2", 1, 1)],
)
def test_two_rank_resume_in_a_later_epoch_replays_the_same_stream(tmp_path, mode, capture, bf16):
    """accelerate does not reach the sampler's set_epoch on a resumed epoch with several ranks; DRIFT sets it. With
    captured features each rank saves and restores its own cache (drift_features.rank{r}.npz)."""
    common = dict(mode=mode, lr=1e-2, steps=12, save_steps=8, first=3, every=3, capture=capture, bf16=bf16)
    unbroken = _launch(tmp_path / "a", 2, **common)
    os.makedirs(tmp_path / "b" / "run")
    shutil.copytree(tmp_path / "a" / "run" / "checkpoint-8", tmp_path / "b" / "run" / "checkpoint-8")
    if capture:
        names = sorted(os.listdir(tmp_path / "a" / "run" / "checkpoint-8"))
        assert "drift_features.rank0.npz" in names and "drift_features.rank1.npz" in names
    resumed = _launch(tmp_path / "b", 2, resume=1, **common)
    for before, after in zip(unbroken, resumed):
        assert after["num_refreshes"] == before["num_refreshes"] == 4
        # 7 steps per epoch: the resumed run starts in epoch 1 and draws exactly what the unbroken run drew there
        assert after["drawn"] == before["drawn"][N_TRAIN:]
        assert after["weights"] == before["weights"]
    if mode == "fsdp2":
        _assert_sharded(unbroken + resumed, "FSDPLlamaForCausalLM")
    else:
        assert unbroken[0]["param_sums"] == unbroken[1]["param_sums"]  # really data parallel
