"""The training loop and everything process-aware: the step, checkpoints, preemption, tracking."""
