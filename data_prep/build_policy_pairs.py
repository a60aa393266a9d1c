"""Preference pairs from a policy's own mistakes: the tiny preset's comparisons, collected as RLHF collects them.

    python data_prep/build_policy_pairs.py --policy runs/tiny/sft-<fingerprint>           # write the files
    python data_prep/build_policy_pairs.py --policy runs/tiny/sft-<fingerprint> --check   # compare, write nothing

For every sentence of the preference split (data_prep/build_task_data.py) the policy answers the
task's prompt `--samples` times at `--temperature`; the checking program (data_prep/task.py) labels
each answer, the labeller a human would be. Each distinct wrong answer, most frequent first, up to
`--pairs` per prompt, becomes a pair {prompt, chosen: the right answer, rejected: the policy's
answer, kind: "policy"}. The held-out sentences give the validation pairs the same way.

Why: a reward model trained only on made-up wrong answers ranks those well but not the mistakes a
policy actually makes, and those are what PPO's rollouts contain. InstructGPT's comparisons are of
SFT samples for the same reason. Measured with bench/reward_ranking.py on the tiny SFT policy's own
answers (AUC of right over wrong answers to the same prompt): 0.55 for the tiny preset's reward
model (150 steps, synthetic pairs), 0.52 after 800 steps on every synthetic kind; with these pairs
added 0.65 after 700 steps, 0.73-0.90 after 1000 (three draws of the pairs), 0.85 after 1500; these
pairs alone, batch 32, 800 steps: 0.86 and 0.90 (two seeds); from the SFT model (`reward.init_from:
sft`), batch 16, 600 steps: 0.89. Few of those models pay for the answer's first word (the
sentence's third), and PPO on them trades it away (BENCHMARKS.md, "Reward models on the policy's
own answers"), so they are not in the tiny preset, whose reward stage trains for 150 steps beside
sft. To use them:

    python launch.py run --from reward --set reward.steps=1500 \
        --set 'reward.data=[data_prep/sample/task/pref_train.jsonl.zst,data_prep/sample/task/pref_policy_train.jsonl.zst]' \
        --set 'reward.eval_data=[data_prep/sample/task/pref_val.jsonl.zst,data_prep/sample/task/pref_policy_val.jsonl.zst]'

Writes into --out: pref_policy_train.jsonl.zst, pref_policy_val.jsonl.zst, policy_answers_val.jsonl.zst
(every held-out prompt's sampled answers with their labels: the reward stage's `answer_eval`), policy_pairs.json (the
policy's fingerprint and weights' sha256, the sampling settings and the counts: answers = right + wrong; a prompt with
no wrong answer gives no pair; an empty answer is wrong but gives none). Deterministic: each answer has its own generator seeded by the
sentence and the sample's index, so the same policy gives the same files byte for byte on CPU.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script from anywhere

from data_prep.build_task_data import (  # noqa: E402
    CORPUS,
    OUT,
    assistant,
    compress,
    select_sentences,
    split_sentences,
    user,
    write_or_check,
)
from data_prep.task import check, make_prompt, reference_answer  # noqa: E402

FILES = {"pref": "pref_policy_train.jsonl.zst", "heldout": "pref_policy_val.jsonl.zst"}
ANSWERS = "policy_answers_val.jsonl.zst"
"""The held-out prompts' sampled answers themselves, labelled: what the reward stage ranks (`answer_auc`)."""
KIND = "policy"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", type=Path, required=True, help="a causal-LM folder (an sft artifact)")
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--samples", type=int, default=8, help="answers sampled per prompt")
    ap.add_argument("--pairs", type=int, default=2, help="most pairs per prompt")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--check", action="store_true", help="compare with the files in --out; write nothing")
    args = ap.parse_args()
    if not (args.policy / "config.json").is_file():
        sys.exit(
            f"--policy {args.policy}: no config.json there; give a model folder such as runs/tiny/sft-<fp>"
        )
    write_or_check(build(args), args.out, args.check, "python data_prep/build_policy_pairs.py --policy ...")


