"""The tiny preset's checkable task: reverse the first three words of a sentence from the corpus.

    from data_prep.task import make_prompt, reference_answer, check
    prompt = make_prompt("The kiln fires the clay slowly.")  # 'Reverse the first 3 words: The kiln fires ...'
    reference_answer(prompt)                                  # 'fires kiln The'
    check(prompt, "fires kiln The")                           # True

`check` is the independent measure of the post-training stages: SFT's held-out task accuracy and,
in PPO, a score that nothing in training optimises directly. It is a pure function of two strings.
Words are whitespace-separated; sentences are chosen (data_prep/build_task_data.py) so that their
first words are plain letters, which keeps the answer unambiguous. An answer is right when its
words, whitespace normalised, are the first N_WORDS words of the sentence in reverse order; case
and punctuation count.

`wrong_answer` makes the rejected side of the preference set: well-formed answers that are wrong
(three words, the form of a right answer) and damaged ones, so that a reward model has to judge
correctness, not form.
"""

from __future__ import annotations

import random

N_WORDS = 3
PREFIX = f"Reverse the first {N_WORDS} words: "

KINDS = {
    # well-formed but wrong: N_WORDS words, as a right answer looks
    "unreversed": "well_formed",  # the right words in the sentence's order
    "swapped": "well_formed",  # the right words, another wrong order (w2 w3 w1)
    "wrong_word": "well_formed",  # one word replaced by a later word of the sentence
    "other_sentence": "well_formed",  # the right answer to a different sentence
    # damaged
    "truncated": "damaged",  # the right answer missing its last word
    "garbled": "damaged",  # two letters of the right answer transposed
    "extra": "damaged",  # the right answer followed by more of the sentence
}
"""Kinds of rejected answer -> their class (per-kind and per-class accuracy of the reward model)."""


def make_prompt(sentence: str) -> str:
    """The user turn for one sentence (its words joined by single spaces)."""
    return PREFIX + " ".join(sentence.split())


def sentence_of(prompt: str) -> str | None:
    """The sentence a prompt asks about, or None when the prompt is not one of this task's."""
    prompt = prompt.strip()
    if not prompt.startswith(PREFIX.strip()):
        return None
    sentence = prompt[len(PREFIX.strip()) :].strip()
    return sentence if len(sentence.split()) >= N_WORDS else None


def reference_answer(prompt: str) -> str | None:
    """The one right answer: the first N_WORDS words, last first. None for a foreign prompt."""
    sentence = sentence_of(prompt)
    if sentence is None:
        return None
    return " ".join(reversed(sentence.split()[:N_WORDS]))


def check(prompt: str, answer: str) -> bool:
    """Is `answer` right for `prompt`? False for prompts that are not this task's."""
    want = reference_answer(prompt)
    return want is not None and " ".join(answer.split()) == want


def prompt_text(prompt) -> str:
    """The user text of a prompt given as a string or as conversational messages (the last user turn)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def wrong_answer(sentence: str, kind: str, rng: random.Random, other: str) -> str:
    """A wrong answer of `kind` (a key of KINDS) for `sentence`; `other` is a different sentence.
    Never equal to the right answer: a kind that would coincide with it (the other sentence starts
    with the same words, or the sentence with a repeated word) falls back to another wrong form."""
    words = sentence.split()
    right = words[:N_WORDS][::-1]
    if kind == "unreversed":
        answer = words[:N_WORDS]
    elif kind == "swapped":
        answer = right[1:] + right[:1]
    elif kind == "wrong_word":
        later = [w for w in words[N_WORDS:] if w.isalpha() and w not in right]
        later = later or [w for w in other.split()[:N_WORDS] if w not in right] or ["the"]
        answer = list(right)
        answer[rng.randrange(N_WORDS)] = rng.choice(later)
    elif kind == "other_sentence":
        answer = other.split()[:N_WORDS][::-1]
    elif kind == "truncated":
        answer = right[:-1]
    elif kind == "garbled":
        text = " ".join(right)
        spots = [i for i in range(len(text) - 1) if text[i] != " " != text[i + 1] and text[i] != text[i + 1]]
        if not spots:
            return " ".join(right) + right[-1][-1]
        i = rng.choice(spots)
        return text[:i] + text[i + 1] + text[i] + text[i + 2 :]
    elif kind == "extra":
        answer = right + (words[N_WORDS : N_WORDS + 2] or ["and", "more"])
    else:
        raise ValueError(f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
    fallbacks = (other.split()[:N_WORDS][::-1], right[1:] + right[:1], right[::-1], right[:-1])
    return " ".join(next((a for a in (answer, *fallbacks) if a != right), right[:-1]))
