"""The KL of a policy to its reference on answers it sampled, per answer: the sequence-level k1
estimate the gold measure reports beside the task accuracy (`kl_sft`; stages/dpo.py).

    kl = sequence_kl(policy_logps, ref_logps, response_mask)   # (B,) nats per answer

For answers sampled from the policy, the mean of `sequence_kl` over them is the Monte Carlo (k1)
estimate of KL(pi || pi_ref) over whole answers: unbiased, 0 when the two are the same model, negative
on a batch only by chance. The logprobs are those of the distribution the answers were drawn from
(the sampling temperature's), as kiln/rl/loop.py `logprobs` gives them.
"""

from __future__ import annotations

import torch


def sequence_kl(policy_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) logprobs of the answer tokens under the policy and the reference and (B, T) mask of the
    real tokens -> (B,) the sum over each answer's tokens of log pi(y_t) - log pi_ref(y_t), in fp32."""
    return ((policy_logps.float() - ref_logps.float()) * mask.to(torch.float32)).sum(-1)
