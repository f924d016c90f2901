"""One rank of a DRIFT run, launched by tests/hf/test_sft_trainer_distributed.py with torchrun (or alone for
single-process runs).

Usage: python multirank_worker.py OUT_DIR key=value ... [+ OUT_DIR2 key=value ... ...]
  mode=single|ddp|zero2|zero3|fsdp2  lora=0|1  steps=6  n_train=27  lr=1e-3  mix=0.0  ga=1  gc=0  drift=1
  first=3  every=3  save_steps=0  resume=0  bf16=0  trainer=sft|callback (DriftSFTTrainer, or a plain
  transformers.Trainer with DriftCallback attached)  resume_from=DIR (before resuming, copy the checkpoint
  directory DIR into this run's output directory)
Writes OUT_DIR/rank{r}.json: the indices the sampler yielded, the weights and scores of the last refresh, the
number of rows scored, and the training losses this rank logged.

Runs separated by ``+`` train one after another in the same processes (one backend per launch; ZeRO-2 and ZeRO-3
may share one, ZeRO-2 first), each from a fresh model and trainer: a launch's start-up (two interpreters importing
torch, transformers and DeepSpeed on two cores) costs more than a tiny run.
"""

import json
import os
import sys

DEFAULTS = {
    "mode": "single",
    "lora": "0",
    "steps": "6",
    "n_train": "27",
    "lr": "1e-3",
    "mix": "0.0",
    "ga": "1",
    "gc": "0",
    "drift": "1",
    "first": "3",
    "every": "3",
    "save_steps": "0",
    "resume": "0",
    "capture": "0",  # features captured in the training backward (the default) or a full rescoring per refresh
    "budget": "0.1",
    "check": "32",
    "bf16": "0",
    "trainer": "sft",
    "resume_from": "",
}


def main():
    runs, group = [], []
    for arg in sys.argv[1:] + ["+"]:
        if arg != "+":
            group.append(arg)
        elif group:
            runs.append((group[0], {**DEFAULTS, **dict(kv.split("=", 1) for kv in group[1:])}))
            group = []
    modes = {opt["mode"] for _, opt in runs}
    if len({"zero" if m.startswith("zero") else m for m in modes}) != 1:
        raise SystemExit(f"one backend per launch (ZeRO stages may share one), got {sorted(modes)}")
    for out_dir, opt in runs:
        run(out_dir, opt)
    import torch.distributed as td

    if td.is_initialized():  # a gloo group left to interpreter shutdown can abort the process (exit code -6)
        td.barrier()
        td.destroy_process_group()
    # Results are written: leave without the interpreter's teardown, where torch's gloo threads occasionally abort
    # the process ("terminate called without an active exception", exit -6) after a run that finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def first_checkpoint_files(output_dir):
    """The files of the earliest checkpoint in ``output_dir`` (each rank saves its own captured-feature cache there)."""
    steps = sorted(int(d.split("-")[1]) for d in os.listdir(output_dir) if d.startswith("checkpoint-"))
    return sorted(os.listdir(os.path.join(output_dir, f"checkpoint-{steps[0]}"))) if steps else []


