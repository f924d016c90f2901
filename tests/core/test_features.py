"""Per-example projected gradient features: exactness against autograd, masking, LoRA targets, bf16 and autocast."""

import pytest
import torch

from drift_trainer.cli.toy import build_tiny_llama
from drift_trainer.core.features import (
    ProjectedGradients,
    collate_right,
    example_labels,
    per_example_loss,
    select_target_modules,
)
from tests.helpers import addition_data, tokenize_dataset


def _rows(tokenizer, conversational):
    pairs = [("12+34=", "46"), ("1+1=", "2"), ("99+99=", "198"), ("7+5=", "12  ")]
    rows = []
    for prompt, completion in pairs:
        if conversational:
            p = [{"role": "user", "content": prompt}]
            full = tokenizer.apply_chat_template(
                p + [{"role": "assistant", "content": completion}], tokenize=True, return_dict=True
            )["input_ids"]
            pids = tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        else:
            pids = tokenizer(prompt)["input_ids"]
            full = pids + tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": full, "completion_mask": [0] * len(pids) + [1] * (len(full) - len(pids))})
    return [{"input_ids": r["input_ids"], "labels": example_labels(r)} for r in rows]


def _exact_projected(model, modules, projector, row, pad_id):
    batch = collate_right([row], pad_id)
    loss, _ = per_example_loss(model, batch)
    grads = torch.autograd.grad(loss.sum(), [m.weight for _, m in modules])
    return torch.cat([(po @ g @ pi.T).reshape(-1) for g, pi, po in zip(grads, projector.p_in, projector.p_out)])


