"""The toy world's tokenizer: characters, Qwen3's chat markers, and a few whole phrases.

Part of renio's embedded toy world (arXiv 2606.23104 is evaluated on Qwen3; this tokenizer
mimics the parts of Qwen3's tokenizer the pipeline relies on). Every printable ASCII
character, newline and tab is one token; ``decode`` concatenates tokens (a Fuse decoder), so
``decode(encode(text)) == text`` for ASCII text. The chat template renders messages the way
Qwen3's does, including the empty ``<think>`` block when ``enable_thinking=False``.

Deliberate difference from Qwen3: the fixed sentences of ``renio_core.data.prompts`` (the math
instruction and the OPSD reference-solution header and footer) are single tokens, so the
privileged prompt stays short enough to train on in seconds. Other text is spelled out.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from renio_core.data.prompts import (
    MATH_INSTRUCTION,
    PRIVILEGED_FOOTER,
    PRIVILEGED_HEADER,
)

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNK = "<|unk|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END, UNK)
# Ordinary (non-special) multi-character tokens; decode() keeps them.
PHRASE_TOKENS = ("<think>", "</think>", "user", "assistant", "system", "\\boxed{",
                 MATH_INSTRUCTION, PRIVILEGED_HEADER, PRIVILEGED_FOOTER)
CHARACTERS = ("\n", "\t") + tuple(chr(c) for c in range(32, 127))

# Qwen3's template, reduced to what a toy model needs: plain turns, a generation prompt,
# and the empty think block that Qwen3 emits when thinking is switched off.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def vocabulary() -> list[str]:
    """All tokens in id order: specials first, then phrases, then characters."""
    return list(SPECIAL_TOKENS) + list(PHRASE_TOKENS) + list(CHARACTERS)


def build_backend() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own piece; whitespace included.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PHRASE_TOKENS])
    return tok


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` ready for ``save_pretrained``."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_backend(),
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=None,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tokenizer(out_dir: Path) -> None:
    """Write the tokenizer files into ``out_dir`` (no paths or timestamps in them)."""
    build_tokenizer().save_pretrained(str(out_dir))
