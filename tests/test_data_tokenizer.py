"""The tokenizer stage: trained BPE, chat template masks, adopting an existing tokenizer.

    pytest tests/test_data_tokenizer.py

Runs ingest once on the first 3,000 records of the bundled sample (module fixture), then the
tokenizer stage on it with a small vocabulary.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import zstandard

import stages.ingest as ingest
import stages.tokenizer as tokenizer
from data_prep.bpe import TokenizerRefused
from pipeline.artifacts import Artifact
from pipeline.config import PipelineConfig
from tests.test_data_ingest import SAMPLE, PickleContext, write

HELD_OUT = [
    "Crème brûlée, naïve façade, Ångström, São Paulo, Zürich, jalapeño.",
    "Emoji: 🎉🚀 👩‍👩‍👧‍👦 (a ZWJ family) and flags 🇫🇷🇯🇵; keycap 1️⃣.",
    "日本語のテキストと中文文本，한국어 텍스트도 있습니다。",
    "e\u0301 (NFD) vs \u00e9 (NFC), Ω vs Ω, ﬁ ligature, full-width ＡＢＣ.",
    "  leading spaces, trailing tab\t\r\nWindows line end\n\n\nand   runs   of   spaces  ",
    "Arabic مرحبا بالعالم and Hebrew שלום עולם, Greek αβγ, Cyrillic Привет.",
    "Literal specials in text: <|endoftext|> <|user|> <|pad|> stay text when encoded without specials.",
    "\x00 control \x1b[31m chars \u200b zero width \ufeff BOM \U0001f600",
]
MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Reverse the first words of: the cat sat."},
    {"role": "assistant", "content": "cat the sat."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]


def cfg_with(**tok):
    cfg = PipelineConfig()
    return dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, **tok))


@pytest.fixture(scope="module")
def docs_artifact(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ingest")
    reader = zstandard.ZstdDecompressor().stream_reader(SAMPLE.open("rb"))
    lines = [line.rstrip(b"\n") for _, line in zip(range(3000), io.BufferedReader(reader), strict=False)]
    src = write(tmp / "slice.jsonl.zst", lines)
    cfg = PipelineConfig()
    cfg = dataclasses.replace(cfg, ingest=dataclasses.replace(cfg.ingest, sources=(str(src),)))
    out = tmp / "out"
    out.mkdir()
    ingest.run(cfg, {}, out, PickleContext("ingest", tmp / "work"))
    return Artifact("ingest", "test", out, {})


def run_tokenizer(tmp_path, docs_artifact, **tok):
    out = tmp_path / "tok"
    out.mkdir(parents=True)
    metrics = tokenizer.run(
        cfg_with(**tok), {"ingest": docs_artifact}, out, PickleContext("tokenizer", tmp_path / "w")
    )
    return metrics, out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, docs_artifact):
    tmp = tmp_path_factory.mktemp("tok")
    return run_tokenizer(tmp, docs_artifact, vocab_size=1024, sample_bytes=1_000_000)


def test_trained_tokenizer_loads_and_round_trips(trained):
    from transformers import AutoTokenizer

    metrics, out = trained
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 1024 == metrics["vocab_size"]
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 1)
    for text in HELD_OUT:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert tok.unk_token_id not in ids or tok.unk_token_id is None
    stats = json.loads((out / "tokenizer_stats.json").read_text())
    assert stats["heldout_roundtrip_failures"] == 0 and stats["heldout_docs"] > 10
    assert 900_000 <= stats["train_bytes"] <= 1_100_000
    assert 2.0 < metrics["chars_per_token"] < 6.0  # English prose with a 1k vocabulary


def test_training_is_deterministic(tmp_path, trained, docs_artifact):
    _, out = run_tokenizer(tmp_path, docs_artifact, vocab_size=1024, sample_bytes=1_000_000)
    assert (out / "tokenizer.json").read_bytes() == (trained[1] / "tokenizer.json").read_bytes()


def test_chat_template_masks_assistant_turns_for_trl(trained):
    from transformers import AutoTokenizer
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    tok = AutoTokenizer.from_pretrained(trained[1])
    out = tok.apply_chat_template(
        MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    spans, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    end = tok.convert_tokens_to_ids("<|end|>")
    assert [tok.decode(s[:-1]) for s in spans] == ["cat the sat.", "You're welcome."]
    assert all(s[-1] == end for s in spans)  # the end-of-turn token is trained: the model learns to stop
    assert has_generation_markers(tok.chat_template) and is_chat_template_stop_token_trained(tok)
    prompt = tok.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>\nReverse the first words of: the cat sat.<|end|>\n<|assistant|>\n")


def _existing(folder: Path, template: str | None = None, fast: bool = True) -> Path:
    """A small GPT-2-like tokenizer folder: </s> as EOS, no pad, no role tokens, optional template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(HELD_OUT * 5, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    if template:
        wrapped.chat_template = template
    wrapped.save_pretrained(folder)
    if not fast:
        (folder / "tokenizer.json").unlink()
    return folder


def test_existing_tokenizer_gets_missing_specials_and_template(tmp_path, docs_artifact):
    from transformers import AutoTokenizer

    folder = _existing(tmp_path / "existing")
    metrics, out = run_tokenizer(tmp_path, docs_artifact, path=str(folder))
    stats = json.loads((out / "tokenizer_stats.json").read_text())
    assert stats["added_tokens"] == ["<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    assert stats["chat_template"] == "kiln (added)" and metrics["added_tokens"] == 5
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("</s>", "<|pad|>", "</s>")
    assert len(tok) == 400 + 5
    out_ids = tok.apply_chat_template(
        MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert sum(out_ids["assistant_masks"]) > 0
    assert tok.convert_ids_to_tokens(tok.encode("<|user|>", add_special_tokens=False)) == ["<|user|>"]


def test_existing_tokenizer_refusals(tmp_path, docs_artifact):
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    folder = _existing(tmp_path / "no_markers", template=plain)
    with pytest.raises(
        TokenizerRefused, match=r"does not mark assistant turns.*tokenizer\.chat_template=kiln"
    ):
        run_tokenizer(tmp_path, docs_artifact, path=str(folder))
    _, out = run_tokenizer(tmp_path / "k", docs_artifact, path=str(folder), chat_template="kiln")
    assert (
        json.loads((out / "tokenizer_stats.json").read_text())["chat_template"]
        == "kiln (replaced the folder's)"
    )

    slow = _existing(tmp_path / "slow", fast=False)
    with pytest.raises(TokenizerRefused, match=r"has no tokenizer\.json"):
        run_tokenizer(tmp_path / "x", docs_artifact, path=str(slow))
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.path: 'no/such/folder' is not a folder"):
        run_tokenizer(tmp_path / "y", docs_artifact, path="no/such/folder")
