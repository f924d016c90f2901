"""DriftDPOTrainer: ``trl.DPOTrainer`` with a data-value scorer that reweights or selects preference pairs.

``drift_method`` picks the scorer:

- ``uniform``: TRL's DPO untouched (same batches, same loss, same numbers);
- ``ica``: in-context approximation scores (:mod:`drift_trainer.methods.ica`), min-max weights, computed at the start;
- ``lossdiff_irm``: after ``drift_lossdiff_warmup_epochs`` of DPO on all pairs, keep the pairs in the middle bands of
  LossDiff and IRM (:mod:`drift_trainer.methods.lossdiff`); the rest get weight 0;
- ``drift``: signed on-policy influence, every ``drift_refresh_steps`` steps: rollouts on ``query_dataset`` judged by
  ``reward_funcs`` sign the target, and a pair's "loss" is ``-(log p(y_w|x) - log p(y_l|x))``.

``drift_pair_bound=True`` (any method) first removes from the train set, for the whole run, the pairs whose
start-model margin is below every validation pair's (:class:`~drift_trainer.hf.pair_callbacks.PairBound`).

Weights enter the loss per pair, ``sum_i w_i L_i / sum_i w_i`` over each batch (pairs are never resampled), with the
per-pair losses in :data:`drift_trainer.methods.pairs.PAIR_LOSSES` (DPO ``sigmoid``, ``hinge``, ``ipo``, ``sigmoid_norm``,
and ``simpo``, which TRL 1.16's DPOTrainer does not offer: reference-free, length-normalised, margin
``simpo_gamma``). Single process: the scorers of this module do not shard pairs over ranks yet.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOConfig, DPOTrainer

from drift_trainer.cli.datafiles import example_text
from drift_trainer.core.dist import Dist
from drift_trainer.core.rewards import resolve_reward_funcs
from drift_trainer.core.rollouts import check_query_dataset
from drift_trainer.core.sampler import DriftSampler
from drift_trainer.core.state import STATE_FILE, DriftState
from drift_trainer.hf.callback import SAMPLER_FILE
from drift_trainer.hf.config import REWEIGHT_MODES, WEIGHTINGS, DriftArguments, coerce_config
from drift_trainer.hf.fields import _help
from drift_trainer.hf.ica_callback import ICACallback
from drift_trainer.hf.index import INDEX_COLUMN, prepare_index, with_index
from drift_trainer.hf.method_options import ICAArguments, PreferenceArguments
from drift_trainer.hf.pair_callbacks import LossDiffCallback, PairBound, PairDriftCallback
from drift_trainer.methods.lossdiff import band_mask, copy_model
from drift_trainer.methods.pairs import (
    PAIR_LOSSES,
    REFERENCE_FREE,
    PairLogps,
    implicit_rewards,
    pair_logps,
    pair_losses,
)

logger = logging.getLogger("drift_trainer")


@dataclass
class DriftDPOConfig(DriftArguments, ICAArguments, PreferenceArguments, DPOConfig):
    """``trl.DPOConfig`` plus the scorer options, for :class:`DriftDPOTrainer`.

    ``loss_type`` also accepts ``"simpo"``. The ``drift_*`` options of DRIFT (refresh schedule, projection,
    debiasing, weighting) apply to ``drift_method="drift"``; ``drift_ica_*`` to ``ica``.
    """

    drift_reweight_mode: str = field(
        default="loss",
        metadata={
            "help": "How the pair weights act. `loss` (the default for preference data): TRL's batch order, each "
            "pair's loss scaled by its weight, `sum_i w_i L_i / sum_i w_i`. `sampler`: pairs drawn by weight "
            "(`drift_sampling`: `systematic`, `ordered` or `replacement`), each in the batch at weight 1; LossDiff-IRM's 0/1 "
            "weights then never draw the pairs it drops.",
            "choices": list(REWEIGHT_MODES),
        },
    )

    drift_weighting: str = field(
        default="mixture",
        metadata=_help(
            "How DRIFT's pair scores become weights; the rules are those of `DriftConfig.drift_weighting`. Default "
            "`mixture` for preference pairs: every pair keeps weight 1 except a separate low group of a two-Gaussian "
            "mixture of the scores. On the preference benchmark (32 paired seeds) it ties uniform DPO, -0.000 "
            "[-0.003, +0.003] held-out preference accuracy, where `softmax` (the SFT default) gave -0.003 [-0.011, "
            "+0.005] (see benchmarks/results/preference_mixture.md).",
            WEIGHTINGS,
        ),
    )

    drift_harm_gate: bool = field(
        default=False,
        metadata={
            "help": "Not for preference pairs (the gate's loss test compares language-modelling losses); must stay "
            "False."
        },
    )

    def __post_init__(self):
        self.validate_drift()
        for name in ("drift_reference_bound", "drift_harm_gate"):
            if getattr(self, name):
                raise ValueError(
                    f"{name} compares a train row's language-modelling loss with the reference answers'; a "
                    f"preference pair's loss is not on that scale. Set {name}=False for DriftDPOTrainer."
                )
        self.validate_ica()
        self.validate_preference()
        super().__post_init__()


class DriftDPOTrainer(DPOTrainer):
    """``DPOTrainer`` whose pairs are reweighted or selected by ``args.drift_method`` (see the module docstring).

    Takes every ``DPOTrainer`` argument, plus:

    Args:
        query_dataset, reward_funcs: ``drift`` only, as for :class:`~drift_trainer.DriftSFTTrainer`.
        holdout_dataset: ``ica`` only: ``prompt`` + ``chosen`` (or ``completion``) examples used as demonstrations.
        embedding_fn: ``ica`` only: ``f(texts) -> (n, d)`` for retrieval (default: the model's mean hidden state).
        validation_dataset: ``lossdiff_irm``: preference pairs theta_val trains on; ``drift_pair_bound``: the clean
            pairs whose start-model margins bound the train pairs'.
        validation_model: ``lossdiff_irm`` only: an already trained theta_val (skips training it).

    After training, ``trainer.pair_weights`` holds the weights (one per row of ``train_dataset``) and
    ``trainer.pair_scores`` the scores (``ica``: ``score``; ``lossdiff_irm``: ``lossdiff``, ``irm``, ``keep``;
    ``drift``: ``score``).
    """

    def __init__(
        self,
        model,
        ref_model=None,
        args: DriftDPOConfig | None = None,
        train_dataset=None,
        query_dataset=None,
        reward_funcs=None,
        holdout_dataset=None,
        embedding_fn=None,
        validation_dataset=None,
        validation_model=None,
        **kwargs,
    ):
        if args is None:
            args = DriftDPOConfig(output_dir="DriftDPO")
        else:
            args = coerce_config(args, DriftDPOConfig)
        method = args.drift_method if args.drift_enabled else "uniform"
        self.drift_method = method
        self._own_loss = any(t in REFERENCE_FREE for t in args.loss_type)
        user_train = train_dataset
        self._user_train = user_train
        num_pairs = len(user_train) if user_train is not None else 0
        bound = bool(getattr(args, "drift_pair_bound", False))
        if bound:
            check_pair_bound(args, validation_dataset)
        if method != "uniform" or bound:
            check_pair_method(method, args, train_dataset)
            train_dataset = with_index(train_dataset)
        if method == "lossdiff_irm" and validation_dataset is None and validation_model is None:
            raise ValueError("drift_method='lossdiff_irm' needs a validation_dataset (or a trained validation_model).")
        initial = None
        if method == "lossdiff_irm" and validation_model is None:
            if any(hasattr(p, "ds_id") for p in model.parameters()):
                raise ValueError(
                    "drift_method='lossdiff_irm' trains theta_val from a copy of the initial model, but this model's "
                    "weights are already partitioned by DeepSpeed ZeRO-3 (it was loaded after a ZeRO-3 config was "
                    "set), so it cannot be copied. Pass validation_model= (theta_val: the start model trained on the "
                    "validation pairs), or load the model before creating the DriftDPOConfig."
                )
            initial = copy_model(model)
        self.reward_funcs = resolve_reward_funcs(reward_funcs)
        if method == "drift":
            check_query_dataset(query_dataset)
            if not self.reward_funcs:
                raise ValueError("drift_method='drift' needs reward_funcs (e.g. 'exact_match').")
        super().__init__(model=model, ref_model=ref_model, args=args, train_dataset=train_dataset, **kwargs)
        self.pair_scorer = None
        self.drift_sampler: DriftSampler | None = None
        self._sampler_weights = None  # the weights the sampler holds
        self._row_user_index: np.ndarray | None = None
        if method == "ica":
            self.pair_scorer = ICACallback(self, user_train, holdout_dataset, args, embedding_fn)
        elif method == "lossdiff_irm":
            self.pair_scorer = LossDiffCallback(self, validation_dataset, validation_model, initial, num_pairs)
        elif method == "drift":
            self.pair_scorer = PairDriftCallback(self, query_dataset, self.reward_funcs, num_pairs)
        # drift_pair_bound: measured on the start model when train() is called, before the train set is loaded
        self.pair_bound = PairBound(self, validation_dataset, num_pairs) if bound else None
        if bound or self.pair_scorer is not None:
            prepare_index(self)
        if bound:
            self.add_callback(self.pair_bound)  # saves the bound into each checkpoint
        if self.pair_scorer is not None:
            self.add_callback(self.pair_scorer)
            self.add_callback(_SamplerSync(self))  # after the scorer: new weights reach the sampler at once

    # ------------------------------------------------------------------ state
    @property
    def pair_weights(self) -> np.ndarray | None:
        """Weights of the user's train pairs (one per row of ``train_dataset``), or None before the first scoring:
        the scorer's, with 0 for the pairs ``drift_pair_bound`` dropped (they never reach the scorer)."""
        weights = self._scorer_weights
        keep = None if self.pair_bound is None else self.pair_bound.keep
        if keep is None or weights is None:
            return weights if keep is None else keep
        return np.where(keep > 0, np.asarray(weights, dtype=np.float64), 0.0)

    @property
    def _scorer_weights(self) -> np.ndarray | None:
        """What the loss and the sampler use: the scorer's weights (the bound's dropped pairs are not in the train
        set at all)."""
        return None if self.pair_scorer is None else self.pair_scorer.weights

    @property
    def pair_scores(self) -> dict[str, np.ndarray]:
        return {} if self.pair_scorer is None else self.pair_scorer.pair_scores

    @property
    def drift_state(self) -> DriftState:
        """The scorer's state as for SFT (weights, scores, one history entry per scoring); written as
        ``drift_state.json`` into every checkpoint and restored from it on resume. Empty for ``uniform``."""
        return DriftState() if self.pair_scorer is None else self.pair_scorer.state()

    def pair_texts(self):
        """``(user index, readable text)`` of each train pair (``examples.jsonl``, read by the report)."""
        data = self._user_train
        for i in range(len(data) if data is not None else 0):
            row = data[i]
            yield (
                i,
                " | ".join(
                    f"{k}: {example_text({'text': row[k]})}" for k in ("prompt", "chosen", "rejected") if k in row
                ),
            )

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; with ``drift_pair_bound``, first the bound (from the checkpoint on resume, else measured
        on the model as it is, the start model) and the train set without the pairs it drops."""
        if self.pair_bound is not None and self.pair_bound.keep is None:
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                checkpoint = get_last_checkpoint(self.args.output_dir)
            if not (isinstance(checkpoint, str) and self.pair_bound.restore(checkpoint)):
                self.pair_bound.measure()
            self.train_dataset = self.pair_bound.kept(self.train_dataset)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.pair_scorer is None or checkpoint is None:
            return
        path = os.path.join(checkpoint, STATE_FILE)
        if os.path.exists(path):
            with open(path) as f:
                self.pair_scorer.restore(DriftState.from_dict(json.load(f)))
        path = os.path.join(checkpoint, SAMPLER_FILE)
        if self.drift_sampler is not None and os.path.exists(path):
            with open(path) as f:
                self.drift_sampler.load_state_dict(json.load(f))
            self._sampler_weights = self._scorer_weights

    # ------------------------------------------------------------------ sampler mode
    @property
    def samples_by_weight(self) -> bool:
        return self.pair_scorer is not None and self.args.drift_reweight_mode == "sampler"

    def _get_train_sampler(self, train_dataset=None):
        if not self.samples_by_weight:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self.drift_sampler = DriftSampler(len(dataset), seed=seed, mode=self.args.drift_sampling)
        self._row_user_index = np.asarray(dataset[INDEX_COLUMN], dtype=np.int64)
        return self.drift_sampler

    def _sync_sampler(self) -> None:
        """Hand the scorer's newest weights to the sampler (from the next row it draws)."""
        weights = self._scorer_weights
        if self.drift_sampler is None or weights is None or weights is self._sampler_weights:
            return
        self._sampler_weights = weights
        rows = np.asarray(weights, dtype=np.float64)[self._row_user_index]
        if rows.sum() > 0:
            self.drift_sampler.update(rows)

    @property
    def pair_history(self) -> list[dict]:
        """One entry per scoring (for ``drift``: the refresh summaries)."""
        return [] if self.pair_scorer is None else self.pair_scorer.history

    def prepared_rows(self) -> list[dict]:
        """The TRL-prepared train pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``drift_index``)."""
        cols = [
            c
            for c in ("prompt_ids", "chosen_ids", "rejected_ids", INDEX_COLUMN)
            if c in self.train_dataset.column_names
        ]
        return list(self.train_dataset.select_columns(cols).with_format("python"))

    def reference_logps(self, rows) -> PairLogps | None:
        """Reference log-probabilities of prepared pairs (None for a reference-free loss)."""
        if all(t in REFERENCE_FREE for t in self.args.loss_type):
            return None
        pad = self.processing_class.pad_token_id
        bs = self.args.drift_ica_batch_size
        if self.ref_model is not None:
            return pair_logps(self.accelerator.unwrap_model(self.ref_model), rows, pad, bs, Dist())
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                return pair_logps(model, rows, pad, bs, Dist())
        raise ValueError("Scoring pairs needs a reference model: pass ref_model=, or train a PEFT adapter.")

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = inputs.pop(INDEX_COLUMN, None)
        weights = self._scorer_weights
        if self.samples_by_weight:  # the weights act through the draw (synced by _SamplerSync); each pair counts once
            weights = None
        use_weights = weights is not None and index is not None and model.training
        if not (self._own_loss or use_weights):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        w = None
        if use_weights:
            w = torch.as_tensor(np.asarray(weights)[index.cpu().numpy()], dtype=torch.float32)
        return self._pair_loss(model, inputs, w, return_outputs)

    def _pair_loss(self, model, inputs, weights: torch.Tensor | None, return_outputs: bool = False):
        """Per-pair preference loss averaged with ``weights``: ``sum_i w_i L_i / sum_i w_i`` (plain mean if None)."""
        mode = "train" if self.model.training else "eval"
        non_model = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        model_kwargs = {k: v for k, v in inputs.items() if k not in non_model}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[..., 1:]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = shift_mask.size(1)
        logps = outputs.log_probs[:, -seq_len:].sum(dim=1)
        ntok = shift_mask.sum(dim=1).to(logps.dtype)
        chosen, rejected = logps.chunk(2, dim=0)
        n_chosen, n_rejected = ntok.chunk(2, dim=0)
        ref_chosen = ref_rejected = None
        if not all(t in REFERENCE_FREE for t in self.loss_types):
            if self.precompute_ref_logps:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                ref_chosen, ref_rejected = self.compute_ref_log_probs(
                    self.ref_model if self.ref_model is not None else self.model, inputs
                )
        per = pair_losses(
            self.loss_types,
            self.loss_weights,
            self.beta,
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            n_chosen,
            n_rejected,
            self.args.simpo_gamma,
        )
        if weights is None:
            loss = per.mean()
        else:
            w = weights.to(per.device, per.dtype)
            loss = (w * per).sum() / w.sum().clamp(min=1e-12)
        with torch.no_grad():
            rc = implicit_rewards(self.loss_types, self.beta, chosen.detach(), ref_chosen, n_chosen)
            rr = implicit_rewards(self.loss_types, self.beta, rejected.detach(), ref_rejected, n_rejected)
            m = self._metrics[mode]
            m["rewards/chosen"].append(self.accelerator.gather(rc).mean().item())
            m["rewards/rejected"].append(self.accelerator.gather(rr).mean().item())
            m["rewards/accuracies"].append(self.accelerator.gather((rc > rr).float()).mean().item())
            m["rewards/margins"].append(self.accelerator.gather(rc - rr).mean().item())
            m["logps/chosen"].append(self.accelerator.gather(chosen.detach()).mean().item())
            m["logps/rejected"].append(self.accelerator.gather(rejected.detach()).mean().item())
            if weights is not None:
                m["drift/batch_weight_mean"].append(float(weights.mean()))
        return (loss, outputs) if return_outputs else loss


class _SamplerSync(TrainerCallback):
    """In ``drift_reweight_mode="sampler"``: right after the scorer's events, hand new weights to the sampler."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._sync_sampler()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._sync_sampler()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer._sync_sampler()


def check_pair_bound(args, validation_dataset) -> None:
    """Raise unless ``drift_pair_bound`` can run: clean validation pairs to compare with, one process."""
    if validation_dataset is None:
        raise ValueError(
            "drift_pair_bound=True compares each train pair's start-model margin with clean validation pairs: pass "
            "validation_dataset= (prompt, chosen, rejected), or set drift_pair_bound=False."
        )
    if args.world_size > 1:
        raise ValueError(
            f"drift_pair_bound=True runs in one process only (its start-model forwards are not split over ranks; "
            f"this run has {args.world_size}). Set drift_pair_bound=False, or run on one process."
        )


def check_pair_method(method: str, args, train_dataset) -> None:
    """Raise unless ``method`` can score pairs for this run: a per-pair loss it implements, a map-style train set.
    Several processes are fine: the scoring forwards are split over the ranks (the same number on each)."""
    unsupported = [t for t in args.loss_type if t not in PAIR_LOSSES]
    if unsupported:
        raise ValueError(
            f"drift_method={method!r} reweights pairs with its own per-pair loss, which implements "
            f"loss_type in {list(PAIR_LOSSES)}; got {unsupported}. Use drift_method='uniform' for the others."
        )
    if args.ld_alpha is not None or args.f_divergence_type != "reverse_kl" or args.use_weighting:
        raise ValueError(
            f"drift_method={method!r} does not support ld_alpha, a non-default f_divergence_type or "
            "use_weighting; leave them at their defaults or use drift_method='uniform'."
        )
    if train_dataset is None or not hasattr(train_dataset, "add_column"):
        raise ValueError("DriftDPOTrainer scorers need a map-style datasets.Dataset train_dataset.")


__all__ = ["DriftDPOConfig", "DriftDPOTrainer", "PreferenceArguments", "band_mask"]
