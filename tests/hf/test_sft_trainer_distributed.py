"""Multi-process DRIFT: DDP, ZeRO-2, ZeRO-3 and FSDP2 over 2 CPU ranks (gloo), with and without LoRA.

FSDP2 runs accelerate's real ``fully_shard`` path through a test-only routing patch (tests/hf/fsdp2_cpu.py); every
FSDP2 case asserts that the parameters were DTensors at every step, so a silent DDP fallback cannot pass.

Each case launches tests/hf/multirank_worker.py with torchrun under a timeout, so a hang fails instead of blocking CI.
Scores are compared at learning rate 0 (the model every rank and the single process score is then the same one):
tolerance 1e-5 of the largest score (seen: 1e-15 for DDP and ZeRO-2, 1e-7 for ZeRO-3).
"""

import json
import os
import sys

import numpy as np
import pytest

from tests.helpers import run_under_timeout

pytestmark = pytest.mark.slow
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multirank_worker.py")
N_TRAIN = 27  # odd: the two ranks' shards differ in size
UNTOUCHED = dict(lr=1e-2, ga=2, steps=8, first=2, every=2)  # scoring without reweighting vs plain SFT
RESUME = dict(lr=1e-2, steps=12, save_steps=8, first=3, every=3, capture=1)  # an unbroken run, and one resumed at 8
CAPTURED = dict(lr=0, capture=1, budget=100, check=4)
# Every run of one backend trains in one launch (runs one after another in the same two processes, each from a
# fresh model and trainer): a launch's start-up costs more than its tiny runs. name -> worker options. ZeRO-2's run
# shares ZeRO-3's launch (LAUNCH_OF), ahead of it: stage 2 leaves nothing behind that stage 3's model init would see.
RUNS = {
    "single": {
        "lora0": dict(lr=0, lora=0),
        "lora1": dict(lr=0, lora=1),
        "callback": dict(lr=0, trainer="callback"),
    },
    "ddp": {
        "score_lora0": dict(lr=0, lora=0),
        "score_lora1": dict(lr=0, lora=1),
        "captured": CAPTURED,
        "untouched_drift": dict(UNTOUCHED, mix=1.0),
        "untouched_plain": dict(UNTOUCHED, drift=0),
        # captured features (the default); the sampler's epoch, which this is about, does not depend on capture
        "resume_unbroken": RESUME,
        "resume_resumed": dict(RESUME, resume=1, resume_from="resume_unbroken/run/checkpoint-8"),
    },
    "zero2": {"score_lora1": dict(lr=0, lora=1, ga=2)},  # LoRA and gradient accumulation
    "zero3": {
        "score_lora0": dict(lr=0, lora=0),
        "score_lora1": dict(lr=0, lora=1, gc=1, ga=2),
        "captured": dict(CAPTURED, lora=1, gc=1, ga=2),
        "untouched_drift": dict(UNTOUCHED, mix=1.0),
        "untouched_plain": dict(UNTOUCHED, drift=0),
    },
    "fsdp2": {
        "score_callback": dict(lr=0, trainer="callback"),  # DriftCallback on a plain transformers.Trainer
        # FSDP2 with LoRA and checkpointing: the captured-features run (its scores are checked the same way)
        "captured": dict(CAPTURED, lora=1, gc=1, ga=2),
        "untouched_drift": dict(UNTOUCHED, mix=1.0),
        "untouched_plain": dict(UNTOUCHED, drift=0),
    },
    # FSDP2 under TRL's default bf16: a launch of its own (a process keeps the mixed precision it started with)
    "fsdp2_bf16": {
        "resume_unbroken": dict(RESUME, bf16=1),
        "resume_resumed": dict(RESUME, bf16=1, resume=1, resume_from="resume_unbroken/run/checkpoint-8"),
    },
}


LAUNCH_OF = {"zero2": "zero", "zero3": "zero"}  # modes that train in one launch, in RUNS' order


def _launch(base, launch, runs):
    """Train ``runs`` (name -> options) one after another in one launch (``single``: one process, otherwise two
    torchrun ranks) under a timeout; returns name -> the per-rank results."""
    nproc = 1 if launch == "single" else 2
    args = []
    for name, opts in runs.items():
        opts = {"n_train": N_TRAIN, **opts}
        if "resume_from" in opts:
            opts["resume_from"] = os.path.join(base, opts["resume_from"])
        args += ["+", os.path.join(base, name), *(f"{k}={v}" for k, v in opts.items())]
    prefix = [sys.executable]
    if nproc > 1:
        port = str(29500 + os.getpid() % 1000)
        prefix += ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    run_under_timeout([*prefix, WORKER, *args[1:]], 120 + 40 * len(runs))
    return {name: [json.load(open(os.path.join(base, name, f"rank{r}.json"))) for r in range(nproc)] for name in runs}


