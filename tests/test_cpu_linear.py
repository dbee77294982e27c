"""oneDNN's linear for CPU fp32 layers (kltrain/models/cpu_linear.py): the same product and,
under ``with_grad``, the same gradients as ``torch.nn.functional.linear`` to fp32 rounding,
torch's own op for a gradient outside it, every plain Linear routed inside the context and
restored after it, and sampling unchanged.

Tolerances: each output is a dot product of ``in`` terms plus a bias; oneDNN and the float64
reference each sum in their own order, so they differ by at most ``2·γ_in·Σ|x_k w_k|``
(:func:`tests.conftest.reduction_order_tol`, plus one rounding of the bias add)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from kltrain.config import ModelConfig
from kltrain.divergence.kernels import onednn
from kltrain.models.cpu_linear import ENV_SWITCH, OneDNNLinear, linear, onednn_linears
from kltrain.models.loading import load_models
from kltrain.models.sampling import sample_seed
from kltrain.rollout import generate
from tests.conftest import TINY_DEPTH, TINY_WIDTH, U32, gamma, reduction_order_tol

pytestmark = pytest.mark.skipif(
    not onednn.available(), reason="this torch build has no oneDNN linear"
)
ONEDNN_OP = "mkldnn::_linear_pointwise"
PACK_OP = "mkldnn::_reorder_linear_weight"


def ops_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("shape", [(8, 96), (2, 5, 96), (1, 1, 96)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_is_the_product_to_fp32_rounding(shape, with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(40, 96, generator=g)
    b = torch.randn(40, generator=g) if with_bias else None
    with torch.no_grad():
        got = linear(x, w, b)
        ran = ops_run(lambda: linear(x, w, b))
    assert ONEDNN_OP in ran
    exact = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    abs_terms = x.double().abs() @ w.double().abs().t()
    bound = reduction_order_tol(96, 1.0) * abs_terms + 2 * U32 * exact.abs()
    assert got.shape == exact.shape and got.dtype == torch.float32
    assert close(got, exact, bound)


@pytest.mark.parametrize("rows", [1, 8, 37])
def test_a_packed_weight_gives_the_product_to_fp32_rounding(rows):
    """Packed for 8 rows, used at 8 and at other row counts (the prefill's)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(rows, 96, generator=g)
    w = torch.randn(40, 96, generator=g)
    b = torch.randn(40, generator=g)
    before = w.clone()
    packed = onednn.pack(w, 8)
    with torch.no_grad():
        got = onednn.linear(x, packed, b)
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    bound = reduction_order_tol(96, 1.0) * (x.double().abs() @ w.double().abs().t())
    assert close(got, exact, bound + 2 * U32 * exact.abs())
    assert packed.is_mkldnn and torch.equal(w, before)  # a copy; the weight is untouched


def test_linear_on_a_transposed_input():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 6, generator=g).t()  # [6, 96], not contiguous
    w = torch.randn(40, 96, generator=g)
    with torch.no_grad():
        got = linear(x, w, None)
    exact = x.double() @ w.double().t()
    bound = reduction_order_tol(96, 1.0) * (x.double().abs() @ w.double().abs().t())
    assert close(got, exact, bound)


def test_a_call_that_needs_a_gradient_is_torchs_own_linear():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 16, generator=g, requires_grad=True)
    w = torch.randn(8, 16, generator=g, requires_grad=True)
    y = linear(x, w, None)
    assert ONEDNN_OP not in ops_run(lambda: linear(x, w, None))
    assert torch.equal(y, torch.nn.functional.linear(x, w))
    y.sum().backward()
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    torch.nn.functional.linear(x2, w2).sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(w.grad, w2.grad)


@pytest.mark.parametrize("frozen_weight", [False, True])
def test_with_grad_the_gradients_are_the_products_to_fp32_rounding(frozen_weight):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 96, generator=g, requires_grad=True)
    w = torch.randn(40, 96, generator=g, requires_grad=not frozen_weight)
    b = torch.randn(40, generator=g, requires_grad=not frozen_weight)
    grad_y = torch.randn(3, 5, 40, generator=g)
    y = linear(x, w, b, with_grad=True)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == f"{OneDNNLinear.__name__}Backward"
    y.backward(grad_y)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    torch.nn.functional.linear(xd, wd, bd).backward(grad_y.double())
    gy, xa, wa = grad_y.double().abs(), xd.detach().abs(), wd.detach().abs()
    # each gradient entry is a sum over out (∂x: 40 terms) or over the 15 rows (∂W, ∂b)
    assert close(x.grad, xd.grad, reduction_order_tol(40, 1.0) * (gy @ wa))
    if frozen_weight:
        assert w.grad is None and b.grad is None
    else:
        flat_gy, flat_x = gy.reshape(15, 40), xa.reshape(15, 96)
        assert close(w.grad, wd.grad, reduction_order_tol(15, 1.0) * (flat_gy.t() @ flat_x))
        assert close(b.grad, bd.grad, reduction_order_tol(15, 1.0) * flat_gy.sum(0))


