"""The once-per-step in-place operator (expansion/inplace.py) against autograd on the functional path."""
import types

import pytest
import torch

from megatron_apex.expansion.inplace import InPlaceLayer
from megatron_apex.expansion.partition import packed_positions
from test_expansion_operator import CONFIGS, F64, _build, _effective, _perturb

# One partition too: there the packed P and N slices of a row-type weight are contiguous.
SHAPES = {**CONFIGS, "mha-1part": dict(h=5, nh=8, ng=8, d=3, f=24, b_cfg=1, k_attn=2, k_ffn=6)}
KINDS = {"qkv": "linear_qkv.weight", "proj": "linear_proj.weight", "fc1": "linear_fc1.weight",
         "fc2": "linear_fc2.weight"}


def _linears(weights, grads):
    """Stand-ins for megatron-core linears: a weight Parameter carrying main_grad = dL/dW_eff (and the QKV
    bias, when ``weights`` holds one)."""
    out = {}
    for kind, name in KINDS.items():
        w = torch.nn.Parameter(weights[name].clone())
        w.main_grad = grads[name].clone()
        out[kind] = types.SimpleNamespace(weight=w, bias=None)
    if "linear_qkv.bias" in weights:
        b = torch.nn.Parameter(weights["linear_qkv.bias"].clone())
        b.main_grad = grads["linear_qkv.bias"].clone()
        out["qkv"].bias = b
    return out


def _pack(op, n_units):
    """Packed positions (P units first, then N, in every partition), as the engine's boundary leaves them."""
    op.set_positions(*packed_positions(*op.p_pos.shape, n_units))


