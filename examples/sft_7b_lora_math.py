"""DRIFT on a 7B model from the hub: LoRA, DeepSpeed ZeRO-3, bf16, gradient checkpointing, a math reward.

    accelerate launch --config_file examples/accelerate_zero3.yaml examples/sft_7b_lora_math.py \
        --model_name_or_path Qwen/Qwen2.5-7B --output_dir out-7b \
        --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --bf16 true \
        --drift_refresh_steps 200 --drift_num_queries 64 --drift_num_rollouts 8 --drift_max_new_tokens 512

CI runs it for a few steps on CPU with `--bf16 true` against a tiny local model and local files with the same columns
(tests/test_examples.py); the 7B run itself needs a GPU and the hub. It uses the code paths the tests cover: DriftConfig
parsed by TrlParser, DriftSFTTrainer with peft_config, ZeRO-3 generation through TRL's gathered-weights context,
LoRA-module features, sharded attribution over ranks, and checkpoint/resume of the sampler.
"""

from dataclasses import dataclass, field

from peft import LoraConfig
from trl import TrlParser

from drift_trainer import DriftConfig, DriftSFTTrainer, math_answer
from drift_trainer.cli.datafiles import load_dataset_from


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(default="Qwen/Qwen2.5-7B", metadata={"help": "Hub id or local path."})
    train_dataset: str = field(default="meta-math/MetaMathQA", metadata={"help": "Train set (prompt-completion)."})
    query_dataset: str = field(default="openai/gsm8k", metadata={"help": "Validation queries with answers."})
    query_config: str = field(default="main", metadata={"help": "Hub config of the query set (ignored for files)."})
    num_queries: int = field(default=256, metadata={"help": "Rows of the query set kept."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})


def main():
    script, args = TrlParser((ScriptArguments, DriftConfig)).parse_args_and_config()
    # hub ids, or local .jsonl / .json / .parquet files and save_to_disk directories with the same columns
    train = load_dataset_from(script.train_dataset, split="train")
    train = train.map(lambda r: {"prompt": r["query"], "completion": r["response"]}, remove_columns=train.column_names)
    queries = load_dataset_from(script.query_dataset, split="test", name=script.query_config)
    queries = queries.select(range(min(script.num_queries, len(queries))))
    # the reward reads `answer`; GSM8K solutions end with "#### <number>", which math_answer extracts
    queries = queries.map(lambda r: {"prompt": r["question"], "answer": r["answer"]}, remove_columns=["question"])
    trainer = DriftSFTTrainer(
        model=script.model_name_or_path,
        args=args,
        train_dataset=train,
        query_dataset=queries,
        reward_funcs=math_answer,
        peft_config=LoraConfig(r=script.lora_r, lora_alpha=2 * script.lora_r, target_modules="all-linear"),
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()


if __name__ == "__main__":
    main()
