"""oneDNN for the fp32 Linear layers of CPU forwards: decoding, the scoring passes and, on one
process or DDP, the training forward.

On x86 CPUs torch computes an fp32 ``nn.Linear`` with MKL's GEMM; oneDNN's linear
(:mod:`kltrain.divergence.kernels.onednn`) computes the same ``y = x Wᵀ + b`` (``x [..., in]``,
``W [out, in]``, ``y [..., out]``) on the same weights, faster at the shapes of a decoding step
(8 rows) and of a scoring or training pass (a few hundred rows): on 2 AMD EPYC cores, the
embedded model's Linear layers per decoded token went 52 → 41 ms and its tied lm_head 21 → 9 ms,
the body at 340 rows 479 → 392 ms, with the weights streamed from memory as in a real forward
(``scripts/bench_step.py`` has the step-level figures). Results agree with
``torch.nn.functional.linear`` to fp32 rounding, not bit for bit.

For decoding (``packed_rows``), each weight is first copied into oneDNN's blocked layout for
the batch's rows: at 8 rows the Linear layers without the lm_head then took 37 → 26 ms per token
on the same cores, for a reorder of ~0.1 s per rollout and a second copy of those weights while
decoding (freed before the scoring passes and the update, which set the step's peak RSS: it did
not move). Stacking q/k/v and gate/up into one product each (7 → 4 products per layer) and
packing the lm_head too (8.6 → 5.7 ms per token, for a 50 ms reorder) took a rollout of
8 × 32 tokens 2.50 → 2.30 s (medians of 13 alternated runs; 2.16 → 1.99 s at best).

Under autograd (``with_grad``) the layer is :class:`OneDNNLinear`: the input's gradient
``∂x = ∂y W`` is oneDNN's too (12% faster at these shapes), the weight's ``∂W = ∂yᵀ x`` and
the bias's ``Σ ∂y`` are torch's own (MKL's is the faster there). Not under an engine that
shards or gathers weights around the layer (FSDP2, DeepSpeed): the trainer routes the training
forward only on one process or DDP.

Where oneDNN does not apply (not all fp32 on the CPU, CPU autocast, a sharded weight,
``KLTRAIN_ONEDNN_LINEAR=0``), and for a call that needs a gradient outside ``with_grad``, the
layer computes ``torch.nn.functional.linear`` as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from kltrain.divergence.kernels import onednn
from kltrain.divergence.kernels.onednn import ENV_SWITCH

__all__ = ["ENV_SWITCH", "SIBLING_GROUPS", "OneDNNLinear", "linear", "onednn_linears"]

#: Linear layers that read one input, by the names of Llama-family models (Llama, Mistral,
#: Qwen2/3, Gemma, SmolLM): attention's projections and the gated MLP's two input layers.
SIBLING_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, with_grad: bool = False) -> Tensor:
    """``x Wᵀ + b`` by oneDNN where it applies (see the module docstring), else by torch."""
    if not onednn.applies(x, weight, bias):
        return torch.nn.functional.linear(x, weight, bias)
    recorded = (t is not None and t.requires_grad for t in (x, weight, bias))
    if torch.is_grad_enabled() and any(recorded):
        if with_grad:
            return OneDNNLinear.apply(x, weight, bias)
        return torch.nn.functional.linear(x, weight, bias)
    return onednn.linear(x, weight, bias)


class OneDNNLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` (``x [..., in]``, ``W [out, in]``, ``b [out]``) by oneDNN, with
    ``∂x = ∂y W`` by oneDNN and ``∂W = ∂yᵀ x``, ``∂b = Σ ∂y`` (over every leading axis) by
    torch. Saves what ``torch.nn.functional.linear`` saves: the input and the weight."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        return onednn.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn.linear(grad_y, weight.t())
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # (a frozen LoRA base layer needs ∂x only: no reshape, which copies a strided ∂y)
            flat_grad = grad_y.reshape(-1, grad_y.shape[-1])
            if ctx.needs_input_grad[1]:
                grad_w = flat_grad.t().mm(x.reshape(-1, x.shape[-1]))
            if ctx.needs_input_grad[2]:
                grad_b = flat_grad.sum(0)
        return grad_x, grad_w, grad_b


@contextmanager
def onednn_linears(
    *models: torch.nn.Module | None, with_grad: bool = False, packed_rows: int | None = None
) -> Iterator[int]:
    """Inside the block, every plain ``torch.nn.Linear`` of ``models`` whose weight is on the
    CPU in fp32 computes through :func:`linear` (``with_grad``: also where autograd records,
    as :class:`OneDNNLinear`; the backward runs it after the block too); yields how many
    layers were routed (0 when oneDNN is unavailable or switched off). Layers shared by several
    models (a peft reference that is the policy with its adapters off) are routed once; all are
    restored on exit.

    ``packed_rows`` (no-grad blocks of small products, e.g. decoding ``packed_rows`` sequences):
    each routed layer's weight is first copied into oneDNN's blocked layout for that many rows
    (:func:`kltrain.divergence.kernels.onednn.pack`), and its no-grad calls use the copy. The
    copies hold a second set of the weights until the block ends, and they are taken at entry:
    the weights must not change inside the block. Sibling layers that read one input
    (:data:`SIBLING_GROUPS`: q/k/v, gate/up) share one copy of their stacked weights and one
    product per input, which each splits off its part of."""
    if with_grad and packed_rows is not None:
        raise ValueError("onednn_linears: packed_rows is for no-grad blocks; with_grad=True")
    routed: dict[int, torch.nn.Linear] = {}
    if onednn.available():
        for model in models:
            for module in () if model is None else model.modules():
                if id(module) not in routed and _routable(module):
                    module.forward = _routed_forward(module, with_grad)
                    routed[id(module)] = module
        if packed_rows is not None:
            _pack(models, routed, packed_rows)
    try:
        yield len(routed)
    finally:
        for module in routed.values():
            del module.forward  # the instance attribute; the class's forward shows again


def _pack(models, routed: dict[int, torch.nn.Linear], rows: int) -> None:
    """Give each packable routed layer a packed forward: sibling groups
    (:data:`SIBLING_GROUPS`) one packed copy of their stacked weights, the rest one copy
    each."""
    todo = {key: m for key, m in routed.items() if _packable(m)}
    for model in models:
        for group in () if model is None else _sibling_groups(model, todo):
            shared = _SharedProduct(group, rows)
            for index, member in enumerate(group):
                member.forward = shared.forward_of(index)
                del todo[id(member)]
    for module in todo.values():
        module.forward = _packed_forward(module, onednn.pack(module.weight, rows))


def _sibling_groups(model: torch.nn.Module, candidates: dict[int, torch.nn.Linear]):
    """The :data:`SIBLING_GROUPS` among ``model``'s direct children of one parent: every member
    a candidate, with one input size, and a bias on all of them or on none."""
    for parent in model.modules():
        for names in SIBLING_GROUPS:
            group = [getattr(parent, name, None) for name in names]
            if all(id(m) in candidates for m in group) and _stackable(group):
                yield group


def _stackable(group: list[torch.nn.Linear]) -> bool:
    same_input = len({m.in_features for m in group}) == 1
    return same_input and len({m.bias is None for m in group}) == 1


class _SharedProduct:
    """One packed product for sibling layers that read the same input: ``y = x [W₁; W₂; …]ᵀ +
    [b₁; b₂; …]`` (``[..., Σ out]``), split into each layer's ``[..., out_i]``. Whichever member
    is called first with an input computes it and keeps the others' parts for that input (the
    same tensor object, unmodified since); a member whose part is not kept, or a call that
    oneDNN or the copy cannot serve, computes its own product on its own weight."""

    def __init__(self, members: list[torch.nn.Linear], rows: int):
        self.members = members
        stacked = torch.cat([m.weight.detach() for m in members])
        self.packed = onednn.pack(stacked, rows)
        biases = [m.bias for m in members]
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        self.sizes = [m.out_features for m in members]
        self.input: tuple[Tensor, int] | None = None  # (x, x._version) of the kept parts
        self.kept: list[Tensor | None] = [None] * len(members)

    def forward_of(self, index: int):
        module = self.members[index]

        def forward(x: Tensor) -> Tensor:
            if not _copy_serves(x, module):
                return linear(x, module.weight, module.bias)
            if self.kept[index] is not None and self._kept_for(x):
                part, self.kept[index] = self.kept[index], None
                return part
            parts = list(onednn.linear(x, self.packed, self.bias).split(self.sizes, dim=-1))
            self.input = (x, x._version)
            part, parts[index] = parts[index], None
            self.kept = parts
            return part

        return forward

    def _kept_for(self, x: Tensor) -> bool:
        return self.input is not None and self.input[0] is x and self.input[1] == x._version


def _routable(module: torch.nn.Module) -> bool:
    if type(module) is not torch.nn.Linear or "forward" in module.__dict__:
        return False
    weight = module.weight
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def _packable(module: torch.nn.Linear) -> bool:
    """A whole, plain weight: not a DTensor shard, nor an engine's empty placeholder (ZeRO-3
    outside its gathered block)."""
    weight = module.weight
    whole = tuple(weight.shape) == (module.out_features, module.in_features)
    return whole and onednn.applies(weight, weight, module.bias)


def _routed_forward(module: torch.nn.Linear, with_grad: bool):
    def forward(x: Tensor) -> Tensor:
        return linear(x, module.weight, module.bias, with_grad)

    return forward


def _packed_forward(module: torch.nn.Linear, packed: Tensor):
    def forward(x: Tensor) -> Tensor:
        if not _copy_serves(x, module):
            return linear(x, module.weight, module.bias)
        return onednn.linear(x, packed, module.bias)

    return forward


def _copy_serves(x: Tensor, module: torch.nn.Linear) -> bool:
    """Whether a packed copy of ``module``'s weight can compute this call: it has no autograd,
    nor another dtype."""
    return not torch.is_grad_enabled() and onednn.applies(x, module.weight, module.bias)
