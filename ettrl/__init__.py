"""Test-time RL on top of the engine: grading, rewards, advantages, the GRPO loss and the trainer."""
