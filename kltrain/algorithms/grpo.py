"""GRPO (Shao et al. 2024): group-normalised advantages, clipped ratio over several passes."""

from __future__ import annotations

import torch
from torch import Tensor

from kltrain.advantages import grpo_advantages
from kltrain.algorithms.base import GroupBaselineAlgorithm

STD_EPS = 1e-4  # added to the group std, as grpo_advantages and TRL do


class Grpo(GroupBaselineAlgorithm):
    name = "grpo"

    def baseline_and_scale(self, totals: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
        """b = group mean; s = unbiased group std + ε (1 when ``scale_rewards`` is off)."""
        baseline = totals - grpo_advantages(totals, group_size, scale=False)
        if not self.cfg.algorithm.scale_rewards:
            return baseline, torch.ones_like(totals)
        std = totals.view(-1, group_size).std(dim=1, unbiased=True)
        return baseline, (std + STD_EPS).repeat_interleave(group_size)
