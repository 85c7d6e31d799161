"""Text <-> token ids: a model directory's `tokenizer.json` (the `tokenizers` library), or bytes for models
that ship none (models/dsv4-random-tiny)."""

from __future__ import annotations

import os
from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes as ids 3..258; 0 = BOS, 1 = EOS (the V4 ids), 2 unused."""

    offset = 3

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        if self.vocab_size < 256 + self.offset:
            raise ValueError(f"this model has no tokenizer.json and its vocabulary ({self.vocab_size}) is too small "
                             f"for byte tokens; pass token ids instead of text")
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < 256 + self.offset)
        return data.decode("utf-8", errors="replace")

    def special_tokens(self) -> dict[int, str]:
        return {}


class JsonTokenizer:
    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(os.fspath(path))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def special_tokens(self) -> dict[int, str]:
        """id -> text of every token the tokenizer marks special."""
        return {i: t.content for i, t in self._tokenizer.get_added_tokens_decoder().items() if t.special}


def load_tokenizer(directory: str | os.PathLike | None, vocab_size: int):
    path = Path(directory) / "tokenizer.json" if directory is not None else None
    if path is not None and path.is_file():
        return JsonTokenizer(path)
    return ByteTokenizer(vocab_size)
