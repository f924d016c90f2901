"""Projected per-example gradients for a whole batch in one forward and one backward.

For a Linear module with input ``a_t`` and output gradient ``d_t`` at token ``t``, an example's weight gradient is
``sum_t d_t a_t^T``. Projected with seeded Gaussian matrices ``P_out (k, out)`` and ``P_in (k, in)`` it is
``P_out (sum_t d_t a_t^T) P_in^T = sum_t (P_out d_t)(P_in a_t)^T``: a ``k x k`` block per module, computed from
captured activations without forming any weight gradient. ``torch.autograd.grad`` towards the captured outputs runs
no ``AccumulateGrad`` node, so parameter ``.grad`` (owned by the optimizer or DeepSpeed) is never touched.

Precision: activations and output gradients are projected in float32 whatever the model's dtype; features are float32.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

IGNORE_INDEX = -100


@contextlib.contextmanager
def float32_math(device: torch.device | str):
    """Run the enclosed products as written, in the dtype of their operands: turns off any enclosing autocast (which
    would otherwise recast float32 projections to bf16 / fp16, e.g. inside a mixed-precision model's forward)."""
    device_type = torch.device(device).type
    if not torch.is_autocast_enabled(device_type):  # nothing to turn off (entering autocast costs per call)
        yield
        return
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def _is_lora_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, LoraLayer)


def block_index(name: str) -> int | None:
    """The transformer block a module name is in: its first numeric component (``model.layers.3.mlp.up_proj`` -> 3),
    None outside any block."""
    match = _BLOCK.search(f".{name}.")
    return int(match.group(1)) if match else None


_BLOCK = re.compile(r"\.(\d+)\.")


def select_target_modules(
    model: nn.Module, spec: str = "auto", top_layers: float | None = None
) -> list[tuple[str, nn.Linear]]:
    """The ``(name, nn.Linear)`` modules whose weight gradients make the features, in a stable order.

    ``auto``: the LoRA ``lora_A``/``lora_B`` Linear modules of every active adapter on a PEFT model, otherwise every
    trainable ``nn.Linear`` except the LM head. ``all-linear``: every trainable ``nn.Linear`` except the LM head.
    Otherwise a comma-separated list of name substrings matched against trainable ``nn.Linear`` modules.
    ``top_layers``: keep only those in the last ``top_layers`` transformer blocks (by :func:`block_index`); a value
    below 1 is a fraction of the blocks (rounded up: 0.5 keeps the upper half). A model whose chosen modules sit in
    no numbered block keeps them all (with a warning).
    """
    chosen = _select(model, spec)
    if top_layers is None:
        return chosen
    blocks = sorted({b for b in (block_index(n) for n, _ in chosen) if b is not None})
    if not blocks:
        import logging

        logging.getLogger("drift_trainer").warning(
            "drift_target_layers=%s keeps the target modules of the upper transformer blocks, but none of the modules "
            "drift_target_modules=%r chose (%s) is inside a numbered block (names like `model.layers.3.mlp.up_proj`): "
            "every chosen module is kept. Set drift_target_layers=None to silence this.",
            top_layers,
            spec,
            [n for n, _ in chosen][:4],
        )
        return chosen
    n_keep = int(np.ceil(top_layers * len(blocks) - 1e-9)) if top_layers < 1 else int(top_layers)
    keep = set(blocks[-max(n_keep, 1) :])
    return [(n, m) for n, m in chosen if block_index(n) in keep]


def _select(model: nn.Module, spec: str) -> list[tuple[str, nn.Linear]]:
    named = list(model.named_modules())
    lora_children: set[int] = set()
    lora = []
    for name, module in named:
        if _is_lora_layer(module):
            for adapter in module.active_adapters:
                for kind in ("lora_A", "lora_B"):
                    holder = getattr(module, kind, None)
                    sub = holder[adapter] if holder is not None and adapter in holder else None
                    if isinstance(sub, nn.Linear):
                        lora.append((f"{name}.{kind}.{adapter}", sub))
                        lora_children.add(id(sub))
    head = _lm_head(model)

    def trainable_linears():
        for name, module in named:
            if not isinstance(module, nn.Linear) or module is head:
                continue
            weight = getattr(module, "weight", None)
            if weight is not None and weight.requires_grad:
                yield name, module

    if spec == "auto":
        chosen = lora if lora else list(trainable_linears())
    elif spec == "all-linear":
        chosen = list(trainable_linears())
    else:
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        chosen = [(n, m) for n, m in trainable_linears() if any(p in n for p in parts)]
    if not chosen:
        raise ValueError(
            f"drift_target_modules={spec!r} matched no trainable nn.Linear module. Use 'auto', 'all-linear', or name "
            "substrings of trainable Linear modules (e.g. 'q_proj,v_proj')."
        )
    return chosen


