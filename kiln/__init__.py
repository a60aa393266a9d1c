"""Kiln's reusable library: what the stages (stages/) are built from.

    kiln.model       the GPT / MoE decoder as a transformers model
    kiln.model_fields  the model's fields named once (YAML key -> HF config name) and their rules
    kiln.workers     a training stage's job (typed section, paths) and the worker group that runs it
    kiln.capacity    parameters, memory and communication per rank before anything runs
    kiln.hf_convert  export to Llama / Mixtral folders, import from them, generation
    kiln.training    DeepSpeed config and engines, LR schedule, data order, RNG state, devices
    kiln.trl_bridge  what the TRL trainer stages share: data, trainer args, the callback
    kiln.chat_eval   held-out task accuracy and reward-model pair scoring
    kiln.rl          RL math (ppo_math, group_math), rollouts (rollout), the RL stages' loop (loop)

Nothing here imports Ray; stage entry points live in stages/, the pipeline in pipeline/.
"""