def close(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> bool:
    """Within ``bound`` entrywise, and not by accident of a no-op: the exact values are far
    from zero."""
    return bool(((got.double() - exact).abs() <= bound).all()) and exact.abs().max() > 1


def test_with_grad_the_layer_trains_through_onednn(models):
    policy = models.policy
    ids = torch.tensor([[5, 6, 7, 8]])
    want = policy(ids).logits
    want.sum().backward()
    want_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)
    with onednn_linears(policy, with_grad=True):
        assert ONEDNN_OP in ops_run(lambda: policy(ids))
        got = policy(ids).logits
    got.sum().backward()  # after the block: the recorded OneDNNLinear nodes run their backward
    torch.testing.assert_close(got, want, rtol=0, atol=pass_tol(want))
    for name, p in policy.named_parameters():
        torch.testing.assert_close(
            p.grad, want_grads[name], rtol=0, atol=pass_tol(want_grads[name])
        )
    policy.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_are_torchs_own_linear(dtype):
    x, w = torch.ones(2, 8, dtype=dtype), torch.ones(3, 8, dtype=dtype)
    with torch.no_grad():
        assert ONEDNN_OP not in ops_run(lambda: linear(x, w, None))
        assert torch.equal(linear(x, w, None), torch.full((2, 3), 8.0, dtype=dtype))


@pytest.fixture(scope="module")
def models(tiny_model):
    return load_models(ModelConfig(policy=tiny_model))


def pass_tol(reference: torch.Tensor) -> float:
    """Two fp32 forwards of the tiny model that sum in different orders: each output runs
    through TINY_DEPTH layers of ≤ TINY_WIDTH-term sums, so each pass is within
    γ_(depth·width) of exact relative to the output's scale; twice that for the difference, × 4
    for the normalisations and softmax that rescale errors between layers (a stated factor)."""
    return 4 * 2 * gamma(TINY_DEPTH * TINY_WIDTH) * reference.abs().max().item()


def linears(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


def test_the_context_routes_every_linear_once_and_restores_them(models):
    policy, reference = models.policy, models.reference_model
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = policy(ids).logits
        with onednn_linears(policy, reference, policy) as routed:
            assert routed == len(linears(policy)) + len(linears(reference))
            assert all("forward" in m.__dict__ for m in linears(policy))
            with onednn_linears(policy) as nested:  # already routed: left to the outer block
                assert nested == 0
            assert ONEDNN_OP in ops_run(lambda: policy(ids))
            got = policy(ids).logits
        assert ONEDNN_OP not in ops_run(lambda: policy(ids))
    assert not any("forward" in m.__dict__ for m in linears(policy) + linears(reference))
    torch.testing.assert_close(got, want, rtol=0, atol=pass_tol(want))
    assert not torch.equal(want, torch.zeros_like(want))


def test_the_switch_turns_the_path_off(models, monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "0")
    with onednn_linears(models.policy) as routed:
        assert routed == 0
        assert not any("forward" in m.__dict__ for m in linears(models.policy))


def test_sampling_gives_the_same_completions_with_and_without_onednn(models, monkeypatch):
    texts = ["great movie", "the plot was", "awful acting and", "I loved"] * 2

    def sample():
        hidden = []
        ids, *_ = generate(
            models, texts, max_prompt_tokens=16, max_new_tokens=10, min_new_tokens=10,
            temperature=1.0, top_k=0, top_p=1.0, batch_size=8,
            seeds=[sample_seed(0, 0, i) for i in range(8)], hidden_out=hidden,
        )  # fmt: skip
        return ids, hidden[0]

    ids, hidden = sample()
    monkeypatch.setenv(ENV_SWITCH, "0")
    want_ids, want_hidden = sample()
    # Gumbel-max draws flip only where two perturbed logits tie to within fp32 rounding
    # (probability ~1e-6 per token here), so the tokens are equal and the states agree.
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(hidden, want_hidden, rtol=0, atol=pass_tol(want_hidden))


def test_packed_rows_packs_every_layer_with_siblings_stacked_and_restores_them(models):
    """Per decoder layer one copy each for q/k/v stacked, o, gate/up stacked and down, plus
    the lm_head's; and one product per copy in a forward."""
    policy = models.policy
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    copies = 4 * policy.config.num_hidden_layers + 1
    with torch.no_grad():
        want = policy(ids).logits
        with (
            profile(activities=[ProfilerActivity.CPU]) as prof,
            onednn_linears(policy, packed_rows=2) as routed,
        ):
            got = policy(ids).logits
    counts = {e.key: e.count for e in prof.key_averages()}
    assert routed == len(linears(policy)) == 7 * policy.config.num_hidden_layers + 1
    assert counts.get(PACK_OP, 0) == copies and counts.get(ONEDNN_OP, 0) == copies
    assert not any("forward" in m.__dict__ for m in linears(policy))
    torch.testing.assert_close(got, want, rtol=0, atol=pass_tol(want))
    assert not torch.equal(want, torch.zeros_like(want))


class Siblings(torch.nn.Module):
    """Attention's three input projections, called in the order given."""

    def __init__(self, k_bias: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.q_proj, self.k_proj = torch.nn.Linear(96, 40), torch.nn.Linear(96, 24, bias=k_bias)
        self.v_proj = torch.nn.Linear(96, 24)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g)

    def forward(self, x, order=("q_proj", "k_proj", "v_proj")):
        return {name: getattr(self, name)(x) for name in order}


def assert_products(model: Siblings, x: torch.Tensor, got: dict) -> None:
    """Each layer's output against its own product in float64, within the linear's bound."""
    for name, out in got.items():
        layer = getattr(model, name)
        w, b = layer.weight.double(), layer.bias
        exact = torch.nn.functional.linear(x.double(), w, None if b is None else b.double())
        bound = reduction_order_tol(96, 1.0) * (x.double().abs() @ w.abs().t())
        assert close(out, exact, bound + 2 * U32 * exact.abs()), name


@pytest.mark.parametrize("order", [("q_proj", "k_proj", "v_proj"), ("v_proj", "q_proj", "k_proj")])
def test_siblings_share_one_packed_product_per_input(order):
    model = Siblings()
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), onednn_linears(model, packed_rows=3):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            got = model(x, order)
        again = model(x, order)  # the same input once more: a product of its own, not a reuse
    assert {e.key: e.count for e in prof.key_averages()}.get(ONEDNN_OP, 0) == 1
    assert_products(model, x, got)
    assert all(torch.equal(again[n], got[n]) for n in order)