def _lm_head(model: nn.Module) -> nn.Module | None:
    base = model
    for attr in ("get_base_model",):
        if hasattr(base, attr):
            with contextlib.suppress(Exception):
                base = base.get_base_model()
    getter = getattr(base, "get_output_embeddings", None)
    return getter() if getter is not None else None


@dataclass
class FeatureBatch:
    """Output of one feature pass over ``B`` examples."""

    features: torch.Tensor  # (B, dim) float32, on CPU
    loss: torch.Tensor  # (B,) mean completion-token loss, float32, on CPU
    num_tokens: torch.Tensor  # (B,) completion tokens per example (0: fully masked, feature is zero)


class ProjectedGradients:
    """Owns the hooks and projection matrices of a run: ``compute(model, batch)`` returns per-example features.

    The projection matrices are drawn once from ``seed`` (so every rank and every refresh uses the same ones), and
    scaled by ``1/sqrt(k)`` so inner products are preserved in expectation. Modules with the same input width share
    one ``P_in``, so modules fed the same tensor (q/k/v, gate/up) project it once per forward: each module's block
    ``P_out_m G_m P_in^T`` is still an unbiased random projection of its own gradient.
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Linear]], projection_dim: int, seed: int = 1234):
        self.names = [n for n, _ in modules]
        self.modules = [m for _, m in modules]
        self.k = int(projection_dim)
        gen = torch.Generator().manual_seed(int(seed))
        shared = {
            d: torch.randn(self.k, d, generator=gen) / self.k**0.5
            for d in sorted({m.in_features for m in self.modules})
        }
        self.p_in = [shared[m.in_features] for m in self.modules]
        self.p_out = [torch.randn(self.k, m.out_features, generator=gen) / self.k**0.5 for m in self.modules]
        groups: dict[int, int] = {}
        self._group = [groups.setdefault(m.in_features, len(groups)) for m in self.modules]
        self._on_device: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    @property
    def dim(self) -> int:
        return len(self.modules) * self.k * self.k

    def scaled(self, scales: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> ProjectedGradients:
        """The same projection of the gradient preconditioned as ``D_out G D_in``: module ``i``'s ``P_out`` and
        ``P_in`` take the diagonal scales ``scales[i] = (out (out,), in (in,))``, so its block is
        ``(P_out D_out) G (P_in D_in)^T``. Each module gets its own ``P_in`` (scales differ by module)."""
        out = object.__new__(ProjectedGradients)
        out.names, out.modules, out.k = self.names, self.modules, self.k
        out.p_out = [p * so.float().cpu()[None, :] for p, (so, _) in zip(self.p_out, scales)]
        out.p_in = [p * si.float().cpu()[None, :] for p, (_, si) in zip(self.p_in, scales)]
        out._group = list(range(len(self.modules)))
        out._on_device = {}
        return out

    def input_group(self, i: int) -> int:
        """Index of module ``i``'s input projection among the distinct ``P_in`` (modules of one input width share
        one): modules fed the same tensor with the same group project it once."""
        return self._group[i]

    def _transposed(self, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(P_in^T per group, P_out^T per module)`` on ``device``, contiguous (moved once per device)."""
        device = torch.device(device)
        if device not in self._on_device:
            first: dict[int, torch.Tensor] = {}
            for g, p in zip(self._group, self.p_in):
                first.setdefault(g, p)
            self._on_device[device] = (
                [first[g].T.contiguous().to(device) for g in range(len(first))],
                [p.T.contiguous().to(device) for p in self.p_out],
            )
        return self._on_device[device]

    def project_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """``P_in a``: module ``i``'s input ``x (..., in)`` projected to ``(..., k)`` in float32."""
        with float32_math(x.device):
            return torch.matmul(x.detach().float(), self._transposed(x.device)[0][self._group[i]])

    def project_output_grad(self, g: torch.Tensor, i: int) -> torch.Tensor:
        """``P_out d``: module ``i``'s output gradient ``g (..., out)`` projected to ``(..., k)`` in float32."""
        with float32_math(g.device):
            return torch.matmul(g.detach().float(), self._transposed(g.device)[1][i])

    @contextlib.contextmanager
    def capture(self):
        """Register forward hooks that store each target module's projected input and its (live) output."""
        records: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.modules]
        # (input tensor, P_in) -> projected input; the key's tensor is held so its id cannot be reused meanwhile
        projected: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

        def make_hook(i):
            def hook(module, inputs, output):
                x = inputs[0]
                key = (id(x), self._group[i])
                if key not in projected:
                    projected[key] = (x, self.project_input(x, i))  # (B, T, k) float32
                records[i].append((projected[key][1], output))

            return hook

        handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(self.modules)]
        try:
            yield records
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def graph_from_first_target(self, model: nn.Module):
        """Record the autograd graph only from the first target module on, in every forward of ``model``: what runs
        before it (the embeddings and the blocks below the lowest target module) runs without a graph, and the
        backward towards the target outputs stops there. The features are unchanged: they need gradients at the
        target modules' outputs only, and everything before the first of them is a constant to those."""
        started = torch.is_grad_enabled()

        def grad_from_here(enabled: bool):
            def hook(module, args):
                torch.set_grad_enabled(enabled)

            return hook

        handles = [model.register_forward_pre_hook(grad_from_here(False))]  # each forward starts without a graph
        handles += [m.register_forward_pre_hook(grad_from_here(True)) for m in self.modules]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            torch.set_grad_enabled(started)

    def compute(self, model: nn.Module, batch: dict, fused_lm_head: bool = False, loss_fn=None) -> FeatureBatch:
        """Features of every example of a right-padded ``batch`` (``input_ids``, ``attention_mask``, ``labels``).

        ``labels`` follow the HF convention (unshifted, -100 ignored). Each example's loss is its mean token loss
        over its labelled tokens; its feature is the projected gradient of that loss. ``fused_lm_head`` uses TRL's
        fused head (``model(..., fused_lm_head=True)``) instead of materialising logits.

        ``loss_fn(model, batch, fused_lm_head) -> (loss (E,), num_tokens (E,))`` replaces the per-row token loss with
        any per-example loss (e.g. a preference pair's). When an example spans several rows, ``batch["row_group"]``
        (rows,) maps each row to its example and the features of an example's rows are summed (the gradient of a sum
        of row terms).
        """
        device = batch["input_ids"].device
        with self.graph_from_first_target(model), self.capture() as records:
            loss, ntok = (loss_fn or per_example_loss)(model, batch, fused_lm_head)
            pairs = [(i, a, out) for i, rec in enumerate(records) for a, out in rec if out.requires_grad]
            grads = torch.autograd.grad(loss.sum(), [o for _, _, o in pairs], allow_unused=True) if pairs else []
            bsz = batch["input_ids"].shape[0]
            blocks: list[torch.Tensor | None] = [None] * len(self.modules)
            with float32_math(device):  # an enclosing autocast would run these products in bf16/fp16
                for (i, a, _), g in zip(pairs, grads):
                    if g is not None:
                        d = self.project_output_grad(g, i)  # (B, T, k)
                        block = torch.bmm(d.reshape(bsz, -1, self.k).transpose(1, 2), a.reshape(bsz, -1, self.k))
                        blocks[i] = block if blocks[i] is None else blocks[i] + block  # a module called twice: sum
            zero = None
            for i, b in enumerate(blocks):  # a module the loss did not reach: a zero block
                if b is None:
                    zero = torch.zeros(bsz, self.k, self.k, device=device) if zero is None else zero
                    blocks[i] = zero
            feats = torch.cat([b.reshape(bsz, -1) for b in blocks], dim=1)
            group = batch.get("row_group")
            if group is not None:
                feats = torch.zeros(loss.shape[0], feats.shape[1], device=device).index_add_(0, group.to(device), feats)
        return FeatureBatch(feats.detach().cpu(), loss.detach().float().cpu(), ntok.cpu())


