"""A byte-level BPE tokenizer trained with the `tokenizers` library, carrying DeepSeek-V4's special tokens
(SERVING §D.2) at fixed ids so the chat encoding works end to end: BOS = 0 and EOS = 1, as in V4's config."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = [
    "<｜begin▁of▁sentence｜>",  # BOS, id 0
    "<｜end▁of▁sentence｜>",  # EOS, id 1
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    "｜DSML｜",
    "<｜latest_reminder｜>",
    "<｜action｜>",  # quick-instruction task tokens of the V4 encoder (encoding_dsv4.py)
    "<｜query｜>",
    "<tool_result>",
    "</tool_result>",
    "<｜authority｜>",
    "<｜domain｜>",
    "<｜title｜>",
    "<｜read_url｜>",
]


def train_tokenizer(files: list[str | Path], vocab_size: int, out_path: str | Path | None = None) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(f) for f in files], trainer)
    for expected, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == expected, token
    if out_path is not None:
        tokenizer.save(str(out_path))
    return tokenizer
