"""RLOO (Ahmadian et al. 2024): the baseline of each sample is the mean of the other k−1."""

from __future__ import annotations

import torch
from torch import Tensor

from kltrain.algorithms.base import GroupBaselineAlgorithm
from kltrain.rl.advantages import rloo_baseline


class Rloo(GroupBaselineAlgorithm):
    name = "rloo"

    def baseline_and_scale(
        self, totals: Tensor, group_size: int, valid: Tensor
    ) -> tuple[Tensor, Tensor]:
        return rloo_baseline(totals, group_size, valid), torch.ones_like(totals)