def _in_launch(mode, opts):
    """A run of ``RUNS[mode]`` as its launch trains it: its backend named, its checkpoint source under its name."""
    opts = dict(opts, mode=mode.removesuffix("_bf16"))
    if "resume_from" in opts:
        opts["resume_from"] = f"{mode}-{opts['resume_from']}"
    return opts


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """``launched(mode)``: the results of every run of ``RUNS[mode]`` (one launch per mode or ``LAUNCH_OF`` group,
    made once)."""
    cache = {}

    def get(mode):
        launch = LAUNCH_OF.get(mode, mode)
        if launch not in cache:
            modes = [m for m in RUNS if LAUNCH_OF.get(m, m) == launch]
            runs = {f"{m}-{name}": _in_launch(m, opts) for m in modes for name, opts in RUNS[m].items()}
            cache[launch] = _launch(str(tmp_path_factory.mktemp(launch)), launch, runs)
        return {name.removeprefix(f"{mode}-"): r for name, r in cache[launch].items() if name.startswith(f"{mode}-")}

    return get


@pytest.fixture(scope="module")
def single(launched):
    names = {(0, "sft"): "lora0", (1, "sft"): "lora1", (0, "callback"): "callback"}
    return lambda lora, trainer="sft": launched("single")[names[lora, trainer]][0]


def _assert_sharded(ranks, model_class):
    """FSDP2 really ran: every parameter a DTensor after every step, on every rank, in fully_shard's class."""
    for r in ranks:
        assert r["model_class"] == model_class
        assert r["sharded"] and all(n == total > 0 for n, total in r["sharded"].values())


@pytest.mark.parametrize(
    "mode,run",
    [
        ("ddp", "score_lora0"),
        ("ddp", "score_lora1"),
        ("zero2", "score_lora1"),
        ("zero3", "score_lora0"),
        ("zero3", "score_lora1"),
        ("fsdp2", "score_callback"),
    ],
)
def test_two_ranks_score_like_one(launched, single, mode, run):
    extra = RUNS[mode][run]
    lora = extra.get("lora", 0)
    ranks = launched(mode)[run]
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


@pytest.mark.parametrize("mode", ["ddp", "zero3", "fsdp2"])
def test_captured_features_score_like_a_full_rescoring(launched, single, mode):
    """Features captured in each rank's training backward, stale rows recomputed (budget large enough to cover
    them): the same scores as a single process recomputing every row, identical weights on both ranks. Under FSDP2
    the captured activations and output gradients are full-width although the weights are sharded."""
    ranks = launched(mode)["captured"]
    ref = single(RUNS[mode]["captured"].get("lora", 0))
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
def test_scoring_without_reweighting_leaves_training_untouched(launched, mode):
    """uniform mix 1.0: DRIFT refreshes (rollouts, feature passes) but the loss curve is plain SFT's, step for step."""
    drift, plain = launched(mode)["untouched_drift"], launched(mode)["untouched_plain"]
    assert drift[0]["num_refreshes"] == 4
    assert len(drift[0]["losses"]) == 8
    np.testing.assert_allclose(drift[0]["losses"], plain[0]["losses"], rtol=1e-6)
    if mode == "fsdp2":
        _assert_sharded(drift + plain, "FSDPLlamaForCausalLM")
    if mode == "ddp":  # really data parallel: both ranks hold the same weights after every step
        assert drift[0]["param_sums"] == drift[1]["param_sums"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2_bf16"])
def test_two_rank_resume_in_a_later_epoch_replays_the_same_stream(launched, mode):
    """accelerate does not reach the sampler's set_epoch on a resumed epoch with several ranks; DRIFT sets it. With
    captured features each rank saves and restores its own cache (drift_features.rank{r}.npz)."""
    runs = launched(mode)
    unbroken, resumed = runs["resume_unbroken"], runs["resume_resumed"]
    assert {"drift_features.rank0.npz", "drift_features.rank1.npz"} <= set(unbroken[0]["checkpoint_files"])
    for before, after in zip(unbroken, resumed):
        assert after["num_refreshes"] == before["num_refreshes"] == 4
        # 7 steps per epoch: the resumed run starts in epoch 1 and draws exactly what the unbroken run drew there
        assert after["drawn"] == before["drawn"][N_TRAIN:]
        assert after["weights"] == before["weights"]
    if mode == "fsdp2_bf16":
        _assert_sharded(unbroken + resumed, "FSDPLlamaForCausalLM")
    else:
        assert unbroken[0]["param_sums"] == unbroken[1]["param_sums"]  # really data parallel
