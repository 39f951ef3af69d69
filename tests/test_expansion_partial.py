"""Selected (partial) mode: deltas preserve function, gradients, trainable-fraction arithmetic."""
import pytest
import torch

from megatron_apex.expansion.operator import AttentionExpansion, FFNExpansion
from megatron_apex.expansion.partial import (
    PartialDeltas, local_units, selected_mode_trainable_fraction, tuned_units,
)
from megatron_apex.expansion.partition import balance_permutation
from megatron_apex.expansion.selection import select_units_partial

F64 = torch.float64


def _setup(seed=0, h=6, nh=16, ng=8, d=2, f=16):
    r = nh // ng
    g = torch.Generator().manual_seed(seed)
    # attention: B=2, k=2 (k_per=1), e=1 ; ffn: B=2, k=4 (k_per=2), e=3
    pa, na, ea = select_units_partial(torch.randint(-3, 4, (ng,), generator=g), torch.rand(ng, generator=g), 2, 1)
    pf, nf, ef = select_units_partial(torch.randint(-3, 4, (f,), generator=g), torch.rand(f, generator=g), 4, 3)
    perm_a, pa_pos, na_pos = balance_permutation(pa, na, ng, 2)
    perm_f, pf_pos, nf_pos = balance_permutation(pf, nf, f, 2)
    inv = lambda perm: torch.argsort(perm)  # noqa: E731  old unit -> new position
    attn_units = tuned_units(inv(perm_a)[pa], inv(perm_a)[na], inv(perm_a)[ea])
    ffn_units = tuned_units(inv(perm_f)[pf], inv(perm_f)[nf], inv(perm_f)[ef])
    deltas = PartialDeltas(attn_units, ffn_units, h, d, r, dtype=F64)
    attn = AttentionExpansion(2, 1, d, r, dtype=F64, generator=g)
    attn.set_positions(pa_pos, na_pos)
    ffn = FFNExpansion(2, 2, dtype=F64, generator=g)
    ffn.set_positions(pf_pos, nf_pos)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    weights = {"qkv": mk(ng * (r + 2) * d, h), "proj": mk(h, nh * d), "fc1": mk(2 * f, h), "fc2": mk(h, f)}
    return deltas, attn, ffn, weights, (attn_units, ffn_units, r, d, f)


def test_zero_deltas_preserve_function():
    deltas, attn, ffn, weights, _ = _setup()
    for kind, w in weights.items():
        op = attn if kind in ("qkv", "proj") else ffn
        assert torch.equal(getattr(deltas, f"effective_{kind}")(w), w)
        assert torch.equal(getattr(deltas, f"effective_{kind}")(w, op), w)
        assert torch.equal(getattr(deltas, f"fuse_{kind}")(w, op), w)


def test_deltas_touch_only_tuned_units_and_compose_with_operator():
    deltas, attn, ffn, weights, (au, fu, r, d, f) = _setup(seed=1)
    with torch.no_grad():
        for p in deltas.parameters():
            p.copy_(torch.randn_like(p))
    per = (r + 2) * d
    diff = (deltas.effective_qkv(weights["qkv"]) - weights["qkv"]).abs().sum(1).view(-1, per).sum(1) != 0
    assert diff.nonzero().view(-1).tolist() == au.tolist()
    diff = (deltas.effective_proj(weights["proj"]) - weights["proj"]).abs().sum(0).view(-1, r * d).sum(1) != 0
    assert diff.nonzero().view(-1).tolist() == au.tolist()
    d1 = (deltas.effective_fc1(weights["fc1"]) - weights["fc1"]).abs().sum(1) != 0
    assert d1[:f].nonzero().view(-1).tolist() == fu.tolist() == d1[f:].nonzero().view(-1).tolist()
    d2 = (deltas.effective_fc2(weights["fc2"]) - weights["fc2"]).abs().sum(0) != 0
    assert d2.nonzero().view(-1).tolist() == fu.tolist()
    # W_eff = op(W + delta)
    w1 = weights["fc1"]
    assert torch.equal(deltas.effective_fc1(w1, ffn), ffn.effective_fc1(deltas.effective_fc1(w1)))


def test_gradients_flow_only_to_deltas_and_operator():
    deltas, attn, ffn, weights, (au, fu, r, d, f) = _setup(seed=2)
    for w in weights.values():
        w.requires_grad_(False)
    x = torch.randn(5, weights["qkv"].shape[1], dtype=F64)
    out = x @ deltas.effective_qkv(weights["qkv"], attn).t()
    out = out[:, : weights["proj"].shape[1]] @ deltas.effective_proj(weights["proj"], attn).t()
    h1 = out @ deltas.effective_fc1(weights["fc1"], ffn).t()
    gate, up = h1.chunk(2, -1)
    y = (torch.nn.functional.silu(gate) * up) @ deltas.effective_fc2(weights["fc2"], ffn).t()
    y.square().sum().backward()
    for mod in (deltas, attn, ffn):
        for n, p in mod.named_parameters():
            assert p.grad is not None, n
            if not n.endswith("monarch_r"):
                assert p.grad.abs().sum() > 0, n
    assert all(w.grad is None for w in weights.values())