@pytest.mark.parametrize("bias", [False, True], ids=["", "qkv-bias"])
@pytest.mark.parametrize("packed", [False, True], ids=["scattered", "packed"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_inplace_equals_autograd(name, packed, bias):
    """materialize writes exactly W_eff; restore(with_grads) turns dL/dW_eff into dL/dW on main_grad,
    accumulates the operator's gradients as autograd computes them, and puts W back bit for bit.
    Scattered positions go through index gathers, packed ones through strided views. With a QKV bias its
    entries are expanded, differentiated and restored with the V rows."""
    cfg = SHAPES[name]
    attn, ffn, weights = _build(cfg, seed=3)
    if bias:
        weights["linear_qkv.bias"] = torch.randn(weights["linear_qkv.weight"].shape[0], dtype=F64,
                                                 generator=torch.Generator().manual_seed(8))
    if packed:
        _pack(attn, cfg["ng"])
        _pack(ffn, cfg["f"])
    _perturb(attn, 11)
    _perturb(ffn, 12)
    g = torch.Generator().manual_seed(5)
    grads = {k: torch.randn(w.shape, generator=g, dtype=F64) for k, w in weights.items()}  # dL/dW_eff

    # Reference: L = sum(W_eff * G) so dL/dW_eff = G; autograd through the functional path.
    ref_w = {k: w.clone().requires_grad_() for k, w in weights.items()}
    eff = _effective(attn, ffn, ref_w)
    if bias:
        eff["linear_qkv.bias"] = attn.effective_qkv_bias(ref_w["linear_qkv.bias"])
    sum((eff[k] * grads[k]).sum() for k in eff).backward()
    ref_op_grads = {f"{m}.{n}": p.grad.clone() for m, op in (("attn", attn), ("ffn", ffn))
                    for n, p in op.named_parameters()}
    for op in (attn, ffn):
        op.zero_grad(set_to_none=True)

    linears = _linears(weights, grads)
    layer = InPlaceLayer(linears, attn, ffn, cfg["d"], cfg["nh"] // cfg["ng"])
    assert layer.packed == packed
    layer.materialize()
    params = {key: linears[kind].weight for kind, key in KINDS.items()}
    if bias:
        params["linear_qkv.bias"] = linears["qkv"].bias
        assert not torch.equal(eff["linear_qkv.bias"], weights["linear_qkv.bias"])  # the bias is expanded
    for key, p in params.items():
        torch.testing.assert_close(p.data, eff[key].detach(), rtol=1e-12, atol=1e-12)
    layer.restore(with_grads=True)
    for key, p in params.items():
        assert torch.equal(p.data, weights[key]), key  # originals back, exactly
        torch.testing.assert_close(p.main_grad, ref_w[key].grad, rtol=1e-12, atol=1e-12)
    got = {f"{m}.{n}": p.grad for m, op in (("attn", attn), ("ffn", ffn)) for n, p in op.named_parameters()}
    assert got.keys() == ref_op_grads.keys()
    for k in got:
        assert got[k] is not None, k
        torch.testing.assert_close(got[k], ref_op_grads[k], rtol=1e-12, atol=1e-12)


def test_restore_without_grads_leaves_main_grad():
    """restore(with_grads=False) (evaluation, checkpoints) only puts the weights back."""
    attn, ffn, weights = _build(CONFIGS["gqa"], seed=4)
    _perturb(attn, 1)
    _perturb(ffn, 2)
    grads = {k: torch.randn(w.shape, dtype=F64) for k, w in weights.items()}
    linears = _linears(weights, grads)
    layer = InPlaceLayer(linears, attn, ffn, CONFIGS["gqa"]["d"], 2)
    layer.materialize()
    assert any(not torch.equal(linears[k].weight.data, weights[n]) for k, n in KINDS.items())
    layer.restore(with_grads=False)
    for kind, key in KINDS.items():
        assert torch.equal(linears[kind].weight.data, weights[key])
        assert torch.equal(linears[kind].weight.main_grad, grads[key])
    assert all(p.grad is None for op in (attn, ffn) for p in op.parameters())


@pytest.mark.parametrize("batch_bytes", [None, 1], ids=["batched", "one-group-batches"])
def test_runner_batches_layers_like_single_layers(monkeypatch, batch_bytes):
    """The runner computes the groups of equal shape in several layers together (expansion/inplace
    _Batch): weights, main_grad and operator gradients equal those of each layer on its own, for a
    mix of layer shapes and of packed and scattered positions, batched or cut into single groups."""
    from megatron_apex.expansion import inplace

    if batch_bytes is not None:
        monkeypatch.setattr(inplace, "BATCH_BYTES", batch_bytes)
    specs = [("gqa", True, 1), ("mha", True, 2), ("gqa", True, 3), ("gqa", False, 4), ("gqa", True, 5)]

    def make():
        out = []
        for name, packed, seed in specs:
            cfg = CONFIGS[name]
            attn, ffn, weights = _build(cfg, seed=seed)
            if packed:
                _pack(attn, cfg["ng"])
                _pack(ffn, cfg["f"])
            _perturb(attn, 20 + seed)
            _perturb(ffn, 40 + seed)
            gen = torch.Generator().manual_seed(60 + seed)
            linears = _linears(weights, {k: torch.randn(w.shape, generator=gen, dtype=F64) for k, w in weights.items()})
            out.append((linears, InPlaceLayer(linears, attn, ffn, cfg["d"], cfg["nh"] // cfg["ng"]), (attn, ffn)))
        return out

    def state(built):
        return [t.clone() for lin, _, ops in built for t in
                [lin[k].weight.data for k in KINDS] + [lin[k].weight.main_grad for k in KINDS]
                + [p.grad for op in ops for p in op.parameters()]]

    ref = make()
    eff_ref = []
    for _, layer, _ in ref:
        layer.materialize()
        eff_ref.append([layer.linears[k].weight.data.clone() for k in KINDS])
        layer.restore(with_grads=True)
    got = make()
    runner = inplace.InPlaceRunner(use_graphs=False)
    layers = [layer for _, layer, _ in got]
    runner.materialize(layers)
    # 14 groups: 3 per GQA layer (V, O, FFN), 2 for the MHA one (shared V/O, FFN); one batch per shape.
    groups = [g for layer in layers for g in layer.groups]
    sizes = [len(b.groups) for b in runner._batches]
    assert len(groups) == sum(sizes) == 14
    assert sizes == [1] * 14 if batch_bytes else (len(sizes) == len({g.key for g in groups}) and max(sizes) >= 3)
    for layer, eff in zip(layers, eff_ref):
        for kind, e in zip(KINDS, eff):
            torch.testing.assert_close(layer.linears[kind].weight.data, e, rtol=1e-13, atol=1e-13)
    runner.restore(layers, with_grads=True)
    for a, b in zip(state(got), state(ref)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    for (lin, _, _), (lin_ref, _, _) in zip(got, ref):
        for k in KINDS:
            assert torch.equal(lin[k].weight.data, lin_ref[k].weight.data)  # originals back, exactly


class _FailingCapture:
    """Stands in for ``torch.cuda.graph`` on the CPU: a capture that fails. The body runs (there is no
    real capture here), so the context puts back every watched tensor on exit, which is what a failed
    capture leaves on a GPU (nothing recorded ever ran), then raises."""

    def __init__(self, watched):
        self.watched = watched

    def __call__(self, *args, **kwargs):
        return self

    def __enter__(self):
        self.snapshot = [t().clone() if t() is not None else None for t in self.watched]

    def __exit__(self, *exc):
        for get, saved in zip(self.watched, self.snapshot):
            if saved is not None:
                get().copy_(saved)
        raise RuntimeError("operation not permitted when stream is capturing")


@pytest.mark.parametrize("failing", ["materialize", "restore"])
def test_runner_falls_back_to_eager_when_capture_fails(monkeypatch, failing):
    """A failed CUDA-graph capture (of materialize, or of the chain rule) leaves weights, main_grad and
    the operator's gradients exactly as eager execution computes them, and the runner stays eager."""
    import contextlib

    from megatron_apex.expansion import inplace

    def make():
        attn, ffn, weights = _build(CONFIGS["gqa"], seed=6)
        _pack(attn, CONFIGS["gqa"]["ng"])
        _pack(ffn, CONFIGS["gqa"]["f"])
        _perturb(attn, 3)
        _perturb(ffn, 4)
        grads = {k: torch.randn(w.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
                 for k, w in weights.items()}
        linears = _linears(weights, grads)
        return linears, [InPlaceLayer(linears, attn, ffn, CONFIGS["gqa"]["d"], 2)], [attn, ffn]

    def run(runner, linears, layers, steps=3):
        for _ in range(steps):
            runner.materialize(layers)
            runner.restore(layers, with_grads=True)
        return ([linears[k].weight.data.clone() for k in KINDS], [linears[k].weight.main_grad.clone() for k in KINDS])

    ref_lin, ref_layers, ref_ops = make()
    ref = run(inplace.InPlaceRunner(use_graphs=False), ref_lin, ref_layers)

    linears, layers, ops = make()
    runner = inplace.InPlaceRunner(use_graphs=True)
    params = [p for op in ops for p in op.parameters()]
    watched = [lambda k=k: linears[k].weight.data for k in KINDS] + \
              [lambda k=k: linears[k].weight.main_grad for k in KINDS] + [lambda p=p: p.grad for p in params]

    class Graph:  # a successful capture of materialize (the rows are written by the body itself here)
        def replay(self):
            pass

        def pool(self):
            return None

    fake = types.SimpleNamespace(wait_stream=lambda *a: None)
    monkeypatch.setattr(inplace.InPlaceRunner, "_graphs_on", lambda self, layers: self.use_graphs)
    monkeypatch.setattr(inplace, "_capture_stream", lambda: fake)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: fake)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    if failing == "materialize":
        monkeypatch.setattr(torch.cuda, "graph", _FailingCapture(watched))
    else:
        captures = iter([lambda *a, **k: contextlib.nullcontext(), _FailingCapture(watched)])
        monkeypatch.setattr(torch.cuda, "graph", lambda *a, **k: next(captures)(*a, **k))
    got = run(runner, linears, layers)
    assert not runner.use_graphs and runner._g_mat is None and runner.replays == 0
    for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
        assert torch.equal(a, b)
    for p, q in zip(params, [p for op in ref_ops for p in op.parameters()]):
        assert torch.equal(p.grad, q.grad)


def test_group_weights_of_different_dtypes_refused():
    """The saved rows of an operator's weights share one buffer: a mix of dtypes is refused by name."""
    attn, ffn, weights = _build(CONFIGS["mha"], seed=2)
    grads = {k: torch.zeros_like(w) for k, w in weights.items()}
    linears = _linears(weights, grads)
    linears["proj"].weight.data = linears["proj"].weight.data.float()  # qkv float64, proj float32
    with pytest.raises(ValueError, match=r"\['qkv', 'proj'\].*different dtypes"):
        InPlaceLayer(linears, attn, ffn, CONFIGS["mha"]["d"], 1)


def test_layer_materialized_by_runner_restores_only_through_it():
    """A runner keeps the original rows of the layers it materialized; restoring one of them on its own
    is refused with the reason, and the runner's restore puts the weights back."""
    from megatron_apex.expansion import inplace

    attn, ffn, weights = _build(CONFIGS["gqa"], seed=5)
    _perturb(attn, 1)
    _perturb(ffn, 2)
    linears = _linears(weights, {k: torch.zeros_like(w) for k, w in weights.items()})
    layer = InPlaceLayer(linears, attn, ffn, CONFIGS["gqa"]["d"], 2)
    runner = inplace.InPlaceRunner(use_graphs=False)
    runner.materialize([layer])
    with pytest.raises(RuntimeError, match="restore it through the runner"):
        layer.restore(with_grads=False)
    runner.restore([layer], with_grads=False)
    for kind, key in KINDS.items():
        assert torch.equal(linears[kind].weight.data, weights[key])
