"""The expansion operator: function preservation, dense reference, gradients, TP invariance, fusing."""
import pytest
import torch
from torch.func import functional_call

from megatron_apex.expansion.monarch import monarch_shape, monarch_to_dense
from megatron_apex.expansion.operator import (
    AttentionExpansion, FFNExpansion, attn_operator_num_params, ffn_operator_num_params, fuse_layer_weights,
    shard_expansion_state,
)
from megatron_apex.expansion.partition import balance_permutation, num_partitions, round_k_to_partitions
from megatron_apex.expansion.selection import select_units

F64 = torch.float64


def _positions(n_units, num_parts, k, seed):
    """Global P/N positions after balancing, as the engine would compute them."""
    g = torch.Generator().manual_seed(seed)
    votes = torch.randint(-4, 5, (n_units,), generator=g)
    raw = torch.rand(n_units, generator=g, dtype=F64)
    k, _ = round_k_to_partitions(k, num_parts)
    p, n = select_units(votes, raw, k)
    _, p_pos, n_pos = balance_permutation(p, n, n_units, num_parts)
    return p_pos, n_pos


def _perturb(op, seed):
    """Training-like random operator parameters (M non-zero, alpha/beta away from 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in op.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype) * 0.5 + (1.0 if p.dim() == 2 else 0.0))
    return op


def _w(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


# configurations: (name, h, nh, ng, d, f, b_cfg, k_attn, k_ffn)
CONFIGS = {
    "mha": dict(h=5, nh=8, ng=8, d=3, f=24, b_cfg=2, k_attn=4, k_ffn=12),
    "gqa": dict(h=5, nh=8, ng=4, d=2, f=24, b_cfg=2, k_attn=2, k_ffn=8),
    "gqa4": dict(h=4, nh=16, ng=8, d=2, f=16, b_cfg=4, k_attn=4, k_ffn=4),
}


def _build(cfg, seed=0, dtype=F64, blocks=0):
    h, nh, ng, d, f = cfg["h"], cfg["nh"], cfg["ng"], cfg["d"], cfg["f"]
    r = nh // ng
    b_a, b_f = num_partitions(ng, cfg["b_cfg"]), num_partitions(f, cfg["b_cfg"])
    pa, na = _positions(ng, b_a, cfg["k_attn"], seed)
    pf, nf = _positions(f, b_f, cfg["k_ffn"], seed + 1)
    gen = torch.Generator().manual_seed(seed)
    attn = AttentionExpansion(b_a, pa.shape[1], d, r, dtype=dtype, generator=gen, monarch_blocks=blocks)
    ffn = FFNExpansion(b_f, pf.shape[1], dtype=dtype, generator=gen, monarch_blocks=blocks)
    attn.set_positions(pa, na)
    ffn.set_positions(pf, nf)
    weights = {
        "linear_qkv.weight": _w(ng * (r + 2) * d, h, seed=seed + 2),
        "linear_proj.weight": _w(h, nh * d, seed=seed + 3),
        "linear_fc1.weight": _w(2 * f, h, seed=seed + 4),
        "linear_fc2.weight": _w(h, f, seed=seed + 5),
    }
    return attn, ffn, weights


# ---- dense reference straight from the formulas ------------------------------------------------------
def _ref_column(w, p_pos, n_pos, rows_of, mdense, alpha, beta):
    out = w.clone()
    for b in range(p_pos.shape[0]):
        prow = [x for u in p_pos[b].tolist() for x in rows_of(u)]
        nrow = [x for u in n_pos[b].tolist() for x in rows_of(u)]
        for i in range(len(nrow)):
            acc = alpha[b, i] * w[nrow[i]]
            for j in range(len(prow)):
                acc = acc + mdense[b, i, j] * w[prow[j]]
            out[nrow[i]] = acc
            if beta is not None:
                out[prow[i]] = beta[b, i] * w[prow[i]]
    return out


def _ref_row(w, p_pos, n_pos, cols_of, mdense, alpha):
    out = w.clone()
    for b in range(p_pos.shape[0]):
        pcol = [x for u in p_pos[b].tolist() for x in cols_of(u)]
        ncol = [x for u in n_pos[b].tolist() for x in cols_of(u)]
        for i in range(len(ncol)):
            acc = w[:, ncol[i]] * alpha[b, i]
            for j in range(len(pcol)):
                acc = acc + w[:, pcol[j]] * mdense[b, i, j]  # (W_P M^T)[:, i] = sum_j W_P[:, j] M[i, j]
            out[:, ncol[i]] = acc
    return out


def _reference(cfg, attn, ffn, weights):
    nh, ng, d = cfg["nh"], cfg["ng"], cfg["d"]
    r = nh // ng
    f = weights["linear_fc2.weight"].shape[1]
    with torch.no_grad():
        if attn.shared:
            mv = mo = monarch_to_dense(attn.monarch_l, attn.monarch_r)
            av = ao = attn.alpha
        else:
            mv, av = monarch_to_dense(attn.v_monarch_l, attn.v_monarch_r), attn.v_alpha
            mo, ao = monarch_to_dense(attn.o_monarch_l, attn.o_monarch_r), attn.o_alpha
        mf = monarch_to_dense(ffn.monarch_l, ffn.monarch_r)
        v_rows = lambda u: range(u * (r + 2) * d + (r + 1) * d, (u + 1) * (r + 2) * d)  # noqa: E731
        o_cols = lambda u: range(u * r * d, (u + 1) * r * d)  # noqa: E731
        fc1 = weights["linear_fc1.weight"]
        gate = _ref_column(fc1[:f], ffn.p_pos, ffn.n_pos, lambda u: [u], mf, ffn.alpha, ffn.beta_gate)
        up = _ref_column(fc1[f:], ffn.p_pos, ffn.n_pos, lambda u: [u], mf, ffn.alpha, ffn.beta_up)
        return {
            "linear_qkv.weight": _ref_column(weights["linear_qkv.weight"], attn.p_pos, attn.n_pos, v_rows, mv, av,
                                             attn.beta_v),
            "linear_proj.weight": _ref_row(weights["linear_proj.weight"], attn.p_pos, attn.n_pos, o_cols, mo, ao),
            "linear_fc1.weight": torch.cat([gate, up]),
            "linear_fc2.weight": _ref_row(weights["linear_fc2.weight"], ffn.p_pos, ffn.n_pos, lambda u: [u], mf,
                                          ffn.alpha),
        }


def _effective(attn, ffn, weights):
    return {
        "linear_qkv.weight": attn.effective_qkv(weights["linear_qkv.weight"]),
        "linear_proj.weight": attn.effective_proj(weights["linear_proj.weight"]),
        "linear_fc1.weight": ffn.effective_fc1(weights["linear_fc1.weight"]),
        "linear_fc2.weight": ffn.effective_fc2(weights["linear_fc2.weight"]),
    }


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
def test_fresh_operator_preserves_function_exactly(name, dtype):
    attn, ffn, weights = _build(CONFIGS[name], dtype=torch.float32)
    weights = {k: v.to(dtype) for k, v in weights.items()}
    assert attn.k_per > 0 and ffn.k_per > 0
    for key, w_eff in _effective(attn, ffn, weights).items():
        assert w_eff.dtype == dtype and torch.equal(w_eff, weights[key]), key
    for key, w_f in fuse_layer_weights(weights, ffn, attn).items():
        assert torch.equal(w_f, weights[key]), key


@pytest.mark.parametrize("name", list(CONFIGS))
def test_perturbed_operator_matches_dense_reference(name):
    cfg = CONFIGS[name]
    attn, ffn, weights = _build(cfg, seed=7)
    _perturb(attn, 1)
    _perturb(ffn, 2)
    ref = _reference(cfg, attn, ffn, weights)
    fused = fuse_layer_weights(dict(weights, **{"input_layernorm.weight": torch.ones(3)}), ffn, attn)
    assert torch.equal(fused["input_layernorm.weight"], torch.ones(3))
    for key in ref:
        torch.testing.assert_close(fused[key], ref[key], rtol=1e-12, atol=1e-12)
        assert not fused[key].requires_grad
        assert not torch.equal(fused[key], weights[key]), key  # the test is not vacuous
    # Q and K rows are never touched
    nh, ng, d = cfg["nh"], cfg["ng"], cfg["d"]
    r = nh // ng
    qk = fused["linear_qkv.weight"].view(ng, (r + 2) * d, -1)[:, :(r + 1) * d]
    assert torch.equal(qk, weights["linear_qkv.weight"].view(ng, (r + 2) * d, -1)[:, :(r + 1) * d])


def _monarchs(attn, ffn):
    """{side: (m, monarch_l)} of a layer's operators."""
    out = {"ffn": (ffn.alpha.shape[1], ffn.monarch_l)}
    if attn.shared:
        out["attn"] = (attn.alpha.shape[1], attn.monarch_l)
    else:
        out["attn v"] = (attn.v_alpha.shape[1], attn.v_monarch_l)
        out["attn o"] = (attn.o_alpha.shape[1], attn.o_monarch_l)
    return out


