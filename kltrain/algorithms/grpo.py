"""GRPO (Shao et al. 2024): group-normalised advantages, clipped ratio over several passes."""

from __future__ import annotations

import torch
from torch import Tensor

from kltrain.algorithms.base import GroupBaselineAlgorithm
from kltrain.rl.advantages import group_mean_std

STD_EPS = 1e-4  # added to the group std (not the variance), as TRL does


class Grpo(GroupBaselineAlgorithm):
    name = "grpo"

    def baseline_and_scale(
        self, totals: Tensor, group_size: int, valid: Tensor
    ) -> tuple[Tensor, Tensor]:
        """b = group mean; s = unbiased group std + ε (1 when ``scale_rewards`` is off), both
        over the group's valid samples."""
        mean, std = group_mean_std(totals, group_size, valid)
        if not self.cfg.algorithm.scale_rewards:
            return mean, torch.ones_like(totals)
        return mean, std + STD_EPS
