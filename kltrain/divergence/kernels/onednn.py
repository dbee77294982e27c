"""oneDNN's fp32 CPU linear as a plain tensor op: ``y = x Wᵀ + b`` by
``torch.ops.mkldnn._linear_pointwise`` (the kernel torch's inductor calls for CPU linears) on the
weights as they are, or on a copy reordered once into oneDNN's blocked layout (:func:`pack`) where
one weight serves many small products (decoding).

On x86 CPUs torch's own fp32 GEMM is MKL's; oneDNN's is faster at the shapes of an lm_head chunk
and of a decoding step (measured on 2 AMD EPYC cores: a [256, 576] × [576, 49152] product
110 → 88 ms, its ``G @ W`` 89 → 76 ms; :mod:`kltrain.models.cpu_linear` has the model's layers).
The sums run in another order, so results agree with ``torch.mm`` to fp32 rounding, not bit for
bit. No autograd: callers form gradients themselves (the chunked lm_head path) or wrap it
(:class:`kltrain.models.cpu_linear.OneDNNLinear`).

Applies to fp32 CPU tensors outside CPU autocast, not sharded (DTensor), where the torch build
has oneDNN's linear; ``KLTRAIN_ONEDNN_LINEAR=0`` turns it off (to compare, or to rule it out).
bf16 is left to torch: oneDNN's needs CPU features that not every x86 machine has.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

ENV_SWITCH = "KLTRAIN_ONEDNN_LINEAR"


def available() -> bool:
    """Whether this torch build has oneDNN's linear and the user has not switched it off."""
    return os.environ.get(ENV_SWITCH, "1") != "0" and _built_with_op()


@functools.cache
def _built_with_op() -> bool:
    # asked once per process: every Linear call of a decoding step goes through applies()
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def applies(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether :func:`linear` computes ``x Wᵀ + b`` for these tensors (see the module docstring)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if bias is not None and bias.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu") or isinstance(weight, DTensor) or isinstance(x, DTensor):
        return False
    return available()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x [..., in]``, ``W [out, in]``, ``b [out]`` → ``x Wᵀ + b [..., out]`` by oneDNN
    (callers check :func:`applies`); ``W`` may be a transposed view."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def pack(weight: Tensor, rows: int) -> Tensor:
    """``W [out, in]`` → a copy reordered into oneDNN's blocked layout for products with
    ``rows`` input rows (an opaque ``torch._mkldnn`` tensor that :func:`linear` takes in place
    of ``W``, for any number of rows; no autograd). Pays where one weight serves many small
    products, as in decoding (:mod:`kltrain.models.cpu_linear` has the measured figures)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a [m, k] @ b [k, n]`` by oneDNN (callers check :func:`applies`)."""
    return linear(a, b.t())