def run(out_dir, opt):
    mode = opt["mode"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ds_config = None
    if mode.startswith("zero"):
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        ds_config = {
            "zero_optimization": {"stage": int(mode[-1])},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
            "gradient_clipping": "auto",
            "zero_force_ds_cpu_optimizer": False,
        }
    fsdp = {}
    if mode == "fsdp2":  # accelerate's FSDP2 on CPU ranks, through the test-only routing patch
        from tests.hf.fsdp2_cpu import route_fsdp_on_cpu

        route_fsdp_on_cpu()
        fsdp = {"fsdp": "full_shard", "fsdp_config": {"version": 2}}
    from accelerate import PartialState

    if ds_config is not None:  # DeepSpeed on CPU: transformers sees the ranks only through a configured state
        PartialState(backend="gloo")

    import numpy as np
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from drift_trainer import DriftConfig
    from drift_trainer.cli.toy import (
        Corruption,
        addition_dataset,
        build_char_tokenizer,
        build_tiny_llama,
        query_dataset_from,
    )
    from drift_trainer.core.sampler import DriftSampler
    from tests.helpers import tiny_trainer  # the repository root is on PYTHONPATH

    unset_hf_deepspeed_config()  # an earlier run's ZeRO config must not reach this run's model construction
    rank = int(os.environ.get("RANK", "0"))
    tok = build_char_tokenizer(os.path.join(out_dir, f"tok{rank}"))
    model = build_tiny_llama(tok, seed=0)
    train = addition_dataset(int(opt["n_train"]), seed=0, corruption=Corruption("random", 0.3))
    queries = query_dataset_from(addition_dataset(6, seed=1))
    ga = int(opt["ga"])
    global_batch = 4
    save_steps = int(opt["save_steps"])
    plain = opt["trainer"] == "callback"
    from drift_trainer import DriftTrainingArguments

    args = (DriftTrainingArguments if plain else DriftConfig)(
        output_dir=os.path.join(out_dir, "run"),
        max_steps=int(opt["steps"]),
        per_device_train_batch_size=global_batch // world // ga,
        gradient_accumulation_steps=ga,
        learning_rate=float(opt["lr"]),
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        use_cpu=True,
        bf16=opt["bf16"] == "1",
        gradient_checkpointing=opt["gc"] == "1",
        seed=0,
        deepspeed=ds_config,
        accelerator_config={"use_configured_state": True} if ds_config else None,
        ddp_backend="gloo" if world > 1 else None,  # plain DDP over CPU ranks
        drift_enabled=opt["drift"] == "1",
        drift_refresh_steps=int(opt["every"]),
        drift_first_refresh_step=int(opt["first"]),
        drift_num_queries=3,
        drift_num_rollouts=4,
        drift_rollout_batch_size=4,  # 3 generate calls: rank 0 makes two, rank 1 one (plus a discarded spare)
        drift_max_new_tokens=4,
        drift_progress=False,
        drift_uniform_mix=float(opt["mix"]),
        drift_score_ema=0.0,
        drift_feature_batch_size=4,
        drift_capture_features=opt["capture"] == "1",
        drift_rescore_budget=float(opt["budget"]),
        drift_capture_check_rows=int(opt["check"]),
        **fsdp,
    )
    peft_config = None
    if opt["lora"] == "1":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights="gaussian"
        )

    def reward(prompts, completions, **kw):
        return [float(c[:1].isdigit()) for c in completions]

    drawn = []
    original_iter = DriftSampler.__iter__

    def recording_iter(self):
        for i in original_iter(self):
            drawn.append(int(i))
            yield i

    DriftSampler.__iter__ = recording_iter
    if plain:
        from transformers import DataCollatorForSeq2Seq, Trainer

        from drift_trainer import DriftCallback
        from tests.helpers import tokenize_dataset

        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=tokenize_dataset(tok, train),
            data_collator=DataCollatorForSeq2Seq(tok, padding=True),
            processing_class=tok,
        )
        trainer.drift_callback = DriftCallback(query_dataset=queries, reward_funcs=reward).attach(trainer)
    else:
        trainer = tiny_trainer(model, tok, args, train, queries, reward_funcs=reward, peft_config=peft_config)
    from transformers import TrainerCallback

    param_sums, sharded = {}, {}

    class ParamSum(TrainerCallback):  # a fingerprint of the weights each rank holds after every step
        def on_step_end(self, args, state, control, model=None, **kwargs):
            from torch.distributed.tensor import DTensor

            params = list(model.parameters())
            sharded[state.global_step] = [sum(isinstance(p, DTensor) for p in params), len(params)]
            local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
            param_sums[state.global_step] = float(sum(p.detach().double().abs().sum() for p in local))

    trainer.add_callback(ParamSum())
    if opt["resume_from"]:  # the checkpoint of an earlier run of this launch, copied in once every rank is here
        import shutil

        import torch.distributed as td

        if rank == 0:
            src = opt["resume_from"]
            shutil.copytree(src, os.path.join(args.output_dir, os.path.basename(src)))
        if td.is_initialized():
            td.barrier()
    trainer.train(resume_from_checkpoint=opt["resume"] == "1" or None)
    state = trainer.drift_callback.drift_state
    result = {
        "rank": rank,
        "world": world,
        "drawn": drawn,
        "weights": None if state.weights is None else np.asarray(state.weights).tolist(),
        "scores": None if state.scores is None else np.asarray(state.scores).tolist(),
        "num_scored": [h.get("num_scored") for h in state.history],
        "num_recomputed": [h.get("num_recomputed") for h in state.history],
        "agreement": [h.get("capture_agreement") for h in state.history],
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "num_refreshes": state.num_refreshes,
        "param_sums": param_sums,
        "sharded": sharded,  # per step: [DTensor parameters, parameters]
        "model_class": type(trainer.model).__name__,
        # the files of this run's first checkpoint (each rank saves its own captured-feature cache there)
        "checkpoint_files": first_checkpoint_files(args.output_dir),
        "feature_names": trainer.drift_callback.projector.names if trainer.drift_callback.projector else [],
    }
    DriftSampler.__iter__ = original_iter
    from accelerate.state import AcceleratorState, GradientState

    # the next run of this launch builds its own Accelerator (accelerate refuses a second one with a DeepSpeed
    # plugin); the process group stays
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