def test_a_sibling_whose_input_changed_or_differs_computes_its_own_product():
    model = Siblings()
    g = torch.Generator().manual_seed(2)
    x, other = torch.randn(3, 96, generator=g), torch.randn(5, 96, generator=g)
    with torch.no_grad(), onednn_linears(model, packed_rows=3):
        q = model.q_proj(x)
        x.add_(1.0)  # in place: the parts kept for the old values must not be served
        k = model.k_proj(x)
        v = model.v_proj(other)
    assert_products(model, x - 1.0, {"q_proj": q})
    assert_products(model, x, {"k_proj": k})
    assert_products(model, other, {"v_proj": v})


def test_siblings_with_and_without_bias_are_packed_one_by_one():
    model = Siblings(k_bias=False)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(3))
    with (
        torch.no_grad(),
        profile(activities=[ProfilerActivity.CPU]) as prof,
        onednn_linears(model, packed_rows=3),
    ):
        got = model(x)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get(PACK_OP, 0) == 3 and counts.get(ONEDNN_OP, 0) == 3
    assert_products(model, x, got)


def test_inside_a_packed_block_a_call_that_needs_a_gradient_is_torchs_own(models):
    """The packed copy has no autograd: a grad-recording call uses the weight itself."""
    policy = models.policy
    ids = torch.tensor([[5, 6, 7, 8]])
    want = policy(ids).logits
    with onednn_linears(policy, packed_rows=1):
        got = policy(ids).logits
        assert ONEDNN_OP not in ops_run(lambda: policy(ids))
    assert torch.equal(got, want)
    got.sum().backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    policy.zero_grad(set_to_none=True)


def test_packed_rows_are_refused_for_a_block_that_records_gradients(models):
    refused = pytest.raises(ValueError, match="packed_rows is for no-grad blocks")
    with refused, onednn_linears(models.policy, with_grad=True, packed_rows=8):
        pass


def test_a_placeholder_weight_is_routed_but_not_packed():
    """An engine's empty stand-in (ZeRO-3 outside its gathered block) is not copied: the layer
    keeps the plain routed forward, which reads the weight at call time."""
    layer = torch.nn.Linear(16, 8)
    layer.weight = torch.nn.Parameter(torch.empty(0))
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), layer)
    with (
        torch.no_grad(),
        profile(activities=[ProfilerActivity.CPU]) as prof,
        onednn_linears(model, packed_rows=4) as routed,
    ):
        pass
    assert routed == 2
    assert {e.key: e.count for e in prof.key_averages()}.get(PACK_OP, 0) == 1