# (config, apex.monarch_blocks): each changes nb of at least one Monarch matrix from the sqrt(m) rule
@pytest.mark.parametrize("name,blocks", [("mha", 3), ("gqa", 4), ("gqa4", 1)])
def test_monarch_blocks_operator_matches_dense_reference(name, blocks):
    """Operators with a non-default Monarch block count: factor shapes follow monarch_shape(m, blocks) on
    every side (V and O separately under GQA), a fresh operator preserves the function exactly, and a
    trained one fuses to the dense reference."""
    cfg = CONFIGS[name]
    attn, ffn, weights = _build(cfg, seed=7, blocks=blocks)
    default = _monarchs(*_build(cfg, seed=7)[:2])
    changed = False
    for side, (m, lf) in _monarchs(attn, ffn).items():
        nb, bs = monarch_shape(m, blocks)
        assert tuple(lf.shape[1:]) == (bs, nb, nb), side
        changed |= tuple(lf.shape) != tuple(default[side][1].shape)
    assert changed
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert count(attn) == attn_operator_num_params(attn.num_partitions_local, attn.k_per, attn.d, attn.r, blocks)
    assert count(ffn) == ffn_operator_num_params(ffn.num_partitions_local, ffn.k_per, blocks)
    for key, w_eff in _effective(attn, ffn, weights).items():
        assert torch.equal(w_eff, weights[key]), key
    _perturb(attn, 1)
    _perturb(ffn, 2)
    ref = _reference(cfg, attn, ffn, weights)
    fused = fuse_layer_weights(weights, ffn, attn)
    for key in ref:
        torch.testing.assert_close(fused[key], ref[key], rtol=1e-12, atol=1e-12)
        assert not torch.equal(fused[key], weights[key]), key
    # A reset keeps the factor shapes and is TP-layout independent as with the default block count.
    shapes = {n: tuple(p.shape) for n, p in ffn.named_parameters()}
    ffn.reset_parameters(torch.Generator().manual_seed(5))
    assert {n: tuple(p.shape) for n, p in ffn.named_parameters()} == shapes
    assert torch.count_nonzero(monarch_to_dense(ffn.monarch_l, ffn.monarch_r)) == 0
    b = ffn.num_partitions_local
    if b % 2 == 0:
        half = FFNExpansion(b // 2, ffn.k_per, dtype=F64, monarch_blocks=blocks)
        half.reset_parameters(torch.Generator().manual_seed(5), first_block=b // 2, num_blocks=b)
        assert torch.equal(half.monarch_r, ffn.monarch_r[b // 2:])


def test_parameter_names_and_counts():
    attn, ffn, _ = _build(CONFIGS["mha"])
    assert {n for n, _ in attn.named_parameters()} == {"monarch_l", "monarch_r", "alpha", "beta_v"}
    assert {n for n, _ in ffn.named_parameters()} == {"monarch_l", "monarch_r", "alpha", "beta_gate", "beta_up"}
    assert set(attn.state_dict()) == {"monarch_l", "monarch_r", "alpha", "beta_v", "p_pos", "n_pos"}
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert count(attn) == attn_operator_num_params(attn.num_partitions_local, attn.k_per, attn.d, attn.r)
    assert count(ffn) == ffn_operator_num_params(ffn.num_partitions_local, ffn.k_per)
    gattn, _, _ = _build(CONFIGS["gqa"])
    assert {n for n, _ in gattn.named_parameters()} == {
        "v_monarch_l", "v_monarch_r", "v_alpha", "o_monarch_l", "o_monarch_r", "o_alpha", "beta_v"}
    assert gattn.o_alpha.shape[1] == gattn.r * gattn.v_alpha.shape[1]
    assert count(gattn) == attn_operator_num_params(gattn.num_partitions_local, gattn.k_per, gattn.d, gattn.r)


def _gradcheck_kind(op, kind, w):
    names = [n for n, _ in op.named_parameters()]
    params0 = [p.detach().clone().requires_grad_(True) for p in op.parameters()]

    def fn(w_, *ps):
        return functional_call(op, dict(zip(names, ps)), (kind, w_))

    assert torch.autograd.gradcheck(fn, (w.detach().clone().requires_grad_(True), *params0), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_gradcheck_all_inputs(name):
    attn, ffn, weights = _build(CONFIGS[name], seed=3)
    _perturb(attn, 4)
    _perturb(ffn, 5)
    _gradcheck_kind(attn, "qkv", weights["linear_qkv.weight"])
    _gradcheck_kind(attn, "proj", weights["linear_proj.weight"])
    _gradcheck_kind(ffn, "fc1", weights["linear_fc1.weight"])
    _gradcheck_kind(ffn, "fc2", weights["linear_fc2.weight"])


def test_gradients_reach_every_parameter_from_zero_init():
    attn, ffn, weights = _build(CONFIGS["gqa"], seed=9)
    ws = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
    loss = sum((e ** 2).sum() for e in _effective(attn, ffn, ws).values())
    loss.backward()
    for mod in (attn, ffn):
        for n, p in mod.named_parameters():
            assert p.grad is not None, n
            if not n.endswith("monarch_r"):  # with L = 0 the gradient of R is exactly 0
                assert p.grad.abs().sum() > 0, n
    assert all(w.grad is not None for w in ws.values())


@pytest.mark.parametrize("name", ["mha", "gqa4"])
def test_tp_sharded_operators_equal_tp1(name):
    cfg = dict(CONFIGS[name])
    if name == "mha":
        cfg.update(b_cfg=4, k_attn=4, k_ffn=8)
    t = 2
    attn, ffn, weights = _build(cfg, seed=11)
    _perturb(attn, 6)
    _perturb(ffn, 8)
    full = _effective(attn, ffn, weights)
    nh, ng, d = cfg["nh"], cfg["ng"], cfg["d"]
    r, f = nh // ng, cfg["f"]
    fc1 = weights["linear_fc1.weight"]
    outs = {k: [] for k in full}
    for q in range(t):
        sl_a = slice(q * ng // t * (r + 2) * d, (q + 1) * ng // t * (r + 2) * d)
        sl_o = slice(q * nh * d // t, (q + 1) * nh * d // t)
        sl_f = slice(q * f // t, (q + 1) * f // t)
        local = {
            "linear_qkv.weight": weights["linear_qkv.weight"][sl_a],
            "linear_proj.weight": weights["linear_proj.weight"][:, sl_o],
            "linear_fc1.weight": torch.cat([fc1[:f][sl_f], fc1[f:][sl_f]]),  # [gate_shard; up_shard]
            "linear_fc2.weight": weights["linear_fc2.weight"][:, sl_f],
        }
        la = AttentionExpansion(attn.num_partitions_local // t, attn.k_per, d, r, dtype=F64)
        lf = FFNExpansion(ffn.num_partitions_local // t, ffn.k_per, dtype=F64)
        la.load_state_dict(shard_expansion_state(attn.state_dict(), q, t, ng))
        lf.load_state_dict(shard_expansion_state(ffn.state_dict(), q, t, f))
        for k, v in _effective(la, lf, local).items():
            outs[k].append(v)
    half = lambda x, i: x.chunk(2)[i]  # noqa: E731
    assert torch.equal(torch.cat(outs["linear_qkv.weight"]), full["linear_qkv.weight"])
    assert torch.equal(torch.cat(outs["linear_proj.weight"], 1), full["linear_proj.weight"])
    assert torch.equal(torch.cat(outs["linear_fc2.weight"], 1), full["linear_fc2.weight"])
    fc1_sh = outs["linear_fc1.weight"]
    fc1_full = torch.cat([torch.cat([half(s, 0) for s in fc1_sh]), torch.cat([half(s, 1) for s in fc1_sh])])
    assert torch.equal(fc1_full, full["linear_fc1.weight"])


def test_reset_parameters_is_tp_invariant():
    full = AttentionExpansion(4, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    full_f = FFNExpansion(4, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    for q in range(2):
        la = AttentionExpansion(2, 1, 2, 2, dtype=F64)
        la.reset_parameters(torch.Generator().manual_seed(5), first_block=2 * q, num_blocks=4)
        lf = FFNExpansion(2, 3, dtype=F64)
        lf.reset_parameters(torch.Generator().manual_seed(5), first_block=2 * q, num_blocks=4)
        for big, small in ((full, la), (full_f, lf)):
            for (n, p), (_, p_loc) in zip(big.named_parameters(), small.named_parameters()):
                assert torch.equal(p[2 * q:2 * q + 2], p_loc), n


def test_positions_checks_and_state_roundtrip():
    attn, ffn, weights = _build(CONFIGS["gqa"])
    fresh = FFNExpansion(ffn.num_partitions_local, ffn.k_per, dtype=F64)
    with pytest.raises(RuntimeError, match="positions not set"):
        fresh.effective_fc1(weights["linear_fc1.weight"])
    _perturb(ffn, 3)
    fresh.load_state_dict(ffn.state_dict())  # positions come with the checkpoint
    w1 = weights["linear_fc1.weight"]
    assert torch.equal(fresh.effective_fc1(w1), ffn.effective_fc1(w1))
    with pytest.raises(ValueError, match="out of range"):
        ffn.effective_fc2(weights["linear_fc2.weight"][:, :4])
    with pytest.raises(ValueError):
        ffn.set_positions(ffn.p_pos, ffn.p_pos)  # P and N overlap
    with pytest.raises(ValueError):
        ffn.set_positions(ffn.p_pos[:1], ffn.n_pos[:1])  # wrong shape
    assert torch.equal(ffn(kind="fc2", w=weights["linear_fc2.weight"]), ffn.effective_fc2(weights["linear_fc2.weight"]))


def test_inactive_operator_is_passthrough():
    ffn = FFNExpansion(4, 0)
    attn = AttentionExpansion(2, 0, 2, 2)
    assert len(list(ffn.parameters())) == 0 and len(list(attn.parameters())) == 0
    w = torch.randn(8, 3)
    assert ffn.effective_fc1(w) is w and attn.effective_proj(w) is w


def test_operator_pickles_and_deepcopies():
    import copy
    import io

    attn, ffn, weights = _build(CONFIGS["gqa"], seed=2)
    _perturb(attn, 1)
    buf = io.BytesIO()
    torch.save(attn, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    clone = copy.deepcopy(attn)
    ref = attn.effective_proj(weights["linear_proj.weight"])
    assert torch.equal(again.effective_proj(weights["linear_proj.weight"]), ref)
    assert torch.equal(clone.effective_proj(weights["linear_proj.weight"]), ref)


# ---- a QKV bias (Qwen2): the V rows' bias entries are one more column of those rows ----------------
def _bias(cfg, seed):
    r = cfg["nh"] // cfg["ng"]
    return _w(cfg["ng"] * (r + 2) * cfg["d"], seed=seed)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_qkv_bias_expands_with_its_rows(name):
    """A fresh operator leaves the bias exactly as it is; a trained one gives b_eff = the bias column of the
    augmented [W | b] under the dense formula (V entries mixed, Q and K entries untouched), and the fused
    weight is the same with or without the bias beside it."""
    cfg = CONFIGS[name]
    attn, ffn, weights = _build(cfg, seed=5)
    bias = _bias(cfg, 17)
    assert torch.equal(attn.effective_qkv_bias(bias), bias)
    with_bias = dict(weights, **{"linear_qkv.bias": bias})
    assert torch.equal(fuse_layer_weights(with_bias, ffn, attn)["linear_qkv.bias"], bias)
    _perturb(attn, 1)
    _perturb(ffn, 2)
    augmented = dict(weights, **{"linear_qkv.weight": torch.cat([weights["linear_qkv.weight"], bias[:, None]], 1)})
    ref = _reference(cfg, attn, ffn, augmented)["linear_qkv.weight"]
    fused = fuse_layer_weights(with_bias, ffn, attn)
    torch.testing.assert_close(fused["linear_qkv.bias"], ref[:, -1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused["linear_qkv.weight"], ref[:, :-1], rtol=1e-12, atol=1e-12)
    r, d, ng = cfg["nh"] // cfg["ng"], cfg["d"], cfg["ng"]
    changed = (fused["linear_qkv.bias"] != bias).view(ng, (r + 2) * d)
    assert not changed[:, :(r + 1) * d].any() and changed[:, (r + 1) * d:].any()  # only V entries, and some
    _gradcheck_kind(attn, "qkv_bias", bias)


def test_qkv_bias_tp_shards_equal_tp1():
    cfg = dict(CONFIGS["gqa4"])
    t, (nh, ng, d) = 2, (cfg["nh"], cfg["ng"], cfg["d"])
    r = nh // ng
    attn, _, _ = _build(cfg, seed=11)
    _perturb(attn, 6)
    bias = _bias(cfg, 3)
    full = attn.effective_qkv_bias(bias)
    shards = []
    for q in range(t):
        la = AttentionExpansion(attn.num_partitions_local // t, attn.k_per, d, r, dtype=F64)
        la.load_state_dict(shard_expansion_state(attn.state_dict(), q, t, ng))
        shards.append(la.effective_qkv_bias(bias.chunk(t)[q]))
    assert torch.equal(torch.cat(shards), full) and not torch.equal(full, bias)
