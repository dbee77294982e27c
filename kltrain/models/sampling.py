"""Sampling whose randomness belongs to the sample, not to the process.

Each completion draws from its own stream, seeded by ``(seed, step, global sample index)``, so the
same sample gets the same noise whether the step runs on 1 process or on N, in one generation
batch or in several. Implemented as Gumbel-max inside greedy decoding: at each position the
processor warps the logits as Hugging Face's sampler does (temperature, then top-k, then top-p),
adds independent Gumbel(0, 1) noise ``g_v = −log(−log u_v)`` drawn from the row's own
``torch.Generator``, and ``generate(do_sample=False)`` takes the argmax; ``argmax_v(ℓ_v + g_v)`` is
a draw from ``softmax(ℓ)`` (Gumbel-max trick), so the distribution is that of ``do_sample=True``.

Cost: one ``[V]`` float64 uniform draw per row and token, from a per-row generator (a Python loop
over the rows of the generation batch), against one ``[B, V]`` draw for the batched sampler.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import (
    LogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of step ``step`` of a run seeded ``seed``: the three
    integers mixed by splitmix64 rounds, so neighbouring samples get unrelated streams."""
    state = 0
    for value in (seed, step, index):
        state = _splitmix64((state ^ (value & _MASK64)) & _MASK64)
    return state >> 1  # torch.Generator.manual_seed takes an int64-sized value


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class PerSampleGumbel(LogitsProcessor):
    """Warp as ``do_sample=True`` would, then add each row's own Gumbel noise (for greedy
    decoding). ``seeds[i]`` seeds row i of the batch ``generate`` is called with."""

    def __init__(self, seeds: list[int], temperature: float, top_k: int, top_p: float, device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.warpers: list[LogitsProcessor] = []
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """``scores`` [B, V] next-token logits → [B, V] float64 warped log-probs + Gumbel noise."""
        if scores.shape[0] != len(self.generators):
            raise ValueError(
                f"PerSampleGumbel has {len(self.generators)} row streams but generate passed "
                f"{scores.shape[0]} rows (num_return_sequences and beams are not supported)"
            )
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        logp = torch.log_softmax(scores.double(), dim=-1)
        # Each row's draw from its own stream (torch.rand's numbers), then g = −log(−log u), in
        # place: one [B, V] buffer instead of a fresh one per operation, every decoding step.
        noise = torch.empty(logp.shape, dtype=torch.float64, device=self.generators[0].device)
        for row, g in zip(noise, self.generators):
            row.uniform_(generator=g)
        # u = 0 has probability 2^-53 per entry; clamp it so that log(u) stays finite
        noise.clamp_min_(torch.finfo(torch.float64).tiny).log_().neg_().log_().neg_()
        return logp.add_(noise.to(logp.device))
