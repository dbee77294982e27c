"""Fused per-chunk elementwise work of the chunked lm_head path, for the CPU (torch.compile).

The same two steps as the CUDA kernels (:mod:`.cuda`): ``stats`` (per-row lse of both models,
log π(token), D and S = Σ_v π_v s_v) before the ``[c]``-sized ``loss_fn`` call, then ``grad``
(G = b·∂D/∂z − a·π + a·onehot(token)). Each is :class:`.cuda.TorchChunkOps`' torch code, compiled
once per divergence by inductor into vectorised C++ loops: a few passes over the ``[c, V]``
logits instead of the torch path's twenty-odd, and one ``[c, V]`` result (G) as the only
temporary. Same formulas, so the values agree with the torch path to fp32 rounding.

Used for fp32 accumulation and the built-in divergences (or none), as the CUDA kernels, on
calls over at least :data:`MIN_TOKENS` tokens (``KLTRAIN_FUSED_CPU``: ``auto``, the default;
``1`` always; ``0`` never, the torch ops run). The first call per divergence compiles (seconds;
inductor caches the code on disk for later processes). Compilation needs a C++ compiler; when it
fails, the error says so and names the switch, rather than silently running the slower path.
"""

from __future__ import annotations

import os
import types

import torch
from torch import Tensor

from kltrain.divergence.functions import Divergence
from kltrain.divergence.kernels.cuda import TorchChunkOps
from kltrain.divergence.kernels.ids import alpha_of, kernel_id

ENV_SWITCH = "KLTRAIN_FUSED_CPU"  # auto (default) | 1 (always) | 0 (never: the torch path runs)
#: ``auto`` compiles only for calls over this many tokens. Below it the torch loop's elementwise
#: work is tens of ms per call (measured on 2 cores at V = 49,152: the compiled steps save
#: 0.17 ms per token for the KLs, up to 0.6 ms for JS and α), while loading inductor and
#: compiling costs ~0.2 GB of resident memory and a few seconds once per process and divergence.
MIN_TOKENS = 512


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
        self._compiled: set = set()  # the steps whose first call (compilation) succeeded

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
        if fn in self._compiled:
            return fn(*args)
        try:
            out = fn(*args)
        except Exception as err:  # inductor's errors have many types (compiler, codegen, ...)
            raise RuntimeError(
                f"compiling the fused CPU lm_head ops failed ({type(err).__name__}: {err}); "
                f"inductor needs a working C++ compiler. Set {ENV_SWITCH}=0 to use the torch ops."
            ) from err
        self._compiled.add(fn)
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


def chunk_ops(device: torch.device, acc: torch.dtype, div: Divergence | None, tokens: int):
    """The compiled ops for this divergence on the CPU in fp32, or None (use torch).

    ``KLTRAIN_FUSED_CPU``: ``auto`` (default) uses them for calls over at least
    :data:`MIN_TOKENS` tokens, ``1`` always, ``0`` never."""
    kid = kernel_id(div)
    if device.type != "cpu" or acc != torch.float32 or kid is None:
        return None
    mode = os.environ.get(ENV_SWITCH, "auto")
    if mode not in ("auto", "1", "0"):
        raise ValueError(f"{ENV_SWITCH}={mode!r}: use auto (the default), 1 (always) or 0 (never)")
    if mode == "0" or (mode == "auto" and tokens < MIN_TOKENS):
        return None
    key = (kid, alpha_of(div))
    if key not in _OPS:
        _OPS[key] = CompiledChunkOps(div)
    return _OPS[key]
