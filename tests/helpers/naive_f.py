"""MATH.md's f table written out again, independently of kltrain, for tests (float64 use).

Each entry is ``(u, alpha) -> tensor``; ``alpha`` is ignored except by ``alpha``.
"""

from __future__ import annotations

import torch

NAIVE_F = {
    "reverse_kl": lambda u, _: u * torch.log(u),
    "forward_kl": lambda u, _: -torch.log(u),
    "js": lambda u, _: 0.5 * (u * torch.log(u) - (u + 1) * torch.log((u + 1) / 2)),
    "tv": lambda u, _: 0.5 * torch.abs(u - 1),
    "alpha": lambda u, a: (u**a - a * u - (1 - a)) / (a * (a - 1)),
    "hellinger": lambda u, _: (torch.sqrt(u) - 1) ** 2,
    "chi2": lambda u, _: (u - 1) ** 2,
}

NAIVE_FP = {
    "reverse_kl": lambda u, _: torch.log(u) + 1,
    "forward_kl": lambda u, _: -1 / u,
    "js": lambda u, _: 0.5 * torch.log(2 * u / (u + 1)),
    "tv": lambda u, _: 0.5 * torch.sign(u - 1),
    "alpha": lambda u, a: (u ** (a - 1) - 1) / (a - 1),
    "hellinger": lambda u, _: 1 - 1 / torch.sqrt(u),
    "chi2": lambda u, _: 2 * (u - 1),
}