def adam_scales(optimizer, modules: Sequence[nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per module, the diagonal scales ``(out (out,), in (in,))`` with ``D_out G D_in ~ G / sqrt(v)``: Adam's second
    moment ``v`` (``exp_avg_sq`` of the module's weight) factored as row and column means (``v ~ r c^T / mean(r)``,
    as Adafactor does), so ``1 / sqrt(v) ~ r^-1/2 c^-1/2`` up to one constant. Each scale has mean 1. Modules the
    optimizer holds no second moment for get ones; None when it holds none for any of them."""
    opt = optimizer
    while not hasattr(opt, "state") and hasattr(opt, "optimizer"):  # accelerate's AcceleratedOptimizer and the like
        opt = opt.optimizer
    state = getattr(opt, "state", None) or {}
    scales, found = [], False
    for m in modules:
        v = state.get(m.weight, {}).get("exp_avg_sq") if hasattr(state, "get") else None
        if v is None or tuple(v.shape) != tuple(m.weight.shape):
            scales.append((torch.ones(m.out_features), torch.ones(m.in_features)))
            continue
        found = True
        v = v.detach().float().cpu()
        tiny = max(float(v.mean()) * 1e-6, 1e-30)
        row, col = (v.mean(1) + tiny).rsqrt(), (v.mean(0) + tiny).rsqrt()
        scales.append((row / row.mean(), col / col.mean()))
    return scales if found else None


def per_example_loss(model: nn.Module, batch: dict, fused_lm_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token NLL over each example's labelled tokens: returns ``(loss (B,), num_tokens (B,))``.

    Examples with no labelled token get loss 0 (a constant, so their gradient and feature are 0).
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if fused_lm_head:
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True, use_cache=False
        )
        token_logps = out.log_probs.float()  # (B, T-1), 0 where label is -100
        mask = (labels[:, 1:] != IGNORE_INDEX).to(token_logps.dtype)
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = out.logits[:, :-1].float()
        target = labels[:, 1:]
        mask = (target != IGNORE_INDEX).to(logits.dtype)
        safe = target.clamp(min=0)
        token_logps = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    ntok = mask.sum(1)
    loss = -(token_logps * mask).sum(1) / ntok.clamp(min=1)
    return loss, ntok.long()


def length_sorted_batches(rows, batch_size: int) -> list[np.ndarray]:
    """Row indices in batches of ``batch_size``, shortest rows first, so each batch pads little."""
    order = np.argsort([len(r["input_ids"]) for r in rows], kind="stable")
    return [order[s : s + batch_size] for s in range(0, len(rows), batch_size)]


@torch.no_grad()
def summed_logps(
    model: nn.Module, rows, pad_token_id: int, batch_size: int = 16, dist=None
) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probability of each row's labelled tokens and their count, ``(logp (n,), num_tokens (n,))``
    float64; forward passes only, in eval mode, length-sorted batches.

    ``dist`` (a :class:`~drift_trainer.core.dist.Dist` over several ranks; every rank must call): the batches are
    split over the ranks, each making the same number of forwards (:func:`~drift_trainer.core.dist.rank_calls`),
    and every rank returns every row's values."""
    from drift_trainer.core.dist import rank_calls, sum_over_ranks

    logp = np.zeros(len(rows))
    count = np.zeros(len(rows))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = length_sorted_batches(rows, batch_size)
    try:
        with torch.no_grad():
            for b, keep in rank_calls(len(batches), dist) if batches else []:
                idx = batches[b]
                batch = collate_right([rows[i] for i in idx], pad_token_id, device)
                loss, ntok = per_example_loss(model, batch)
                if keep:
                    logp[idx] = (-loss.double() * ntok.double()).cpu().numpy()
                    count[idx] = ntok.double().cpu().numpy()
    finally:
        model.train(was_training)
    logp, count = sum_over_ranks([logp, count], dist)
    return logp, count


def example_labels(row: dict) -> list[int]:
    """Labels of a tokenized row: its ``labels``, else ``input_ids`` masked by ``completion_mask`` /
    ``assistant_masks``, else all of ``input_ids`` (language modelling)."""
    ids = list(row["input_ids"])
    if row.get("labels") is not None:
        return list(row["labels"])
    masks = [row[k] for k in ("completion_mask", "assistant_masks") if row.get(k) is not None]
    return [t if all(m[j] for m in masks) else IGNORE_INDEX for j, t in enumerate(ids)]


def collate_right(rows: Iterable[dict], pad_token_id: int, device: torch.device | str = "cpu") -> dict:
    """Right-pad rows with ``input_ids`` and ``labels`` into a batch with an ``attention_mask``."""
    rows = list(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    width = max(lengths)

    def padded(key, value):  # one tensor from padded lists: far cheaper than a copy per row for short rows
        return torch.tensor([_as_list(r[key]) + [value] * (width - n) for r, n in zip(rows, lengths)], dtype=torch.long)

    ids, labels = padded("input_ids", pad_token_id), padded("labels", IGNORE_INDEX)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def _as_list(seq) -> list:
    return seq.tolist() if hasattr(seq, "tolist") else list(seq)
