"""Fused per-chunk elementwise work of the chunked lm_head path, for the CPU (torch.compile).

The same two steps as the CUDA kernels (:mod:`.cuda`): ``stats`` (per-row lse of both models,
log π(token), D and S = Σ_v π_v s_v) before the ``[c]``-sized ``loss_fn`` call, then ``grad``
(G = b·∂D/∂z − a·π + a·onehot(token)). Each is :class:`.cuda.TorchChunkOps`' torch code, compiled
once per divergence by inductor into vectorised C++ loops: a few passes over the ``[c, V]``
logits instead of the torch path's twenty-odd, and no ``[c, V]`` temporaries (the gradient is
written over the policy's logits). Same formulas, so the values agree with the torch path to
fp32 rounding.

Used for fp32 accumulation and the built-in divergences (or none), as the CUDA kernels. The
first call per divergence compiles (seconds; inductor caches the code on disk for later
processes). ``KLTRAIN_FUSED_CPU=0`` turns it off (the torch ops run), as does a torch without
inductor's CPU backend. Compilation needs a C++ compiler; when it fails, the error says so and
names the switch, rather than silently running the slower path.
"""

from __future__ import annotations

import os
import types

import torch
from torch import Tensor

from kltrain.divergence.functions import Divergence
from kltrain.divergence.kernels.cuda import TorchChunkOps
from kltrain.divergence.kernels.ids import alpha_of, kernel_id

ENV_SWITCH = "KLTRAIN_FUSED_CPU"  # "0" turns the compiled ops off (the torch path runs)


class CompiledChunkOps:
    """:class:`TorchChunkOps` for one divergence, its two steps compiled (``dynamic``: one
    compilation serves every chunk size)."""

    def __init__(self, div: Divergence | None):
        twin = TorchChunkOps()

        def stats(z: Tensor, zq: Tensor | None, tok: Tensor):
            return twin.stats(z, zq, tok, div)

        def grad(z, zq, tok, aux, a, b):
            return twin.grad_values(z, zq, tok, aux, a, b, div)

        tag = f"{kernel_id(div).name.lower()}_{alpha_of(div)}".replace(".", "_").replace("-", "m")
        self._stats = torch.compile(_own_code(stats, f"stats_{tag}"), dynamic=True)
        self._grad = torch.compile(_own_code(grad, f"grad_{tag}"), dynamic=True)
        self._compiled = False

    def stats(self, z: Tensor, zq: Tensor | None, tok: Tensor, div: Divergence | None):
        """-> (log π(token) [c], D [c] or None, aux), as :meth:`TorchChunkOps.stats`."""
        return self._first_call(self._stats, z, zq, tok)

    def grad(self, z, zq, tok, aux, a, b, out, div):
        """G as :meth:`TorchChunkOps.grad`, but in a new ``[c, V]`` tensor: ``out`` is unused.
        (Inductor writes a graph's result to a buffer of its own; copying it into ``out`` would
        cost a pass over ``[c, V]``. The caller's logits buffer is dead by then, so the new one
        is the only extra ``[c, V]`` alive, and glibc's kept heap hands it out again for the next
        chunk.)"""
        return self._first_call(self._grad, z, zq, tok, aux, a, b)

    def _first_call(self, fn, *args):
        if self._compiled:
            return fn(*args)
        try:
            out = fn(*args)
        except Exception as err:  # inductor's errors have many types (compiler, codegen, ...)
            raise RuntimeError(
                f"compiling the fused CPU lm_head ops failed ({type(err).__name__}: {err}); "
                f"inductor needs a working C++ compiler. Set {ENV_SWITCH}=0 to use the torch ops."
            ) from err
        self._compiled = True
        return out


def _own_code(fn, name: str):
    """``fn`` with a code object of its own. Dynamo keeps compiled graphs per code object, with
    a limit on how many it keeps (8) before running the function uncompiled; closures of one
    ``def`` share theirs, so without this the divergences would share that limit."""
    names = {"co_name": name}
    if hasattr(fn.__code__, "co_qualname"):  # Python ≥ 3.11
        names["co_qualname"] = name
    code = fn.__code__.replace(**names)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


_OPS: dict[tuple, CompiledChunkOps] = {}


def chunk_ops(device: torch.device, acc: torch.dtype, div: Divergence | None):
    """The compiled ops for this divergence on the CPU in fp32, or None (use torch)."""
    kid = kernel_id(div)
    if device.type != "cpu" or acc != torch.float32 or kid is None:
        return None
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    key = (kid, alpha_of(div))
    if key not in _OPS:
        _OPS[key] = CompiledChunkOps(div)
    return _OPS[key]
