"""kltrain: fine-tune a causal LM policy against a frozen reference to maximise
reward − β·D(policy‖reference), for reverse KL, forward KL or any f-divergence D."""

__version__ = "0.1.0"
