"""DriftDPOTrainer: ``trl.DPOTrainer`` with a data-value scorer that reweights or selects preference pairs.

``drift_method`` picks the scorer:

- ``uniform``: TRL's DPO untouched (same batches, same loss, same numbers);
- ``ica``: in-context approximation scores (:mod:`drift_trainer.ica`), min-max weights, computed at the start;
- ``lossdiff_irm``: after ``drift_lossdiff_warmup_epochs`` of DPO on all pairs, keep the pairs in the middle bands of
  LossDiff and IRM (:mod:`drift_trainer.lossdiff`); the rest get weight 0;
- ``drift``: signed on-policy influence, every ``drift_refresh_steps`` steps: rollouts on ``query_dataset`` judged by
  ``reward_funcs`` sign the target, and a pair's "loss" is ``-(log p(y_w|x) - log p(y_l|x))``.

Weights enter the loss per pair, ``sum_i w_i L_i / sum_i w_i`` over each batch (pairs are never resampled), with the
per-pair losses in :data:`drift_trainer.pairs.PAIR_LOSSES` (DPO ``sigmoid``, ``hinge``, ``ipo``, ``sigmoid_norm``,
and ``simpo``, which TRL 1.16's DPOTrainer does not offer: reference-free, length-normalised, margin
``simpo_gamma``). Single process: the scorers of this module do not shard pairs over ranks yet.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from drift_trainer.core.features import ProjectedGradients, select_target_modules
from drift_trainer.core.influence import debias_raw, precondition, signed_target
from drift_trainer.core.refresh import FeaturePass
from drift_trainer.core.rewards import resolve_reward_funcs
from drift_trainer.core.rollouts import check_query_dataset, generate_rollouts, generation_context, sample_queries
from drift_trainer.core.signing import sign_rollouts
from drift_trainer.core.weighting import scores_to_weights, standardize
from drift_trainer.hf.callback import INDEX_COLUMN
from drift_trainer.hf.config import DriftArguments, _choice, _help, coerce_config
from drift_trainer.hf.sft_trainer import _IndexCollator
from drift_trainer.methods.ica import ICAArguments, ICACallback
from drift_trainer.methods.lossdiff import LOSSDIFF_SCORES, band_mask, score_and_select, train_validation_model
from drift_trainer.methods.pairs import (
    PAIR_LOSSES,
    REFERENCE_FREE,
    PairLogps,
    implicit_rewards,
    pair_feature_batch,
    pair_logps,
    pair_losses,
    pair_nll_loss,
)

logger = logging.getLogger("drift_trainer")
PREFERENCE_METHODS = ("uniform", "ica", "lossdiff_irm", "drift")


@dataclass
class PreferenceArguments:
    """Options of the preference scorers (``DriftDPOConfig``)."""

    drift_method: str = field(
        default="drift",
        metadata=_help(
            "Scorer of the preference pairs. `uniform`: plain TRL DPO. `ica`: in-context approximation weights "
            "(needs holdout_dataset). `lossdiff_irm`: after a warm-up, keep the pairs in the middle percentile bands "
            "of LossDiff and IRM (needs validation_dataset). `drift`: signed on-policy influence (needs "
            "query_dataset and reward_funcs).",
            PREFERENCE_METHODS,
        ),
    )
    drift_lossdiff_warmup_epochs: float = field(
        default=1.0, metadata=_help("`lossdiff_irm`: epochs of DPO on all pairs before scoring and selecting (> 0).")
    )
    drift_lossdiff_val_epochs: float = field(
        default=1.0,
        metadata=_help("`lossdiff_irm`: epochs the auxiliary model theta_val trains on the validation pairs (> 0)."),
    )
    drift_lossdiff_score: str = field(
        default="both",
        metadata=_help(
            "`lossdiff_irm`: which bands select. `both`: pairs in the middle band of LossDiff and of IRM "
            "(intersection, the paper); `lossdiff` or `irm`: one score only (truncated influence on one proxy).",
            LOSSDIFF_SCORES,
        ),
    )
    drift_lossdiff_low: float = field(default=10.0, metadata=_help("Lower percentile of the LossDiff band, [0, 100)."))
    drift_lossdiff_high: float = field(
        default=90.0, metadata=_help("Upper percentile of the LossDiff band, (low, 100].")
    )
    drift_irm_low: float = field(default=10.0, metadata=_help("Lower percentile of the IRM band, [0, 100)."))
    drift_irm_high: float = field(default=90.0, metadata=_help("Upper percentile of the IRM band, (low, 100]."))
    simpo_gamma: float = field(
        default=0.5, metadata=_help("Target reward margin of `loss_type='simpo'` (SimPO; beta is `beta`).")
    )

    def validate_preference(self) -> None:
        _choice(self, "drift_method", PREFERENCE_METHODS)
        _choice(self, "drift_lossdiff_score", LOSSDIFF_SCORES)
        for lo, hi in (("drift_lossdiff_low", "drift_lossdiff_high"), ("drift_irm_low", "drift_irm_high")):
            a, b = getattr(self, lo), getattr(self, hi)
            if not 0.0 <= a < b <= 100.0:
                raise ValueError(f"{lo} and {hi} must satisfy 0 <= low < high <= 100, got {a!r} and {b!r}.")
        for name in ("drift_lossdiff_warmup_epochs", "drift_lossdiff_val_epochs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}.")


@dataclass
class DriftDPOConfig(DriftArguments, ICAArguments, PreferenceArguments, DPOConfig):
    """``trl.DPOConfig`` plus the scorer options, for :class:`DriftDPOTrainer`.

    ``loss_type`` also accepts ``"simpo"``. The ``drift_*`` options of DRIFT (refresh schedule, projection,
    debiasing, weighting) apply to ``drift_method="drift"``; ``drift_ica_*`` to ``ica``.
    """

    def __post_init__(self):
        self.validate_drift()
        self.validate_ica()
        self.validate_preference()
        super().__post_init__()


class _PairWeights:
    """What the scorers hand the trainer: per-user-pair weights, and the scores behind them."""

    def __init__(self):
        self.weights: np.ndarray | None = None
        self.scores: dict[str, np.ndarray] = {}
        self.history: list[dict] = []


class DriftDPOTrainer(DPOTrainer):
    """``DPOTrainer`` whose pairs are reweighted or selected by ``args.drift_method`` (see the module docstring).

    Takes every ``DPOTrainer`` argument, plus:

    Args:
        query_dataset, reward_funcs: ``drift`` only, as for :class:`~drift_trainer.DriftSFTTrainer`.
        holdout_dataset: ``ica`` only: ``prompt`` + ``chosen`` (or ``completion``) examples used as demonstrations.
        embedding_fn: ``ica`` only: ``f(texts) -> (n, d)`` for retrieval (default: the model's mean hidden state).
        validation_dataset: ``lossdiff_irm`` only: preference pairs theta_val trains on.
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
        self._pairs = _PairWeights()
        user_train = train_dataset
        if method != "uniform" and args.world_size > 1:
            raise ValueError(
                f"drift_method={method!r} on preference data runs in a single process for now (its scoring passes are "
                f"not sharded across ranks); this run has {args.world_size} processes. Launch one process, or use "
                "drift_method='uniform'."
            )
        if method != "uniform":
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
            if INDEX_COLUMN not in train_dataset.column_names:
                train_dataset = train_dataset.add_column(INDEX_COLUMN, list(range(len(train_dataset))))
        self._num_pairs = len(user_train) if user_train is not None else 0
        if method == "lossdiff_irm":
            if validation_dataset is None and validation_model is None:
                raise ValueError(
                    "drift_method='lossdiff_irm' needs a validation_dataset (or a trained validation_model)."
                )
            self._initial_model = None if validation_model is not None else copy.deepcopy(model)
        self.reward_funcs = resolve_reward_funcs(reward_funcs)
        if method == "drift":
            check_query_dataset(query_dataset)
            if not self.reward_funcs:
                raise ValueError("drift_method='drift' needs reward_funcs (e.g. 'exact_match').")
        super().__init__(model=model, ref_model=ref_model, args=args, train_dataset=train_dataset, **kwargs)
        if method != "uniform":
            self.data_collator = _IndexCollator(self.data_collator)
        if method == "ica":
            self._ica = ICACallback(self, user_train, holdout_dataset, args, embedding_fn)
            self.add_callback(_Forward(self._ica, self._pairs, "score"))
        elif method == "lossdiff_irm":
            self.add_callback(_LossDiffCallback(self, validation_dataset, validation_model))
        elif method == "drift":
            self.add_callback(_PairDriftCallback(self, query_dataset))

    # ------------------------------------------------------------------ state
    @property
    def pair_weights(self) -> np.ndarray | None:
        return self._pairs.weights

    @property
    def pair_scores(self) -> dict[str, np.ndarray]:
        return self._pairs.scores

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.drift_method != "uniform" and INDEX_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, INDEX_COLUMN]

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
            return pair_logps(self.accelerator.unwrap_model(self.ref_model), rows, pad, bs)
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                return pair_logps(model, rows, pad, bs)
        raise ValueError("Scoring pairs needs a reference model: pass ref_model=, or train a PEFT adapter.")

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = inputs.pop(INDEX_COLUMN, None)
        weights = self._pairs.weights
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


