"""DriftSFTTrainer: ``trl.SFTTrainer`` with DRIFT wired in (a drop-in replacement)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from trl import SFTConfig, SFTTrainer

from drift_trainer.hf.callback import DriftCallback, resolve_drift_args
from drift_trainer.hf.config import DriftConfig, coerce_config
from drift_trainer.hf.ica_callback import ICACallback
from drift_trainer.hf.index import INDEX_COLUMN, check_train_dataset, prepare_index, with_index


class DriftSFTTrainer(SFTTrainer):
    """``SFTTrainer`` that refines its train-data distribution while it trains (DRIFT).

    Takes every ``SFTTrainer`` argument, plus:

    Args:
        query_dataset: validation queries (``datasets.Dataset`` with a ``prompt`` column, text or messages, plus the
            columns the reward functions read, e.g. ``answer``).
        reward_funcs: one reward function or a list (summed), TRL convention
            ``f(prompts, completions, **columns) -> list[float]``, or a built-in name (``"exact_match"``,
            ``"math_answer"``).
        holdout_dataset: ``drift_method="ica"`` only: ``prompt`` + ``completion`` examples retrieved as in-context
            demonstrations (no query_dataset or reward_funcs needed then).
        embedding_fn: ``drift_method="ica"`` only: ``f(texts) -> (n, d) array`` used to retrieve the holdout examples
            nearest to each prompt. Default: mean-pooled last hidden states of the model being trained.

    ``args`` is a :class:`~drift_trainer.DriftConfig`; a plain ``SFTConfig`` is converted with DRIFT defaults. After
    ``train()``, ``trainer.drift_state`` holds the latest scores and weights (one per row of ``train_dataset``).
    """

    def __init__(
        self,
        model,
        args: DriftConfig | SFTConfig | None = None,
        train_dataset=None,
        query_dataset=None,
        reward_funcs=None,
        holdout_dataset=None,
        embedding_fn=None,
        **kwargs,
    ):
        if args is None:
            name = (
                model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "model")
            )
            args = DriftConfig(output_dir=f"{str(name).split('/')[-1] or 'model'}-DRIFT")
        else:
            args = coerce_config(args, DriftConfig)
        drift_args = resolve_drift_args(None, args)
        self._ica = drift_args.drift_enabled and getattr(args, "drift_method", "drift") == "ica"
        user_train = train_dataset
        if self._ica:  # ICA replaces the DRIFT refreshes: an inert DriftCallback, the index column, loss weights
            check_ica_inputs(args, train_dataset)
            callback = DriftCallback(args=dataclasses.replace(drift_args, drift_enabled=False))
            train_dataset = with_index(train_dataset)
        else:
            # the callback captures features in the training backward through compute_loss below (DRIFT refreshes
            # only; block rescoring, drift_max_train_examples, is its own speed-up: asking for it turns capture off)
            callback = DriftCallback(
                query_dataset=query_dataset,
                reward_funcs=reward_funcs,
                num_examples=len(train_dataset)
                if drift_args.drift_enabled and hasattr(train_dataset, "__len__")
                else None,
                capture_features=drift_args.drift_enabled
                and drift_args.drift_capture_features
                and drift_args.drift_max_train_examples is None,
                applies_loss_weights=True,
                fused_lm_head=True,  # SFTTrainer patches the model with TRL's fused LM head
            )
            if drift_args.drift_enabled:
                callback.validate(drift_args, train_dataset, args)
                check_loss_mode(drift_args, args)
                train_dataset = with_index(train_dataset)
        self.drift_callback = callback
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        callback.attach(self)
        if self._drift_loss_mode and self.compute_loss_func is not None:
            raise ValueError(
                "Per-example loss weights (drift_reweight_mode='loss', drift_method='ica') reweight TRL's default NLL "
                "loss, which compute_loss_func replaces. Drop compute_loss_func, or use drift_reweight_mode='sampler'."
            )
        self.ica_callback = None
        if self._ica:
            self.ica_callback = ICACallback(self, user_train, holdout_dataset, args, embedding_fn)
            self.add_callback(self.ica_callback)
        if self._drift_loss_mode or callback.capture_features:
            prepare_index(self)  # batches carry drift_index: for loss weights, or to file captured features by row

    @property
    def _drift_loss_mode(self) -> bool:
        if getattr(self, "_ica", False):
            return True  # ICA weights are always per-example loss weights
        return self.drift_callback.enabled and self.drift_callback.args.drift_reweight_mode == "loss"

    def _drift_loss_weights(self):
        """Per user example loss weights (mean 1), or None before the first refresh."""
        if getattr(self, "ica_callback", None) is not None:
            w = self.ica_callback.weights
            # ICA weights are in [0, 1]: scaled to mean 1, the token-mean loss becomes sum_i w_i L_i / sum_i w_i in
            # expectation and equals the plain SFT loss when every weight is equal
            return None if w is None or w.mean() <= 0 else w / w.mean()
        return self.drift_callback.loss_weights

    @property
    def drift_state(self):
        """Latest refresh: ``step``, ``scores``, ``weights`` (numpy, one per train example), ``rollout_accuracy``,
        ``history``."""
        return self.drift_callback.drift_state

    def _get_train_sampler(self, train_dataset=None):
        if self.drift_callback.enabled and self.drift_callback.args.drift_reweight_mode == "sampler":
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            return self.drift_callback.make_sampler(len(dataset), self.args)
        return super()._get_train_sampler(train_dataset)

    def training_step(self, *args, **kwargs):
        try:
            return super().training_step(*args, **kwargs)
        finally:
            if self.drift_callback.capture is not None:
                self.drift_callback.capture.flush()  # the backward has run: file the features, disarm the hooks

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's own ``compute_loss`` (its loss, its metrics), with DRIFT's two additions on train batches: each
        row's loss weight (``drift_reweight_mode="loss"``, ICA) and the capture of its feature in the backward.

        Both go through one forward hook on whatever module runs the forward (DDP, a DeepSpeed engine or the model):
        it files the fused LM head's per-token log-probabilities for the capture (their gradient carries each row's
        loss scale) and scales them by the rows' weights, so TRL's NLL becomes ``sum_i w_i sum_t l_it / N``.
        """
        index = inputs.pop(INDEX_COLUMN, None)
        training = index is not None and model.training  # train rows (only they carry an index), in a train step
        weights = self._drift_loss_weights() if training else None
        due = training and torch.is_grad_enabled() and self.drift_callback.capture_due(self.state.global_step)
        capture = self.drift_callback.capture if due else None
        if weights is None and capture is None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        rows = index.cpu().numpy()
        row_weights = None if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float64)[rows])
        if capture is not None:
            capture.arm(self.drift_callback.capture_rows(rows), self.state.global_step)
        fused = []

        def hook(module, args, output):
            log_probs = getattr(output, "log_probs", None)
            if log_probs is None or fused:  # not the fused head's output, or a later forward (TRL's metrics pass)
                return None
            fused.append((log_probs, getattr(output, "label_mask", None)))
            if row_weights is not None:
                output.log_probs = log_probs * row_weights.to(log_probs.device, log_probs.dtype)[:, None]
            return output

        handle = model.register_forward_hook(hook)
        try:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        finally:
            handle.remove()
        if capture is not None:  # the features are filed once this micro-batch's backward has run
            capture.watch(*(fused[0] if fused else (None, None)))
        return result


def check_ica_inputs(args, train_dataset) -> None:
    """``drift_method='ica'`` on SFT: a map-style train set and TRL's plain NLL loss (its forwards are split over
    the ranks of a multi-process run)."""
    check_train_dataset(train_dataset)
    if args.loss_type != "nll" or args.label_smoothing_factor:
        raise ValueError(
            "drift_method='ica' reweights the default NLL loss: set loss_type='nll' and label_smoothing_factor=0."
        )


def check_loss_mode(drift_args, args) -> None:
    if drift_args.drift_reweight_mode == "loss" and (args.loss_type != "nll" or args.label_smoothing_factor):
        raise ValueError(
            "drift_reweight_mode='loss' reweights the default NLL loss: set loss_type='nll' and "
            "label_smoothing_factor=0, or use drift_reweight_mode='sampler'."
        )
