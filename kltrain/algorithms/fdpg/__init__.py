"""f-DPG: minimise D_f(π‖p) toward a target p (the algorithm, its targets, Z and λ)."""

from kltrain.algorithms.fdpg.algorithm import Fdpg

__all__ = ["Fdpg"]
