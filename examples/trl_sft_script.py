"""A TrlParser SFT script, as TRL users write them, turned into a DRIFT one by a two-line diff (marked below)::

    -from trl import SFTConfig, SFTTrainer
    +from drift_trainer import DriftConfig as SFTConfig, DriftSFTTrainer as SFTTrainer

Everything DRIFT needs comes from flags or the YAML config:

    python examples/trl_sft_script.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara \\
        --output_dir out --drift_query_dataset queries.jsonl --drift_reward_funcs math_answer
    python examples/trl_sft_script.py --config sft.yaml      # drift_query_dataset: queries.jsonl, ...

Local data works as well: ``--dataset_name`` a directory holding ``train.jsonl`` (and ``test.jsonl`` for
``--eval_strategy steps``).
"""

from datasets import load_dataset
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from drift_trainer import DriftConfig as SFTConfig, DriftSFTTrainer as SFTTrainer  # DRIFT: was `from trl import ...`


def main(script_args, training_args, model_args):
    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    trainer = SFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
    main(*parser.parse_args_and_config())
