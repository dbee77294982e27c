"""Rewards: the configured reward function and the pieces it is made of.

- :mod:`~kltrain.rewards.function`: :class:`RewardFunction`, one call per step (terms, weights,
  invalid samples);
- :mod:`~kltrain.rewards.terms`: one term per configured scorer, output checks, transforms;
- :mod:`~kltrain.rewards.builtin`: the built-in scorers (TRL's signature);
- :mod:`~kltrain.rewards.transforms`: ``logit``, ``whiten``, ``clip``, ``scale``;
- :mod:`~kltrain.rewards.reward_model`: sequence-classification reward models;
- :mod:`~kltrain.rewards.llama2`: the Llama 2 safety gate;
- :mod:`~kltrain.rewards.text`, :mod:`~kltrain.rewards.errors`: shared helpers.
"""

from kltrain.rewards.builtin import (
    builtin_rewards,
    keyword_reward,
    length_reward,
    sentiment_net,
    sentiment_reward,
    toy_helpfulness_reward,
    toy_safety_reward,
)
from kltrain.rewards.errors import InvalidRewardError, RewardError
from kltrain.rewards.function import RewardFunction, RewardResult
from kltrain.rewards.llama2 import llama2_gate
from kltrain.rewards.reward_model import RewardModel
from kltrain.rewards.text import completion_text, load_lexicon
from kltrain.rewards.transforms import Transform, parse_transform

__all__ = [
    "InvalidRewardError",
    "RewardError",
    "RewardFunction",
    "RewardModel",
    "RewardResult",
    "Transform",
    "builtin_rewards",
    "completion_text",
    "keyword_reward",
    "length_reward",
    "llama2_gate",
    "load_lexicon",
    "parse_transform",
    "sentiment_net",
    "sentiment_reward",
    "toy_helpfulness_reward",
    "toy_safety_reward",
]
