"""Pure functions of tensors for policy-gradient RL: advantages, losses, β controllers."""
