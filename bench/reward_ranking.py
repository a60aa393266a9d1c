"""How well a reward model ranks a policy's own answers: what PPO's rollouts ask of it.

    /work/venv/bin/python bench/reward_ranking.py --policy runs/tiny/sft-<fp> --reward runs/tiny/reward-<fp>
    ... --reward A --reward B       # several reward models, the same answers (~40 s each on 2 cores)

The policy answers `--prompts` prompts of the shipped task (the ppo prompts: no reward model trained on
them) `--samples` times each at `--temperature`, as PPO's rollouts do; the checking program labels every
answer; each reward model scores them all. Printed per reward model:

    accuracy          share of right answers (the policy's, the same for every row)
    AUC global        P(score of a right answer > score of a wrong one), over all prompts
    AUC in-prompt     the same over pairs of answers to the same prompt: what a policy update can use,
                      since a prompt's offset (easy prompts' answers all score high) cancels in it
    best-of-k         accuracy of the answer the reward model scores highest among a prompt's k, against
                      `accuracy` (no ranking) and `any right` (a perfect one)

A reward model with an in-prompt AUC near 0.5 gives PPO nothing to climb but its own errors.
The baseline, measured on the same answers in the same run: the policy's own mean log-probability per
answer token (temperature 1) as the score, a reward model that costs nothing; each reward model's in-prompt
AUC and best-of-k are printed as ratios to it.

Then, per word of the answer (word 1 should be the sentence's word 3, word 3 its word 1): how often
the policy gets that word right, and what each reward model pays for it among the wrong three-word
answers, holding the other two words fixed (least squares of the in-prompt-centred score on the
three right-word indicators). A word the reward model pays little or nothing for is one PPO can
trade away for the others: compare the rows of an SFT policy and a PPO policy.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


BASELINE = "policy likelihood (baseline)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", type=Path, required=True, help="a causal-LM folder (sft or ppo artifact)")
    ap.add_argument(
        "--reward", type=Path, action="append", required=True, help="a reward artifact (repeatable)"
    )
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for path in (args.policy, *args.reward):
        if not (path / "config.json").is_file():
            sys.exit(f"{path}: no config.json there; give a model folder such as runs/tiny/reward-<fp>")

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import kiln.model  # noqa: F401  registers the Kiln architecture with transformers
    from data_prep.chat_data import load_records
    from data_prep.task import N_WORDS, check, prompt_text
    from kiln.chat_eval import decode_responses, prompt_ids, score_conversations, stop_ids
    from kiln.rl.ppo_math import logprobs_from_logits
    from kiln.rl.rollout import sample
    from pipeline.config import PROJECT_ROOT, load_config

    torch.set_num_threads(args.threads)
    cfg = load_config()
    tok = AutoTokenizer.from_pretrained(args.policy)
    policy = AutoModelForCausalLM.from_pretrained(args.policy).eval()
    records = load_records([PROJECT_ROOT / p for p in cfg.ppo.prompts], "prompt")[0][: args.prompts]
    n, k = len(records), args.samples
    ids = [prompt_ids(tok, r["prompt"]) for r in records]
    stops, answers, likelihood = stop_ids(tok), [], []
    for b in range(0, n * k, 256):
        jobs = range(b, min(b + 256, n * k))
        roll = sample(policy, [ids[j // k] for j in jobs], seeds=list(jobs), max_new_tokens=cfg.ppo.max_new_tokens,
                      temperature=args.temperature, top_p=1.0, stop_ids=stops, pad_id=tok.pad_token_id)  # fmt: skip
        answers += decode_responses(tok, roll, stops)
        with torch.no_grad():  # the baseline's score: the policy's mean log-probability per answer token
            logits = policy(input_ids=roll.tokens, attention_mask=roll.mask).logits[
                :, roll.prompt_len - 1 : -1
            ]
            lp, m = logprobs_from_logits(logits, roll.response), roll.response_mask.float()
            likelihood += ((lp * m).sum(1) / m.sum(1).clamp(min=1)).tolist()
    prompts = [records[j // k]["prompt"] for j in range(n * k)]
    right = torch.tensor([check(prompt_text(p), a) for p, a in zip(prompts, answers, strict=True)]).view(n, k)
    convs = [p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, answers, strict=True)]

    print(f"policy {args.policy.name}: {n} prompts x {k} answers at temperature {args.temperature}")
    print(f"{'reward model':<28} {'accuracy':>8} {'AUC global':>10} {'AUC in-prompt':>13} {'best-of-k':>9} "
          f"{'any right':>9}   vs baseline: AUC in-prompt, best-of-k")  # fmt: skip
    base = ranking(torch.tensor(likelihood).view(n, k), right)
    print(f"{BASELINE:<28} {base['accuracy']:>8.3f} {base['auc_global']:>10.3f} {base['auc_in_prompt']:>13.3f} "
          f"{base['best_of_k']:>9.3f} {base['any_right']:>9.3f}   1.00x, 1.00x")  # fmt: skip
    scores = {}
    for path in args.reward:
        rm = AutoModelForSequenceClassification.from_pretrained(path).eval()
        label = (
            path.name
            if [q.name for q in args.reward].count(path.name) == 1
            else f"{path.parent.name}/{path.name}"
        )
        scores[label] = score = torch.tensor(score_conversations(rm, tok, convs)).view(n, k)
        row = ranking(score, right)
        print(f"{label:<28} {row['accuracy']:>8.3f} {row['auc_global']:>10.3f} {row['auc_in_prompt']:>13.3f} "
              f"{row['best_of_k']:>9.3f} {row['any_right']:>9.3f}   {row['auc_in_prompt'] / base['auc_in_prompt']:.2f}x, "
              f"{row['best_of_k'] / max(base['best_of_k'], 1e-9):.2f}x")  # fmt: skip

    words = torch.tensor([right_words(prompt_text(p), a) for p, a in zip(prompts, answers, strict=True)])
    three = torch.tensor([len(a.split()) == N_WORDS for a in answers])
    print("\nanswer word right:       " + "  ".join(f"word {i + 1}: {words[:, i].float().mean():.3f}" for i in range(N_WORDS)))  # fmt: skip
    print("paid for it (among wrong three-word answers to the same prompt):")
    for name, score in scores.items():
        paid = word_payments(score, ~right.view(-1) & three, words)
        print(f"  {name:<26}" + "  ".join(f"word {i + 1}: {v:+.2f}" for i, v in enumerate(paid)))


def ranking(score, right) -> dict:
    """Ranking figures of scores (n, k) against right/wrong labels (n, k); ties count a half."""

    from kiln.chat_eval import in_prompt_auc, pairwise_wins

    g, gp = pairwise_wins(score[right], score[~right])
    return {
        "accuracy": right.float().mean().item(),
        "auc_global": g / max(1, gp),
        "auc_in_prompt": in_prompt_auc(score.tolist(), right.tolist())[0] or 0.0,
        "best_of_k": right.gather(1, score.argmax(1, keepdim=True)).float().mean().item(),
        "any_right": right.any(1).float().mean().item(),
    }


def right_words(prompt: str, answer: str) -> list[bool]:
    """Which words of the answer are the right word in their place (padded with False)."""
    from data_prep.task import N_WORDS, reference_answer

    want, got = reference_answer(prompt).split(), answer.split()
    return [i < len(got) and got[i] == w for i, w in enumerate(want[:N_WORDS])]


def word_payments(score, rows, words) -> list[float]:
    """What the reward model adds for each right word: least squares of the score (n, k) on the
    right-word indicators (n*k, N_WORDS) over the answers `rows` (n*k,) selects, both centred within
    each prompt (over its selected answers), so a prompt's offset drops out (fixed effects)."""
    import torch

    n, k = score.shape
    sel = rows.view(n, k).float()
    x = words.view(n, k, -1).float()
    count = sel.sum(1, keepdim=True).clamp(min=1)
    y = score - (score * sel).sum(1, keepdim=True) / count
    x = x - (x * sel[..., None]).sum(1, keepdim=True) / count[..., None]
    keep = rows.view(n, k)
    return torch.linalg.lstsq(x[keep], y[keep].unsqueeze(1)).solution[:, 0].tolist()


if __name__ == "__main__":
    main()