def test_gradcheck_deltas_with_operator():
    deltas, attn, ffn, weights, _ = _setup(seed=3)
    with torch.no_grad():
        for p in list(attn.parameters()) + list(ffn.parameters()):
            p.add_(torch.randn_like(p) * 0.3)
    names = [n for n, _ in deltas.named_parameters()]
    ps = [p.detach().clone().requires_grad_(True) for p in deltas.parameters()]

    def fn(*params):
        w_prime = torch.func.functional_call(deltas, dict(zip(names, params)), ("fc1", weights["fc1"]))
        return ffn.effective_fc1(w_prime)  # W_eff = op(W + delta)
    assert torch.autograd.gradcheck(fn, tuple(ps), eps=1e-6, atol=1e-7)


def test_local_units():
    units = torch.tensor([1, 6, 8, 15])
    assert local_units(units, 0, 2, 16).tolist() == [1, 6]
    assert local_units(units, 1, 2, 16).tolist() == [0, 7]
    with pytest.raises(ValueError):
        tuned_units(torch.tensor([1, 2]), torch.tensor([2]))


def _param_count_by_modules(h, f, nh, ng, d, L, vocab, tied):
    """Independent total: instantiate one layer's tensors' shapes and count."""
    r = nh // ng
    layer = [torch.empty((ng * (r + 2) * d, h)), torch.empty((h, nh * d)), torch.empty((2 * f, h)),
             torch.empty((h, f)), torch.empty(h), torch.empty(h)]
    per_layer = sum(t.numel() for t in layer)
    return L * per_layer + vocab * h * (1 if tied else 2) + h


def test_selected_mode_fraction_llama2_7b():
    shape = dict(h=4096, f=11008, nh=32, ng=32, d=128, L=32, vocab=32000, tied=False)
    frac = selected_mode_trainable_fraction(**shape, k_frac=0.1875, attn_tuned_frac=0.5625, ffn_tuned_frac=0.465)
    assert 0.50 <= frac <= 0.54
    # The default apex.partitions=8 keeps every selected unit (k = 6 heads in gcd(8, 32, 6) = 2 partitions).
    frac8 = selected_mode_trainable_fraction(**shape, k_frac=0.1875, attn_tuned_frac=0.5625, ffn_tuned_frac=0.465,
                                             b_cfg=8)
    assert 0.50 <= frac8 <= 0.54 and abs(frac8 - frac) < 1e-3
    total = _param_count_by_modules(**shape)
    assert abs(total - 6_738_415_616) == 0  # LLaMA-2-7B's published parameter count
    # cross-check the numerator with PartialDeltas / operators on a scaled-down layer
    small = dict(h=8, f=32, nh=4, ng=4, d=2, L=1, vocab=10, tied=False)
    fr = selected_mode_trainable_fraction(**small, k_frac=0.25, attn_tuned_frac=0.5, ffn_tuned_frac=0.5)
    deltas = PartialDeltas(torch.arange(2), torch.arange(16), 8, 2, 1)
    ops = [AttentionExpansion(1, 1, 2, 1), FFNExpansion(1, 8)]
    n_train = sum(p.numel() for m in [deltas] + ops for p in m.parameters()) + 2 * 10 * 8
    assert fr == pytest.approx(n_train / _param_count_by_modules(**small), rel=1e-12)
    # frozen-everything limit and monotonicity
    assert selected_mode_trainable_fraction(**shape, k_frac=0.0, attn_tuned_frac=0.0, ffn_tuned_frac=0.0) < 0.05
    assert selected_mode_trainable_fraction(**shape, k_frac=0.1875, attn_tuned_frac=1.0, ffn_tuned_frac=1.0) > 0.99


def test_qkv_bias_deltas_touch_the_tuned_groups_entries_and_count():
    """With a QKV bias the tuned groups' bias entries get a zero-initialised delta of their own (composed with
    the operator like the rows), and the trainable fraction counts it and the bias."""
    _, attn, _, weights, (au, _, r, d, _) = _setup(seed=3)
    h, per = weights["qkv"].shape[1], (r + 2) * d
    deltas = PartialDeltas(au, torch.arange(2), h, d, r, dtype=F64, qkv_bias=True)
    bias = torch.randn(weights["qkv"].shape[0], dtype=F64)
    assert torch.equal(deltas.effective_qkv_bias(bias, attn), bias)  # zero delta, fresh operator: unchanged
    with torch.no_grad():
        deltas.qkv_bias_delta.copy_(torch.randn_like(deltas.qkv_bias_delta))
    changed = (deltas.effective_qkv_bias(bias) != bias).view(-1, per).any(1)
    assert changed.nonzero().view(-1).tolist() == au.tolist()
    assert torch.equal(deltas.effective_qkv_bias(bias, attn), attn.effective_qkv_bias(deltas.effective_qkv_bias(bias)))
    with pytest.raises(ValueError, match="without qkv_bias"):
        PartialDeltas(au, torch.arange(2), h, d, r).effective_qkv_bias(bias)
    small = dict(h=8, f=32, nh=4, ng=4, d=2, L=1, vocab=10, tied=False)
    fr = selected_mode_trainable_fraction(**small, k_frac=0.25, attn_tuned_frac=0.5, ffn_tuned_frac=0.5, qkv_bias=True)
    deltas = PartialDeltas(torch.arange(2), torch.arange(16), 8, 2, 1, qkv_bias=True)
    ops = [AttentionExpansion(1, 1, 2, 1), FFNExpansion(1, 8)]
    n_train = sum(p.numel() for m in [deltas] + ops for p in m.parameters()) + 2 * 10 * 8
    total = _param_count_by_modules(**small) + 4 * 3 * 2  # one bias entry per QKV row
    assert fr == pytest.approx(n_train / total, rel=1e-12)