def build(args) -> dict[str, bytes]:
    """File name -> contents."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kiln.model  # noqa: F401  registers the Kiln architecture with transformers

    torch.manual_seed(0)  # nothing random is drawn from it; sampling has per-answer generators
    tok = AutoTokenizer.from_pretrained(args.policy)
    model = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32).eval()
    by_split = split_sentences(select_sentences(args.corpus))
    files, counts = {}, {}
    for split, name in FILES.items():
        answers = sample_answers(
            model, tok, by_split[split], args.samples, args.temperature, args.max_new_tokens
        )
        records, counts[name] = pairs(by_split[split], answers, args.pairs)
        files[name] = compress(records)
        if split == "heldout":
            files[ANSWERS] = compress(labelled(by_split[split], answers))
    manifest = _manifest(args.policy)
    stats = {
        "policy": args.policy.name,
        "policy_fingerprint": manifest.get("fingerprint"),
        "policy_weights_sha256": weights_sha256(args.policy),
        "samples_per_prompt": args.samples,
        "pairs_per_prompt": args.pairs,
        "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens,
        "files": counts,
    }
    files["policy_pairs.json"] = (json.dumps(stats, indent=2) + "\n").encode()
    return files


def sample_answers(
    model, tok, sentences: list[str], k: int, temperature: float, max_new: int
) -> list[list[str]]:
    """`k` answers per sentence's prompt, whitespace-normalised; each from its own seeded generator."""
    from kiln.chat_eval import decode_responses, prompt_ids, stop_ids
    from kiln.rl.rollout import sample

    stops, out = stop_ids(tok), []
    for b in range(0, len(sentences), 32):
        batch = sentences[b : b + 32]
        ids = [prompt_ids(tok, user(make_prompt(s))) for s in batch]
        roll = sample(
            model,
            [x for x in ids for _ in range(k)],
            seeds=[_seed(s, j) for s in batch for j in range(k)],
            max_new_tokens=max_new,
            temperature=temperature,
            top_p=1.0,
            stop_ids=stops,
            pad_id=tok.pad_token_id,
        )
        texts = [" ".join(a.split()) for a in decode_responses(tok, roll, stops)]
        out += [texts[i : i + k] for i in range(0, len(texts), k)]
    return out


def pairs(sentences: list[str], answers: list[list[str]], per_prompt: int) -> tuple[list[dict], dict]:
    """Preference records from the labelled answers, and the counts (answers = right + wrong)."""
    records, c = [], collections.Counter()
    for s, got in zip(sentences, answers, strict=True):
        prompt = make_prompt(s)
        wrong = collections.Counter(a for a in got if not check(prompt, a))
        c["answers"] += len(got)
        c["wrong"] += sum(wrong.values())
        c["right"] += len(got) - sum(wrong.values())
        c["empty"] += wrong.pop("", 0)  # wrong, but no answer to write down
        chosen = sorted(wrong.items(), key=lambda kv: (-kv[1], kv[0]))[:per_prompt]
        c["prompts"] += 1
        c["prompts_all_right"] += not chosen
        for answer, _ in chosen:
            records.append(
                {
                    "prompt": user(prompt),
                    "chosen": assistant(reference_answer(prompt)),
                    "rejected": assistant(answer),
                    "kind": KIND,
                }  # fmt: skip
            )
    c["pairs"] = len(records)
    return records, dict(c)


def labelled(sentences: list[str], answers: list[list[str]]) -> list[dict]:
    """Each prompt with its sampled answers in sample order (repeats kept: a frequent answer weighs
    more) and the checking program's label of each."""
    return [
        {"prompt": user(make_prompt(s)), "answers": got, "right": [check(make_prompt(s), a) for a in got]}
        for s, got in zip(sentences, answers, strict=True)
    ]


def _seed(sentence: str, j: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{sentence}|{j}".encode(), digest_size=7).digest(), "little")


def weights_sha256(folder: Path) -> str:
    """What identifies the policy: the same weights sample the same answers (per-answer generators)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


if __name__ == "__main__":
    main()