class _Forward(TrainerCallback):
    """Copies an :class:`ICACallback`'s weights into the trainer's pair weights after it computes them."""

    def __init__(self, ica: ICACallback, pairs: _PairWeights, key: str):
        self.ica, self.pairs, self.key = ica, pairs, key

    def _sync(self):
        if self.ica.weights is not None:
            self.pairs.weights = self.ica.weights
            self.pairs.scores = {self.key: self.ica.scores}
            self.pairs.history = self.ica.history

    def on_train_begin(self, args, state, control, **kwargs):
        self.ica.on_train_begin(args, state, control, **kwargs)
        self._sync()

    def on_step_end(self, args, state, control, **kwargs):
        self.ica.on_step_end(args, state, control, **kwargs)
        self._sync()


def _user_array(values: np.ndarray, user_index: np.ndarray, n: int, fill: float) -> np.ndarray:
    out = np.full(n, fill, dtype=np.float64)
    out[user_index] = values
    return out


class _LossDiffCallback(TrainerCallback):
    """After the warm-up epochs: train theta_val, score LossDiff and IRM, keep the middle bands (weights 1/0)."""

    def __init__(self, trainer: DriftDPOTrainer, validation_dataset, validation_model):
        self.trainer = trainer
        self.validation_dataset = validation_dataset
        self.validation_model = validation_model
        self.done = False

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.done or (state.epoch or 0) + 1e-9 < args.drift_lossdiff_warmup_epochs:
            return
        self.done = True
        self.select(state.global_step)

    def select(self, step: int = 0) -> None:
        tr = self.trainer
        args = tr.args
        pad = tr.processing_class.pad_token_id
        rows = tr.prepared_rows()
        val_model = self.validation_model
        if val_model is None:
            val_rows = list(
                tr._prepare_dataset(self.validation_dataset, tr.processing_class, args, "validation")
                .select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
                .with_format("python")
            )
            val_model = train_validation_model(
                tr._initial_model,
                val_rows,
                tr.reference_logps(val_rows),
                args,
                pad,
                args.drift_lossdiff_val_epochs,
                seed=args.seed,
            )
            tr._initial_model = None  # free it
        policy = tr.accelerator.unwrap_model(tr.model)
        out = score_and_select(policy, val_model, tr.reference_logps, rows, args, pad, args.drift_ica_batch_size)
        ui = np.asarray([r[INDEX_COLUMN] for r in rows], dtype=np.int64)
        n = tr._num_pairs
        keep = np.zeros(n, dtype=bool)
        keep[ui] = out["keep"]
        tr._pairs.weights = keep.astype(np.float64)
        tr._pairs.scores = {
            "lossdiff": _user_array(out["lossdiff"], ui, n, np.nan),
            "irm": _user_array(out["irm"], ui, n, np.nan),
            "keep": keep,
        }
        tr._pairs.history.append({"step": step, "kept": int(keep.sum()), "num_pairs": int(n)})
        logger.info("LossDiff-IRM at step %d kept %d of %d pairs", step, int(keep.sum()), n)


