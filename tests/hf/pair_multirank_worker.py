"""One rank of the preference scorers (ICA, LossDiff-IRM, DRIFT for DPO) in a DriftDPOTrainer, launched by
tests/hf/test_dpo_distributed.py with torchrun (or alone for the single-process reference).

Usage: python pair_multirank_worker.py OUT_DIR mode=single|ddp|zero3|fsdp2 [resume=1]
Each method trains a few steps at learning rate 0 (the model every rank and the single process scores is then the
same one) and writes OUT_DIR/rank{r}.json: per method the pair weights, the scores and the history. With
``resume=1`` each method instead trains 7 steps at a small learning rate with a checkpoint at step 5, then a second
trainer resumes from that checkpoint; per method the file holds both runs' ``drift_state`` weights and history, and
whether the checkpoint held ``drift_state.json`` and the run wrote its per-scoring artifacts.
"""

import copy
import json
import os
import sys


def main():
    out_dir = sys.argv[1]
    opt = dict(kv.split("=", 1) for kv in sys.argv[2:])
    mode = opt.get("mode", "single")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    engine = {}
    if mode == "zero3":
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        engine["deepspeed"] = {
            "zero_optimization": {"stage": 3},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
            "gradient_clipping": "auto",
            "zero_force_ds_cpu_optimizer": False,
        }
        engine["accelerator_config"] = {"use_configured_state": True}
        from accelerate import PartialState

        PartialState(backend="gloo")
    elif mode == "fsdp2":
        from tests.hf.fsdp2_cpu import route_fsdp_on_cpu

        route_fsdp_on_cpu()
        engine = {"fsdp": "full_shard", "fsdp_config": {"version": 2}}

    import numpy as np

    from drift_trainer import DriftDPOConfig, DriftDPOTrainer
    from drift_trainer.cli.toy import build_char_tokenizer, build_tiny_llama
    from tests.helpers import digit_start_reward, preference_pairs

    tok = build_char_tokenizer(os.path.join(out_dir, f"tok{rank}"))
    train = preference_pairs(13, 0)  # odd: the ranks' shares differ
    holdout, val = preference_pairs(6, 9, 0), preference_pairs(8, 5, 0)
    per_method = {
        "ica": ({"drift_ica_batch_size": 4}, {"holdout_dataset": holdout}),
        "lossdiff_irm": ({"drift_lossdiff_warmup_epochs": 1.0, "drift_ica_batch_size": 4}, {"validation_dataset": val}),
        "drift": (
            {
                "drift_refresh_steps": 2,
                "drift_num_queries": 4,
                "drift_num_rollouts": 4,
                "drift_rollout_batch_size": 4,
                "drift_max_new_tokens": 2,
                "drift_no_contrast": "keep",
                "drift_feature_batch_size": 4,
            },
            {"query_dataset": val.select_columns(["prompt", "answer"]), "reward_funcs": digit_start_reward},
        ),
    }

    def fit(method, options, inputs, out, resume_from=None, **schedule):
        if engine:  # one accelerate state per trainer: DeepSpeed and FSDP take their plugin only on the first
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state()
        model = build_tiny_llama(tok, seed=0)
        args = DriftDPOConfig(
            output_dir=out,
            per_device_train_batch_size=4 // world,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            bf16=False,
            seed=0,
            disable_tqdm=True,
            ddp_backend="gloo" if world > 1 else None,
            drift_method=method,
            drift_progress=False,
            **{"max_steps": 4, "learning_rate": 0.0, "save_strategy": "no", **schedule},
            **options,
            **engine,
        )
        trainer = DriftDPOTrainer(
            model=model,
            ref_model=copy.deepcopy(model),
            args=args,
            train_dataset=train,
            processing_class=tok,
            **inputs,
        )
        trainer.train(resume_from_checkpoint=resume_from)
        return trainer

    result = {"rank": rank, "world": world}
    if opt.get("resume") == "1":
        for method, (options, inputs) in per_method.items():
            runs, schedule = {}, {"max_steps": 7, "learning_rate": 1e-3, "save_strategy": "steps", "save_steps": 5}
            unbroken = os.path.join(out_dir, method, "unbroken")
            runs["unbroken"] = fit(method, options, inputs, unbroken, **schedule)
            checkpoint = os.path.join(unbroken, "checkpoint-5")
            resumed = os.path.join(out_dir, method, "resumed")
            runs["resumed"] = fit(method, options, inputs, resumed, resume_from=checkpoint, **schedule)
            result[method] = {
                name: {
                    "weights": np.asarray(tr.drift_state.weights, float).tolist(),
                    "history_steps": [h.get("step") for h in tr.drift_state.history],
                }
                for name, tr in runs.items()
            }
            result[method]["checkpoint_state"] = os.path.exists(os.path.join(checkpoint, "drift_state.json"))
            result[method]["artifacts"] = os.path.exists(os.path.join(unbroken, "drift", "examples.jsonl"))
        _finish(out_dir, rank, result)
        return
    for method, (options, inputs) in per_method.items():
        steps = {"max_steps": 6} if method == "lossdiff_irm" else {}  # its selection must come before the last epoch
        trainer = fit(method, options, inputs, os.path.join(out_dir, method), **steps)
        from torch.distributed.tensor import DTensor

        result[method] = {
            "weights": None if trainer.pair_weights is None else np.asarray(trainer.pair_weights, float).tolist(),
            "scores": {k: np.asarray(v, float).tolist() for k, v in trainer.pair_scores.items()},
            "history_steps": [h.get("step") for h in trainer.pair_history],
            "dtensor_params": sum(isinstance(p, DTensor) for p in trainer.model.parameters()),
            "params": len(list(trainer.model.parameters())),
            "zero3_params": sum(hasattr(p, "ds_id") for p in trainer.model.parameters()),
        }
    _finish(out_dir, rank, result)


def _finish(out_dir, rank, result):
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    import torch.distributed as td

    if td.is_initialized():
        td.barrier()
        td.destroy_process_group()
    # Results are written: leave without the interpreter's teardown, where torch's gloo threads occasionally abort
    # the process ("terminate called without an active exception", exit -6) after a run that finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
