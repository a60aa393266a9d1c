"""Byte-level BPE training, Kiln's special tokens and chat template, and adopting an existing tokenizer.

    tok = train_bpe(texts, vocab_size=4096, min_frequency=2)      # a PreTrainedTokenizerFast
    tok, report = adopt_tokenizer("path/to/hf_tokenizer")         # adds what is missing, or refuses
    tok.save_pretrained(out)                                       # AutoTokenizer.from_pretrained(out) loads it

Byte-level (GPT-2 pre-tokenizer regex, 256-byte initial alphabet, no normaliser), so every string
round-trips: decode(encode(x)) == x, emoji and CJK included, and nothing is ever unknown.
The chat template wraps each assistant turn, its closing `<|end|>` included, in
`{% generation %}...{% endgeneration %}`, so `apply_chat_template(..., return_assistant_tokens_mask=True)`
(TRL's `assistant_only_loss`) trains on assistant tokens only and the model learns to stop.
"""

from __future__ import annotations

from collections.abc import Iterable

EOS, PAD = "<|endoftext|>", "<|pad|>"
ROLES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END = "<|end|>"
SPECIALS = [EOS, PAD, *ROLES.values(), END]  # ids 0..5 in a trained tokenizer

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] }}{{ '<|end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int, length: int | None = None):
    """A byte-level BPE trained on texts, wrapped as a PreTrainedTokenizerFast with Kiln's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return wrap(tok)


def wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[*ROLES.values(), END],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )


class TokenizerRefused(ValueError):
    pass


def adopt_tokenizer(path: str, chat_template: str = "auto"):
    """Load an existing HF tokenizer folder and give it what Kiln needs; (tokenizer, report).

    Added when missing: an EOS (`<|endoftext|>`), a PAD (`<|pad|>`), BOS (= EOS), the role and
    end-of-turn tokens, and Kiln's chat template when the folder has none (or chat_template="kiln").
    Refused: a folder without a fast tokenizer (tokenizer.json), and a chat template that does not
    mark assistant turns with {% generation %} (assistant-only loss could not find them)."""
    import re
    from pathlib import Path

    from transformers import AutoTokenizer

    if not (Path(path) / "tokenizer.json").is_file():
        raise TokenizerRefused(
            f"tokenizer.path: {path} has no tokenizer.json; Kiln needs a fast (Rust) tokenizer: load it with "
            "transformers and save_pretrained() it, which writes tokenizer.json for most tokenizers"
        )
    tok = AutoTokenizer.from_pretrained(path)
    added: list[str] = []
    if tok.eos_token is None:
        tok.add_special_tokens({"eos_token": EOS})
        added.append(EOS)
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": PAD})
        added.append(PAD)
    if tok.bos_token is None:
        tok.bos_token = tok.eos_token
    vocab = tok.get_vocab()
    missing = [t for t in [*ROLES.values(), END] if t not in vocab]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        added.extend(missing)
    has_markers = bool(tok.chat_template) and re.search(r"\{%-?\s*generation\s*-?%\}", str(tok.chat_template))
    if chat_template == "kiln" or not tok.chat_template:
        template = "kiln (added)" if not tok.chat_template else "kiln (replaced the folder's)"
        tok.chat_template = CHAT_TEMPLATE
    elif has_markers:
        template = "existing"
    else:
        raise TokenizerRefused(
            f"tokenizer.path: the chat template of {path} does not mark assistant turns with "
            "{% generation %}...{% endgeneration %}, so assistant-only loss (SFT) cannot find them. Add the "
            "markers to its chat_template, or set tokenizer.chat_template=kiln to use Kiln's template instead"
        )
    tok.clean_up_tokenization_spaces = False
    report = {
        "source": str(path),
        "added_tokens": added,
        "chat_template": template,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "bos_token": tok.bos_token,
    }
    return tok, report


def special_ids(tok) -> dict[str, int]:
    ids = {"eos": tok.eos_token_id, "pad": tok.pad_token_id, "bos": tok.bos_token_id}
    ids.update({t: tok.convert_tokens_to_ids(t) for t in [*ROLES.values(), END]})
    return ids