@pytest.mark.parametrize("conversational", [False, True])
def test_batched_features_equal_exact_per_example_gradients(tokenizer, tiny_model, conversational):
    model = tiny_model.eval()
    # move off the init so every module has a non-trivial gradient
    rows = _rows(tokenizer, conversational)
    assert len({len(r["input_ids"]) for r in rows}) > 1, "examples must differ in length (padding exercised)"
    modules = select_target_modules(model)
    projector = ProjectedGradients(modules, projection_dim=8, seed=3)
    batch = collate_right(rows, tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any()
    out = projector.compute(model, batch)
    assert out.features.shape == (len(rows), projector.dim)
    for i, row in enumerate(rows):
        exact = _exact_projected(model, modules, projector, row, tokenizer.pad_token_id)
        rel = ((exact - out.features[i]).norm() / exact.norm()).item()
        assert rel < 1e-4, f"row {i}: relative error {rel}"
        assert out.num_tokens[i] == sum(t != -100 for t in row["labels"][1:])


def test_features_leave_parameter_grads_untouched(tokenizer, tiny_model):
    rows = _rows(tokenizer, False)
    modules = select_target_modules(tiny_model)
    projector = ProjectedGradients(modules, projection_dim=4)
    projector.compute(tiny_model, collate_right(rows, tokenizer.pad_token_id))
    assert all(p.grad is None for p in tiny_model.parameters())


def test_fully_masked_example_has_zero_feature(tokenizer, tiny_model):
    rows = _rows(tokenizer, False)
    rows[1]["labels"] = [-100] * len(rows[1]["labels"])
    projector = ProjectedGradients(select_target_modules(tiny_model), projection_dim=4)
    out = projector.compute(tiny_model, collate_right(rows, tokenizer.pad_token_id))
    assert out.num_tokens[1] == 0
    assert torch.count_nonzero(out.features[1]) == 0
    assert torch.count_nonzero(out.features[0]) > 0


def test_lora_targets_and_exactness(tokenizer, tiny_model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    # move lora_B off zero so lora_A gradients are non-zero too
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    modules = select_target_modules(model, "auto")
    names = [n for n, _ in modules]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    model.eval()
    rows = _rows(tokenizer, False)
    projector = ProjectedGradients(modules, projection_dim=4, seed=1)
    out = projector.compute(model, collate_right(rows, tokenizer.pad_token_id))
    for i, row in enumerate(rows):
        exact = _exact_projected(model, modules, projector, row, tokenizer.pad_token_id)
        assert ((exact - out.features[i]).norm() / exact.norm()).item() < 1e-4


def test_target_module_spec(tiny_model):
    names = [n for n, _ in select_target_modules(tiny_model, "q_proj,down_proj")]
    assert names and all(("q_proj" in n) or ("down_proj" in n) for n in names)
    assert not any("lm_head" in n for n, _ in select_target_modules(tiny_model, "all-linear"))
    with pytest.raises(ValueError, match="drift_target_modules"):
        select_target_modules(tiny_model, "no_such_module")


@pytest.mark.parametrize("lora", [False, True])
def test_top_layer_targets_run_the_lower_blocks_without_a_graph(tokenizer, tiny_model, lora):
    """drift_target_layers=1 keeps the last block's modules; the lower block runs without an autograd graph (no
    forward of it records one) and the features still equal the exact projected per-example gradients."""
    model = tiny_model
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    model.eval()
    modules = select_target_modules(model, "auto", top_layers=1)
    assert modules and all(".layers.1." in n for n, _ in modules)
    assert len(select_target_modules(model, "auto", top_layers=5)) == len(select_target_modules(model, "auto"))
    assert select_target_modules(model, "auto", top_layers=0.5) == modules  # half of 2 blocks: the upper one
    projector = ProjectedGradients(modules, projection_dim=4, seed=2)
    recorded = {}

    def watch(name):
        def hook(module, args, output):
            recorded[name] = output.requires_grad

        return hook

    blocks = [m for n, m in model.named_modules() if n.endswith(("layers.0", "layers.1"))]
    handles = [b.register_forward_hook(watch(i)) for i, b in enumerate(blocks)]
    rows = _rows(tokenizer, False)
    out = projector.compute(model, collate_right(rows, tokenizer.pad_token_id))
    for h in handles:
        h.remove()
    assert recorded == {0: False, 1: True}  # the block below the targets built no graph
    assert torch.is_grad_enabled()  # the grad mode is restored
    for i, row in enumerate(rows):
        exact = _exact_projected(model, modules, projector, row, tokenizer.pad_token_id)
        assert ((exact - out.features[i]).norm() / exact.norm()).item() < 1e-4
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_target_layers_is_validated(tmp_path, bad):
    from tests.helpers import tiny_config

    with pytest.raises(ValueError, match="drift_target_layers"):
        tiny_config(tmp_path, drift_target_layers=bad)


def test_top_layers_without_numbered_blocks_keeps_every_module(caplog):
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(2, 2)  # no numbered block anywhere
    with caplog.at_level("WARNING", logger="drift_trainer"):
        assert [n for n, _ in select_target_modules(model, "all-linear", top_layers=0.5)] == ["proj"]
    assert "drift_target_layers=0.5" in caplog.text and "every chosen module is kept" in caplog.text


def test_example_labels_variants():
    assert example_labels({"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}) == [-100, 6, 7]
    assert example_labels({"input_ids": [5, 6, 7], "completion_mask": [0, 0, 1]}) == [-100, -100, 7]
    assert example_labels({"input_ids": [5, 6, 7]}) == [5, 6, 7]


def test_bf16_model_gives_float32_features_close_to_float32_ones(tokenizer, tiny_model):
    rows = _rows(tokenizer, False)
    modules = select_target_modules(tiny_model)
    projector = ProjectedGradients(modules, projection_dim=8, seed=0)
    batch = collate_right(rows, tokenizer.pad_token_id)
    full = projector.compute(tiny_model.eval(), batch).features
    half = projector.compute(tiny_model.to(torch.bfloat16), batch).features
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    cos = torch.nn.functional.cosine_similarity(full, half, dim=1)
    assert (cos > 0.95).all(), cos


def test_feature_pass_inside_an_autocast_forward_is_float32_and_close_to_fp32(tokenizer):
    """accelerate wraps a mixed-precision model's forward in autocast, and leaves it wrapped after training: the
    projections inside the forward hooks then run under autocast, the products after it do not."""
    train, _ = addition_data(8)
    rows = [r for r in tokenize_dataset(tokenizer, train)]
    batch = collate_right(rows, tokenizer.pad_token_id)
    model = build_tiny_llama(tokenizer, seed=0).eval()
    projector = ProjectedGradients(select_target_modules(model), projection_dim=8, seed=0)
    fp32 = projector.compute(model, batch).features
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    mixed = projector.compute(model, batch).features
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
    rel = (mixed - fp32).norm(dim=1) / fp32.norm(dim=1)
    assert rel.max() < 2e-2, rel  # bf16 rounding of the forward itself; measured 0.2-0.6%


def test_adam_scaled_projection_is_the_projected_adam_preconditioned_gradient(tokenizer):
    from drift_trainer.core.features import adam_scales

    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    modules = select_target_modules(model)
    rows = _rows(tokenizer, False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert adam_scales(opt, [m for _, m in modules]) is None  # no step yet: no second moments
    for row in rows[:2]:  # two steps, so v is a genuine per-weight statistic
        loss, _ = per_example_loss(model, collate_right([row], tokenizer.pad_token_id))
        loss.sum().backward()
        opt.step()
        opt.zero_grad()
    scales = adam_scales(opt, [m for _, m in modules])
    for (_, m), (so, si) in zip(modules, scales):
        v = opt.state[m.weight]["exp_avg_sq"]
        assert so.shape == (m.out_features,) and si.shape == (m.in_features,)
        assert torch.allclose(so.mean(), torch.tensor(1.0)) and torch.allclose(si.mean(), torch.tensor(1.0))
        # the factored scales rank rows and columns as 1/sqrt of v's row and column means do
        assert torch.equal(torch.argsort(so), torch.argsort(v.mean(1).rsqrt()))
    plain = ProjectedGradients(modules, projection_dim=4, seed=3)
    scaled = plain.scaled(scales)
    row = rows[2]
    out = scaled.compute(model, collate_right([row], tokenizer.pad_token_id))
    loss, _ = per_example_loss(model, collate_right([row], tokenizer.pad_token_id))
    grads = torch.autograd.grad(loss.sum(), [m.weight for _, m in modules])
    exact = torch.cat(
        [
            (po @ (so[:, None] * g * si[None, :]) @ pi.T).reshape(-1)
            for g, pi, po, (so, si) in zip(grads, plain.p_in, plain.p_out, scales)
        ]
    )
    assert ((exact - out.features[0]).norm() / exact.norm()).item() < 1e-4
    # the plain projection is untouched by scaling
    assert (plain.compute(model, collate_right([row], tokenizer.pad_token_id)).features[0] - exact).norm() > 1e-3
