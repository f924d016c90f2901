"""One rank of the preference scorers (ICA, LossDiff-IRM, DRIFT for DPO) in a DriftDPOTrainer, launched by
tests/hf/test_dpo_distributed.py with torchrun (or alone for the single-process reference).

Usage: python pair_multirank_worker.py OUT_DIR mode=single|ddp|zero3|fsdp2
Each method trains a few steps at learning rate 0 (the model every rank and the single process scores is then the
same one) and writes OUT_DIR/rank{r}.json: per method the pair weights, the scores and the history.
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
    result = {"rank": rank, "world": world}
    for method, (options, inputs) in per_method.items():
        if engine:  # one accelerate state per trainer: DeepSpeed and FSDP take their plugin only on the first
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state()
        model = build_tiny_llama(tok, seed=0)
        args = DriftDPOConfig(
            output_dir=os.path.join(out_dir, method),
            max_steps=4,
            per_device_train_batch_size=4 // world,
            learning_rate=0.0,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            seed=0,
            disable_tqdm=True,
            ddp_backend="gloo" if world > 1 else None,
            drift_method=method,
            drift_progress=False,
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
        trainer.train()
        from torch.distributed.tensor import DTensor

        result[method] = {
            "weights": None if trainer.pair_weights is None else np.asarray(trainer.pair_weights, float).tolist(),
            "scores": {k: np.asarray(v, float).tolist() for k, v in trainer.pair_scores.items()},
            "history_steps": [h.get("step") for h in trainer.pair_history],
            "dtensor_params": sum(isinstance(p, DTensor) for p in trainer.model.parameters()),
            "params": len(list(trainer.model.parameters())),
            "zero3_params": sum(hasattr(p, "ds_id") for p in trainer.model.parameters()),
        }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    import torch.distributed as td

    if td.is_initialized():
        td.barrier()
        td.destroy_process_group()


if __name__ == "__main__":
    main()
