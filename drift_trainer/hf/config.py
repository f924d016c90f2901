"""Configuration: every ``drift_*`` option, documented and validated.

``DriftArguments`` is a dataclass mixin. ``DriftConfig`` adds it to ``trl.SFTConfig`` (for ``DriftSFTTrainer``) and
``DriftTrainingArguments`` to ``transformers.TrainingArguments`` (for a plain ``Trainer`` with ``DriftCallback``). Both
parse with ``HfArgumentParser`` / ``TrlParser``, so ``--drift_refresh_steps 50`` works on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from transformers import TrainingArguments
from trl import SFTConfig

from drift_trainer.hf.fields import _choice, _help, _range
from drift_trainer.hf.method_options import ICAArguments, SFTMethodArguments
from drift_trainer.methods.scorers import SCORERS as SCORER_REGISTRY, scorer_help

SIGNINGS = ("correctness", "advantage")
DEBIASINGS = ("normalize", "regress", "none")
PRECONDITIONERS = ("identity", "fisher", "kronecker", "adam")
WEIGHTINGS = ("softmax", "prune", "truncate", "demote", "mixture", "flat")
SAMPLINGS = ("replacement", "systematic", "ordered")
REWEIGHT_MODES = ("sampler", "loss")
NO_CONTRAST = ("skip", "keep")
SCORERS = tuple(SCORER_REGISTRY)


@dataclass
class DriftArguments:
    """The DRIFT options. Every field is a ``--drift_*`` command-line flag; defaults are documented in each help."""

    drift_enabled: bool = field(
        default=True,
        metadata=_help("Turn DRIFT on. When False the run is plain SFT: no rollouts, no scoring, the default sampler."),
    )
    drift_query_dataset: str | None = field(
        default=None,
        metadata=_help(
            "Validation queries, when the trainer or callback is given no `query_dataset`: a local `.jsonl`, `.json` "
            "or `.parquet` file, a `Dataset.save_to_disk` directory, or a hub dataset id (split `drift_query_split`). "
            "It needs a `prompt` column (text or chat messages) plus the columns the reward functions read (e.g. "
            "`answer`). A `query_dataset` passed in Python wins."
        ),
    )
    drift_query_split: str = field(
        default="train",
        metadata=_help("Split of `drift_query_dataset` to use (for a hub id or a saved DatasetDict)."),
    )
    drift_reward_funcs: list[str] | None = field(
        default=None,
        metadata=_help(
            "Reward functions, when the trainer or callback is given no `reward_funcs`: built-in names (`exact_match`, "
            "`math_answer`) or `package.module:function`; several (space- or comma-separated) are summed. Each is "
            "called as f(prompts, completions, **columns) -> list[float], TRL's convention. `reward_funcs` passed in "
            "Python win."
        ),
    )
    drift_refresh_steps: int = field(
        default=100,
        metadata=_help("Optimizer steps between two refreshes (rollouts, features, influence, new weights)."),
    )
    drift_first_refresh_step: int | None = field(
        default=None,
        metadata=_help(
            "Global step of the first refresh (warm-up: on-policy signing needs a mix of right and wrong rollouts). "
            "Default: `drift_refresh_steps`."
        ),
    )
    drift_num_queries: int = field(
        default=32,
        metadata=_help("Validation queries sampled (seeded) from `query_dataset` at each refresh; all if fewer."),
    )
    drift_num_rollouts: int = field(default=4, metadata=_help("Rollouts sampled per query at each refresh."))
    drift_rollout_batch_size: int = field(
        default=16,
        metadata=_help(
            "Most sequences per `generate` call. Calls are chosen by length: prompts shortest first, and a call of "
            "long prompts carries fewer rows, so that no call holds more than this x (mean prompt length + "
            "`drift_max_new_tokens`) tokens."
        ),
    )
    drift_temperature: float = field(default=1.0, metadata=_help("Sampling temperature of the rollouts (> 0)."))
    drift_top_p: float = field(default=1.0, metadata=_help("Nucleus sampling top-p of the rollouts, in (0, 1]."))
    drift_max_new_tokens: int = field(default=64, metadata=_help("Maximum new tokens per rollout."))
    drift_contrast_rollouts: int = field(
        default=0,
        metadata=_help(
            "More contrast per refresh: after the first `drift_num_rollouts` per query, sample this many more "
            "rollouts for each query whose rollouts got different rewards (the queries that carry contrast). 0: off."
        ),
    )
    drift_reward_threshold: float = field(
        default=0.5,
        metadata=_help("A rollout whose summed reward is >= this counts as correct (for `correctness` signing)."),
    )
    drift_signing: str = field(
        default="correctness",
        metadata=_help(
            "How rollouts sign the validation target. `correctness`: +1 for correct, -1 for wrong rollouts, each class "
            "averaged so neither dominates by count. `advantage`: reward minus the query's mean reward (GRPO style).",
            SIGNINGS,
        ),
    )
    drift_no_contrast: str = field(
        default="skip",
        metadata=_help(
            "Queries whose rollouts all get the same verdict carry no contrast. `skip`: they get sign 0. `keep`: under "
            "`correctness` signing their rollouts keep their global sign (all-correct queries pull towards their "
            "rollouts, all-wrong ones push away). `advantage` signing gives them 0 either way.",
            NO_CONTRAST,
        ),
    )
    drift_scorer: str = field(
        default="drift",
        metadata=_help(
            "What scores the train examples at each refresh, with drift_method='drift' (every scorer shares the "
            "rollout and feature pipeline; see drift_trainer.methods.scorers). " + scorer_help(),
            SCORERS,
        ),
    )
    drift_debias: str = field(
        default="normalize",
        metadata=_help(
            "Debiasing against gradient norm. `normalize`: divide each train feature by its norm to the power "
            "`drift_norm_exponent` (1.0 = cosine-like). `regress`: remove the part of the score explained by the log "
            "gradient norm (least squares). `none`: raw inner products.",
            DEBIASINGS,
        ),
    )
    drift_norm_exponent: float = field(
        default=1.0, metadata=_help("Exponent alpha of the norm in `normalize` debiasing, in [0, 1].")
    )
    drift_preconditioner: str = field(
        default="identity",
        metadata=_help(
            "Preconditioner H in the projected space. `identity`; `fisher`: the damped empirical Fisher (mean "
            "outer product of train features); `kronecker`: per target module, the damped Kronecker factors of "
            "its k x k feature blocks, S = mean(Phi Phi^T) and A = mean(Phi^T Phi), so H^-1 G = S^-1 G A^-1 "
            "module by module (K-FAC-style, block-diagonal over modules); `adam`: Adam's second moments, as LESS "
            "does: each row's gradient is read as G / sqrt(v), with the optimizer's `exp_avg_sq` factored per module "
            "into row and column means (needs a torch Adam/AdamW optimizer; not under DeepSpeed or in `refine`).",
            PRECONDITIONERS,
        ),
    )
    drift_damping: float = field(
        default=0.1,
        metadata=_help(
            "Damping of the `fisher` / `kronecker` preconditioner (of each factor), relative to its mean eigenvalue "
            "(> 0)."
        ),
    )
    drift_loss_mix: float = field(
        default=1.0,
        metadata=_help(
            "Hybrid with the loss baseline: a rollout scorer's score becomes z(influence) + mix * z(-loss) (z: "
            "standardised over the scored examples), so high-loss rows (e.g. random label noise) lose weight too. "
            "0: influence only (>= 0). Default 1.0: the quality benchmark's choice (see benchmarks/results/quality.md)."
        ),
    )
    drift_loss_gate: bool = field(
        default=False,
        metadata=_help(
            "Scale `drift_loss_mix` by the positive part of the correlation between the influence scores and -loss "
            "over the scored rows: high loss counts against a row only as far as the rollouts corroborate it (label "
            "noise), not where hard rows help (a weak start model)."
        ),
    )
    drift_loss_ranks: bool = field(
        default=False,
        metadata=_help(
            "Combine the influence and the loss of the `drift_loss_mix` hybrid by their normal scores (each row's "
            "rank mapped through the standard normal quantile) instead of their z-scores, so that neither term's tail "
            "dominates the sum: the loss's long tail of hard rows alone then cannot put a row at the bottom."
        ),
    )
    drift_target_ema: float = field(
        default=0.0,
        metadata=_help(
            "Stable target: the unit target direction G is smoothed across refreshes, G = ema*previous + "
            "(1-ema)*current, before scoring (it lives in the fixed projected space). 0: each refresh's own target, "
            "in [0, 1)."
        ),
    )
    drift_reliability_shrink: bool = field(
        default=False,
        metadata=_help(
            "Shrink each refresh's weights toward 1 by the split-half reliability of its scores: the rollouts "
            "are split by query into two halves, each half's target scores every row, and the two score vectors' "
            "correlation r gives the reliability R = 2r/(1+r) (Spearman-Brown, clipped to [0, 1]); each weight "
            "becomes 1 + R (w - 1). Evidence that two independent halves disagree on moves the weights little."
        ),
    )
    drift_projection_dim: int = field(
        default=16,
        metadata=_help(
            "Side of the per-module random projection: each target module contributes `drift_projection_dim**2` "
            "features (P_out d)(P_in a)^T."
        ),
    )
    drift_target_modules: str = field(
        default="auto",
        metadata=_help(
            "Modules whose gradients make the features: `auto` (LoRA A/B modules on a PEFT model, otherwise every "
            "nn.Linear except the LM head), `all-linear`, or comma-separated name substrings (e.g. `q_proj,v_proj`)."
        ),
    )
    drift_target_layers: float | None = field(
        default=0.5,
        metadata=_help(
            "Keep only the target modules in the last N transformer blocks (nearest the output); a value below 1 is "
            "a fraction of the blocks, rounded up (0.5, the default: the upper half). A feature pass then "
            "runs the blocks below without an autograd graph and its backward stops at the lowest target block: "
            "cheaper features from fewer modules (benchmarks/results/overhead.md measures the speed, quality.md "
            "the quality: the upper half ties every block on each kind at 8 paired seeds). None (`null` in a YAML "
            "config): every block."
        ),
    )
    drift_feature_batch_size: int = field(
        default=16, metadata=_help("Examples per forward+backward of the feature pass.")
    )
    drift_projection_seed: int = field(
        default=1234, metadata=_help("Seed of the Gaussian projection matrices (fixed for a run).")
    )
    drift_max_train_examples: int | None = field(
        default=None,
        metadata=_help(
            "Score at most this many train examples per refresh (a speed-up for large train sets): the train set is "
            "split into seeded blocks of at most this size and each refresh rescores the next block, so every example "
            "is rescored once every ceil(n / drift_max_train_examples) refreshes; the others keep their previous "
            "(smoothed) scores. Default: rescore every example at every refresh. Setting it turns "
            "`drift_capture_features` off."
        ),
    )
    drift_capture_features: bool = field(
        default=True,
        metadata=_help(
            "Capture each trained row's feature during the ordinary training backward (two small matmuls per target "
            "module; DriftSFTTrainer only), so a refresh scores every captured row against the new target and "
            "recomputes only the stalest rows within `drift_rescore_budget`. Features are then from the step each row "
            "was last trained at (or recomputed). False: every refresh recomputes every row's feature (or the "
            "`drift_max_train_examples` block; setting `drift_max_train_examples` turns capture off)."
        ),
    )
    drift_rescore_budget: float = field(
        default=0.1,
        metadata=_help(
            "With `drift_capture_features`: rows whose features a refresh recomputes, as a multiple of the rows "
            "trained since the previous refresh (never-captured rows first, then the oldest features). 0 uses "
            "captured features only (unseen rows keep weight 1 until trained); 1.0 recomputes as many rows as were "
            "trained. A feature pass costs about as much per row as a training step, so this bounds the refresh's "
            "feature cost to about this fraction of the training time."
        ),
    )
    drift_capture_window: float | None = field(
        default=1.0,
        metadata=_help(
            "With `drift_capture_features`: capture only during the training steps just before each refresh that "
            "train about this many epochs of rows (1.0: the last epoch's worth of steps, at most the whole interval), "
            "so each captured feature is recent and the steps in between pay nothing. None (`null` in a YAML "
            "config): capture at every step."
        ),
    )
    drift_capture_check_rows: int = field(
        default=32,
        metadata=_help(
            "With `drift_capture_features`: cached rows (a seeded sample, from the stale ones when there are any) "
            "whose features each refresh recomputes to measure how far the cache still agrees with the model (their "
            "mean cosine similarity, logged as `drift/capture_agreement`). Stale rows' standardised scores are shrunk "
            "toward the mean by this agreement, so a stale feature moves its row's weight less. 0 skips the check "
            "(and the shrinkage)."
        ),
    )
    drift_capture_min_agreement: float = field(
        default=0.0,
        metadata=_help(
            "With `drift_capture_features`: when the check's agreement is below this, the refresh recomputes every "
            "row, as without capture, and two such refreshes in a row turn capture off. A refresh then costs O(train "
            "set). Default 0: never; the stale rows are recomputed within `drift_rescore_budget` (stalest first, so "
            "a full rescoring is spread over several refreshes) and shrunk by the agreement. In [0, 1]."
        ),
    )
    drift_feature_memmap_dir: str | None = field(
        default=None,
        metadata=_help(
            "Directory for a memory-mapped float32 file that holds the train features during a refresh (for train "
            "sets whose features do not fit in memory; the file is unlinked at once and freed after the refresh). "
            "Default: keep them in memory, unless they exceed `drift_feature_memory_mb`."
        ),
    )
    drift_feature_memory_mb: float = field(
        default=4096.0,
        metadata=_help(
            "Largest feature storage (train examples x feature dim x 4 bytes, per rank) kept in memory; above it the "
            "features spill to a memory-mapped file in `drift_feature_memmap_dir` (or the system temp dir)."
        ),
    )
    drift_weighting: str = field(
        default="softmax",
        metadata=_help(
            "How scores become weights. `softmax` of standardised scores over `drift_softmax_temperature`; `prune` "
            "drops the lowest `drift_prune_fraction`; `truncate` keeps scores between the percentiles "
            "`drift_truncate_low` and `drift_truncate_high` (the TIF rule); `demote` leaves every example at weight 1 "
            "except those with confident harmful evidence, a standardised score below `-drift_demote_threshold`, "
            "whose weight decays as exp((z + threshold) / drift_softmax_temperature); `mixture` fits two Gaussians to "
            "the scores and leaves every example at 1 except a separate low group, whose weight is its posterior of "
            "the upper component (no parameters; on unimodal scores almost every row keeps 1); `flat` keeps every "
            "example at 1 (the scores move no weight; with `drift_reference_bound` only the rows beyond the bound "
            "lose theirs).",
            WEIGHTINGS,
        ),
    )
    drift_reference_bound: bool = field(
        default=False,
        metadata=_help(
            "Calibrate against clean references: at each refresh, compute the loss of every sampled query's reference "
            "answer (the query dataset's `answer` column) under the current model, and set the weight of each train "
            "example whose loss exceeds all of them to 0 (before `drift_uniform_mix`, so it is still drawn at that "
            "rate). A clean example exceeds every one of n exchangeable references with probability at most 1/(n+1), "
            "so on clean data almost nothing moves, while wrong answers, which the model finds less likely than any "
            "right one, do. Applies after the `drift_weighting` rule; needs an `answer` column; SFT only."
        ),
    )
    drift_harm_gate: bool = field(
        default=True,
        metadata=_help(
            "Reweight only once the data shows harm: the weights stay exactly 1 (plain SFT's batches) until the "
            "start model or a refresh finds either more train rows whose loss exceeds every query's reference answer "
            "(see `drift_harm_max_rank`) than clean data gives (an exchangeability test; needs the queries' `answer` "
            "column, else only the other test runs), or the validation rollouts' per-query accuracy below the start "
            "model's (measured before the first step; a one-sided paired sign-flip test), either at p < "
            "`drift_harm_alpha`. From then on "
            "`drift_weighting` applies at every refresh. Default on: the quality benchmark's choice (clean data "
            "exactly plain SFT's result, the corrupted kinds as without the gate; see benchmarks/results/quality.md). "
            "Set False to reweight from the first refresh, e.g. when the start model cannot do the task yet (from "
            "random init it never shows harm). SFT only (DriftDPOConfig: off)."
        ),
    )
    drift_harm_alpha: float = field(
        default=0.01, metadata=_help("`drift_harm_gate`: the level of each of its two tests, in (0, 1).")
    )
    drift_harm_max_rank: int = field(
        default=1,
        metadata=_help(
            "`drift_harm_gate`'s loss test: it counts the train rows above the j-th largest reference loss for j = 1, "
            "2, 4, ... up to this (and up to the number of references), and takes the smallest p-value times their "
            "number (Bonferroni). 1 (default): only the rows above every reference. Larger keeps the test's power "
            "when one or two references are hard themselves, at the price of the factor. A power of two >= 1; 8 was "
            "measured and not adopted (benchmarks/README.md)."
        ),
    )
    drift_demote_threshold: float = field(
        default=1.0,
        metadata=_help("`demote` weighting: standardised score below minus this counts as harmful evidence (>= 0)."),
    )
    drift_sampling: str = field(
        default="systematic",
        metadata=_help(
            "How `sampler` mode draws rows by weight. `replacement`: independent draws (a weight-1 row is seen "
            "0, 1, 2... times per epoch). `systematic`: systematic sampling over the rest of the epoch, then "
            "shuffled: each row is drawn floor or ceil of its weight times, so a weight-1 row is seen once per epoch. "
            "`ordered`: the same counts, each yielded in its place in plain SFT's permutation, so batches stay plain "
            "SFT's batches where weights are near 1 and a row's repeats share a batch (measured worse than "
            "`systematic` in the quality benchmark, e.g. clean data -0.043 [-0.076, -0.014]).",
            SAMPLINGS,
        ),
    )
    drift_softmax_temperature: float = field(
        default=1.0, metadata=_help("Temperature of `softmax` weighting on standardised scores (> 0).")
    )
    drift_prune_fraction: float = field(
        default=0.3, metadata=_help("Share of lowest-scored examples dropped by `prune` weighting, in [0, 1).")
    )
    drift_truncate_low: float = field(
        default=10.0, metadata=_help("Lower percentile kept by `truncate` weighting, in [0, 100).")
    )
    drift_truncate_high: float = field(
        default=90.0, metadata=_help("Upper percentile kept by `truncate` weighting, in (low, 100].")
    )
    drift_uniform_mix: float = field(
        default=0.1,
        metadata=_help(
            "Mix the weights with uniform: w = (1-mix)*w + mix. 0 allows weight exactly 0; 1.0 scores without "
            "reweighting."
        ),
    )
    drift_weight_clip: float = field(
        default=5.0, metadata=_help("Largest weight (weights have mean 1), applied before the uniform mix (>= 1).")
    )
    drift_score_ema: float = field(
        default=0.5,
        metadata=_help(
            "Smoothing of standardised scores across refreshes: new = ema*previous + (1-ema)*current. 0 disables."
        ),
    )
    drift_reweight_mode: str = field(
        default="sampler",
        metadata=_help(
            "`sampler`: draw training examples by weight (with replacement, changes mid-epoch). `loss`: keep the "
            "usual order and scale each example's loss by its weight (DriftSFTTrainer only).",
            REWEIGHT_MODES,
        ),
    )
    drift_save_artifacts: bool = field(
        default=True,
        metadata=_help(
            "Write `{output_dir}/drift/refresh-{step:06d}/` (scores.parquet, rollouts.jsonl, summary.json)."
        ),
    )
    drift_progress: bool = field(default=True, metadata=_help("Show tqdm progress bars on rank 0 during a refresh."))

    def validate_drift(self) -> None:
        """Raise ``ValueError`` naming the field and the allowed values for any bad ``drift_*`` option."""
        _choice(self, "drift_signing", SIGNINGS)
        _choice(self, "drift_debias", DEBIASINGS)
        _choice(self, "drift_preconditioner", PRECONDITIONERS)
        _choice(self, "drift_weighting", WEIGHTINGS)
        _choice(self, "drift_sampling", SAMPLINGS)
        _range(self, "drift_demote_threshold", 0.0, None)
        _choice(self, "drift_reweight_mode", REWEIGHT_MODES)
        _choice(self, "drift_no_contrast", NO_CONTRAST)
        _choice(self, "drift_scorer", tuple(SCORER_REGISTRY))  # scorers registered after import count too
        for name in (
            "drift_refresh_steps",
            "drift_num_queries",
            "drift_num_rollouts",
            "drift_rollout_batch_size",
            "drift_max_new_tokens",
            "drift_projection_dim",
            "drift_feature_batch_size",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        layers = self.drift_target_layers
        if layers is not None and not (0 < layers < 1 or (layers >= 1 and float(layers).is_integer())):
            raise ValueError(
                "drift_target_layers must be a whole number of blocks >= 1, a fraction of the blocks in (0, 1), or "
                f"None for every block; got {layers!r}."
            )
        if self.drift_max_train_examples is not None and int(self.drift_max_train_examples) < 1:
            raise ValueError(
                f"drift_max_train_examples must be a positive integer (or None to score every example), got "
                f"{self.drift_max_train_examples!r}."
            )
        _range(self, "drift_feature_memory_mb", 0.0, None, low_open=True)
        _range(self, "drift_rescore_budget", 0.0, None)
        _range(self, "drift_capture_min_agreement", 0.0, 1.0)
        if self.drift_capture_window is not None:
            _range(self, "drift_capture_window", 0.0, None, low_open=True)
        if int(self.drift_capture_check_rows) < 0:
            raise ValueError(f"drift_capture_check_rows must be >= 0, got {self.drift_capture_check_rows!r}.")
        if self.drift_first_refresh_step is not None and self.drift_first_refresh_step < 1:
            raise ValueError(
                f"drift_first_refresh_step must be >= 1 (or None for drift_refresh_steps), got "
                f"{self.drift_first_refresh_step!r}."
            )
        _range(self, "drift_temperature", 0.0, None, low_open=True)
        _range(self, "drift_top_p", 0.0, 1.0, low_open=True)
        _range(self, "drift_norm_exponent", 0.0, 1.0)
        _range(self, "drift_damping", 0.0, None, low_open=True)
        _range(self, "drift_loss_mix", 0.0, None)
        _range(self, "drift_harm_alpha", 0.0, 1.0, low_open=True, high_open=True)
        rank = self.drift_harm_max_rank
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or rank & (rank - 1):
            raise ValueError(
                f"drift_harm_max_rank must be a power of two >= 1 (1, 2, 4, 8, ...), got {rank!r}: the loss test's "
                "thresholds are the 1st, 2nd, 4th, ... largest reference losses up to it."
            )
        if int(self.drift_contrast_rollouts) < 0:
            raise ValueError(f"drift_contrast_rollouts must be >= 0, got {self.drift_contrast_rollouts!r}.")
        _range(self, "drift_target_ema", 0.0, 1.0, high_open=True)
        _range(self, "drift_softmax_temperature", 0.0, None, low_open=True)
        _range(self, "drift_uniform_mix", 0.0, 1.0)
        _range(self, "drift_score_ema", 0.0, 1.0, high_open=True)
        _range(self, "drift_weight_clip", 1.0, None)
        if not 0.0 <= self.drift_prune_fraction < 1.0:
            raise ValueError(
                f"drift_prune_fraction must be in [0, 1), got {self.drift_prune_fraction!r}: a fraction of 1 prunes "
                "every example. Lower drift_prune_fraction."
            )
        if not 0.0 <= self.drift_truncate_low < self.drift_truncate_high <= 100.0:
            raise ValueError(
                "drift_truncate_low and drift_truncate_high must satisfy 0 <= low < high <= 100, got "
                f"{self.drift_truncate_low!r} and {self.drift_truncate_high!r}."
            )

    @property
    def drift_first_step(self) -> int:
        return self.drift_first_refresh_step or self.drift_refresh_steps

    def drift_options(self) -> dict:
        """The ``drift_*`` fields as a plain dict (written into each refresh's summary)."""
        return {f.name: getattr(self, f.name) for f in fields(DriftArguments)}


def coerce_config(args, cls):
    """``args`` as an instance of the config dataclass ``cls``: unchanged if it is one, else its fields that ``cls``
    knows copied into a new ``cls`` (the rest at their defaults), as TRL converts a plain ``TrainingArguments``."""
    if isinstance(args, cls):
        return args
    values = {k: v for k, v in args.to_dict().items() if not k.startswith("_")}
    return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


def drift_arguments_from(args) -> DriftArguments:
    """Copy the ``drift_*`` fields of any object that has them into a standalone ``DriftArguments``."""
    values = {f.name: getattr(args, f.name) for f in fields(DriftArguments) if hasattr(args, f.name)}
    out = DriftArguments(**values)
    out.validate_drift()
    return out


@dataclass
class DriftTrainingArguments(DriftArguments, TrainingArguments):
    """``transformers.TrainingArguments`` plus the DRIFT options, for a plain ``Trainer`` with ``DriftCallback``."""

    def __post_init__(self):
        self.validate_drift()  # DRIFT errors first: they do not depend on the rest of the config
        super().__post_init__()


@dataclass
class DriftConfig(DriftArguments, ICAArguments, SFTMethodArguments, SFTConfig):
    """``trl.SFTConfig`` plus the DRIFT options, for :class:`~drift_trainer.DriftSFTTrainer`."""

    def __post_init__(self):
        self.validate_drift()  # DRIFT errors first: they do not depend on the rest of the config
        self.validate_method()
        self.validate_ica()
        super().__post_init__()
