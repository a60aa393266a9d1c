"""RL for language models: the PPO and group (GRPO, Dr. GRPO, RLOO) math as small pure functions
(ppo_math, group_math), sampling with per-prompt generators (rollout), and the iteration loop the RL
stages share (loop)."""
