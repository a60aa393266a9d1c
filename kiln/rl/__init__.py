"""RL for language models: the PPO math as small pure functions (ppo_math) and sampling with
per-prompt generators (rollout)."""
