"""Decontamination: pretraining documents that share a long word n-gram with a held-out set are dropped.

    heldout = HeldOut.read(["data_prep/sample/task/prompts_val.jsonl.zst"], n=13)   # the driver
    heldout.contains(word_hashes(text))                                            # each file's task

The held-out sets (the tiny preset's validation sets and task prompts, or a user's) are derived from
the same kind of text pretraining reads, so a document quoting one of them would let pretraining see
what the held-out measures are meant not to. As GPT-3 did (Brown et al. 2020, "Language Models are
Few-Shot Learners", appendix C), a document is contaminated when it shares an n-gram of n = 13 words
(`ingest.decontaminate_ngram`) with a held-out text, or holds a held-out text of fewer words whole;
texts shorter than MIN_WORDS words are not checked. Words are compared as data_prep/ngrams.py hashes
them: lowercased, split at whitespace. A document's MIN_WORDS-word windows are looked up among the
texts' (a sorted array), and only where one matches is the document compared with the text itself.

What a held-out record says is every string in it (prompt, completion, chosen, rejected, messages'
contents, text: any JSON layout). A prompt of the shipped task ("Reverse the first 3 words: <a
sentence of the corpus>", data_prep/task.py) is checked by the sentence it quotes: the instruction
all its prompts share is not what could leak, and with it the 5-14 word sentences would never match.
The shipped held-out sentences are quotations of 368 of the sample's documents (3.6 MB, 14% of its
text: long Python documentation pages and man pages for the most part), which the tiny preset drops.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from data_prep.ngrams import ngram_hashes, word_hashes
from data_prep.readers import read_hf, read_lines
from data_prep.task import sentence_of

MIN_WORDS = 5
"""Held-out texts shorter than this are not checked (the task's three-word answers, a role name, "Tell
me a story."): too common to tell anything. The shipped held-out sentences of 5 to 7 words each occur
in one or two of the sample's documents, their source and its copy: as telling as the longer ones."""
MAX_LINE_BYTES = 1 << 24


@dataclass
class HeldOut:
    n: int
    words: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    """The word hashes of every held-out text of MIN_WORDS words or more, one after another."""
    starts: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    """Where each text begins in `words`, and where the last ends: text t is words[starts[t]:starts[t + 1]]."""
    anchors: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    """Sorted hashes of every MIN_WORDS-word window of the texts: a document is compared with a text
    only where it holds one of them (rarely), so the check costs one window hash per word."""
    where: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    """(text, offset) of each anchor, in the anchors' order."""
    _seen: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    """Built where it is first used (a task), not sent to it: 1 MB of flags, set for the anchors' top bits."""

    @classmethod
    def read(cls, paths: list[str], n: int) -> HeldOut:
        """The held-out texts in these files (.jsonl[.zst|.gz] or `hf:NAME[:SPLIT]`), as word hashes."""
        texts, seen = [], set()
        for path in paths:
            lines = read_hf(path) if path.startswith("hf:") else read_lines(path, MAX_LINE_BYTES)
            for _, raw in lines:
                if raw is None or (isinstance(raw, bytes) and not raw.strip()):
                    continue
                try:
                    record = json.loads(raw) if isinstance(raw, bytes) else raw
                except ValueError:
                    continue  # a record the stage that reads the set counts as malformed
                for text in strings(record):
                    w = word_hashes(sentence_of(text) or text)
                    if len(w) >= MIN_WORDS and (key := w.tobytes()) not in seen:  # each text once
                        seen.add(key)
                        texts.append(w)
        if not texts:
            return cls(n=n)
        grams = [ngram_hashes(w, MIN_WORDS) for w in texts]
        anchors = np.concatenate(grams)
        where = np.concatenate(
            [np.stack([np.full(len(g), t), np.arange(len(g))], 1) for t, g in enumerate(grams)]
        )
        order = np.argsort(anchors, kind="stable")
        starts = np.concatenate([[0], np.cumsum([len(w) for w in texts])])
        return cls(
            n=n, words=np.concatenate(texts), starts=starts, anchors=anchors[order], where=where[order]
        )

    @property
    def texts(self) -> int:
        return len(self.starts) - 1

    def text(self, t: int) -> np.ndarray:
        return self.words[self.starts[t] : self.starts[t + 1]]

    def contains(self, words: np.ndarray, windows: np.ndarray | None = None) -> bool:
        """Does a document (its word hashes; `windows`, when the caller has them, the hashes of its
        MIN_WORDS-word windows) share an n-gram with a held-out text, or hold a shorter one whole?"""
        if not len(self.anchors):
            return False
        if windows is None:
            windows = ngram_hashes(words, MIN_WORDS)
        if self._seen is None:  # the anchors' top 20 bits: most windows are ruled out by a lookup
            self._seen = np.zeros(1 << 20, dtype=bool)
            self._seen[self.anchors >> np.uint64(44)] = True
        maybe = np.flatnonzero(self._seen[windows >> np.uint64(44)])
        at = np.searchsorted(self.anchors, windows[maybe])
        for i, k in zip(maybe.tolist(), at.tolist(), strict=True):  # position i holds text t's offset j
            while k < len(self.anchors) and self.anchors[k] == windows[i]:
                t, j = self.where[k]
                if self._shares(words, i, self.text(t), int(j)):
                    return True
                k += 1
        return False

    def _shares(self, words: np.ndarray, i: int, text: np.ndarray, j: int) -> bool:
        """Is there, around document position i = text offset j, a window of m = min(n, len(text))
        words that the document and the text share?"""
        m = min(self.n, len(text))
        for start in range(max(0, j - (m - MIN_WORDS)), min(j, len(text) - m) + 1):
            d = i - (j - start)
            if d >= 0 and d + m <= len(words) and np.array_equal(words[d : d + m], text[start : start + m]):
                return True
        return False

    def digest(self) -> str:
        """A short hash of the texts (a unit's identity: the same held-out sets, the same drops)."""
        import hashlib

        h = hashlib.blake2b(self.n.to_bytes(4, "little"), digest_size=16)
        h.update(self.starts.astype("<i8").tobytes() + self.words.astype("<u8").tobytes())
        return h.hexdigest()


def strings(value) -> list[str]:
    """Every string in a JSON value, depth first."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, list):
        return []
    return [s for v in value for s in strings(v)]
