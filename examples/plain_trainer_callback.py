"""DRIFT in a plain transformers.Trainer through DriftCallback (runs on CPU in about a minute).

    python examples/plain_trainer_callback.py --output_dir out-plain --max_steps 200 --drift_refresh_steps 50
"""

from transformers import DataCollatorForSeq2Seq, HfArgumentParser, Trainer

from drift_trainer import DriftCallback, DriftTrainingArguments, exact_match
from drift_trainer.cli.toy import (
    Corruption,
    addition_dataset,
    build_char_tokenizer,
    build_tiny_llama,
    query_dataset_from,
)


def main():
    (args,) = HfArgumentParser(DriftTrainingArguments).parse_args_into_dataclasses()
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(tokenizer)
    train = addition_dataset(2000, seed=0, corruption=Corruption("systematic", 0.3))
    queries = query_dataset_from(addition_dataset(64, seed=1))

    def tokenize(row):  # a plain Trainer needs tokenized rows: labels -100 on the prompt
        prompt = tokenizer(row["prompt"])["input_ids"]
        completion = tokenizer(row["completion"])["input_ids"] + [tokenizer.eos_token_id]
        return {"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion}

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train.map(tokenize, remove_columns=train.column_names),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        processing_class=tokenizer,
    )
    callback = DriftCallback(query_dataset=queries, reward_funcs=exact_match).attach(trainer)
    trainer.train()
    print("refreshes:", callback.drift_state.num_refreshes, "rollout accuracy:", callback.drift_state.rollout_accuracy)


if __name__ == "__main__":
    main()