class _PairDriftCallback(TrainerCallback):
    """DRIFT on preference pairs: on-policy signed influence with a pair's loss ``-(lp(y_w) - lp(y_l))``."""

    def __init__(self, trainer: DriftDPOTrainer, query_dataset):
        self.trainer = trainer
        self.query_dataset = query_dataset
        self.projector: ProjectedGradients | None = None
        self.smoothed: np.ndarray | None = None
        self.num_refreshes = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        unwrapped = self.trainer.accelerator.unwrap_model(self.trainer.model)
        self.projector = ProjectedGradients(
            select_target_modules(unwrapped, args.drift_target_modules),
            args.drift_projection_dim,
            args.drift_projection_seed,
        )

    def on_step_end(self, args, state, control, **kwargs):
        first = args.drift_first_step
        step = state.global_step
        if step >= first and (step - first) % args.drift_refresh_steps == 0:
            self.refresh(step)

    def refresh(self, step: int) -> None:
        tr, args = self.trainer, self.trainer.args
        model = tr.accelerator.unwrap_model(tr.model)
        tokenizer = getattr(tr.processing_class, "tokenizer", tr.processing_class)
        seed = int(args.seed)
        k = self.num_refreshes
        self.num_refreshes += 1
        query_rows = sample_queries(self.query_dataset, args.drift_num_queries, seed + 7919 * (k + 1))
        with generation_context(tr, model) as gen_model:
            rollouts = generate_rollouts(
                gen_model,
                tokenizer,
                self.query_dataset,
                query_rows,
                args,
                tr.reward_funcs,
                seed=seed + 104729 * (k + 1),
            )
        signs, contrast = sign_rollouts(rollouts.rewards, rollouts.query_index, args)
        acc = float(np.mean(np.asarray(rollouts.rewards) >= args.drift_reward_threshold)) if len(rollouts) else 0.0
        entry = {"step": step, "rollout_accuracy": acc, "contrast": contrast}
        tr._pairs.history.append(entry)
        if not contrast:
            logger.warning("DRIFT (pairs) refresh at step %d: no contrast, previous weights kept", step)
            return
        pad = tokenizer.pad_token_id
        bs = args.drift_feature_batch_size
        fp = FeaturePass(self.projector, pad, bs)
        live = np.flatnonzero(signs != 0)
        r_rows = rollouts.training_rows()
        rfeat, _, _ = fp.run(model, [r_rows[j] for j in live])
        target = signed_target(rfeat, signs[live])
        rows = tr.prepared_rows()
        phi = np.zeros((len(rows), self.projector.dim))
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            for s in range(0, len(rows), bs):
                batch = pair_feature_batch(rows[s : s + bs], pad, device)
                phi[s : s + bs] = self.projector.compute(model, batch, loss_fn=pair_nll_loss).features.double().numpy()
        finally:
            model.train(was_training)
        direction = target
        if args.drift_preconditioner == "fisher":
            direction = precondition(target, "fisher", phi.T @ phi / max(len(phi), 1), args.drift_damping)
        # as on the SFT path, features are loss gradients on both sides: a pair whose descent step lowers the NLL of
        # correct rollouts (and raises that of wrong ones) scores high
        raw = phi @ direction
        norms = np.linalg.norm(phi, axis=1)
        scores = debias_raw(raw, norms, args.drift_debias, args.drift_norm_exponent)
        z = standardize(scores)
        if self.smoothed is not None and args.drift_score_ema > 0:
            z = args.drift_score_ema * self.smoothed + (1 - args.drift_score_ema) * z
        self.smoothed = z
        ui = np.asarray([r[INDEX_COLUMN] for r in rows], dtype=np.int64)
        n = tr._num_pairs
        w_rows = scores_to_weights(z, args)
        tr._pairs.weights = _user_array(w_rows, ui, n, 1.0)
        tr._pairs.scores = {"score": _user_array(scores, ui, n, 0.0), "grad_norm": _user_array(norms, ui, n, 0.0)}
        entry["frac_positive"] = float((scores > 0).mean())


__all__ = ["DriftDPOConfig", "DriftDPOTrainer", "PreferenceArguments", "band_mask"]
