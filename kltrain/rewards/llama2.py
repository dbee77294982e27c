"""The Llama 2 safety gate (Touvron et al. 2023, §3.2.3) as a pure function."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kltrain.rewards.errors import RewardError


def llama2_gate(
    safety_scores: torch.Tensor | Sequence[float],
    helpfulness_scores: torch.Tensor | Sequence[float],
    is_safety: torch.Tensor | Sequence[bool],
    threshold: float = 0.15,
) -> torch.Tensor:
    """Llama 2's combined reward (Touvron et al. 2023, §3.2.3), elementwise over ``[n]``::

        R_c = R_s   if is_safety or R_s < threshold
              R_h   otherwise

    ``R_s``, ``R_h`` are the safety and helpfulness reward models' scores (probabilities in
    [0, 1]); ``is_safety`` tags prompts that may elicit unsafe answers. ``R_s == threshold``
    is *not* below it. Returns float64 ``[n]``.
    """
    r_s = torch.as_tensor(safety_scores, dtype=torch.float64)
    r_h = torch.as_tensor(helpfulness_scores, dtype=torch.float64)
    tag = torch.as_tensor(is_safety, dtype=torch.bool)
    if not (r_s.shape == r_h.shape == tag.shape) or r_s.dim() != 1:
        raise RewardError(
            f"llama2_gate needs three [n] inputs; got shapes {tuple(r_s.shape)}, "
            f"{tuple(r_h.shape)}, {tuple(tag.shape)}"
        )
    return torch.where(tag | (r_s < threshold), r_s, r_h)


# ----------------------------------------------------------------------------------------------
