"""Text <-> token ids: a model directory's `tokenizer.json` (the `tokenizers` library), or bytes for models
that ship none (models/dsv4-random-tiny)."""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

# DeepSeek-V4's BOS and EOS (ids 0 and 1 in its config and in the project's tokenizers; SERVING §D.2).
BOS_TEXT = "<｜begin▁of▁sentence｜>"
EOS_TEXT = "<｜end▁of▁sentence｜>"


class ByteTokenizer:
    """UTF-8 bytes as ids 3..258; 0 = BOS, 1 = EOS (the V4 ids, written as V4's BOS/EOS strings), 2 unused."""

    offset = 3
    _SPECIAL = {0: BOS_TEXT, 1: EOS_TEXT}
    _SPLIT = re.compile("(" + "|".join(map(re.escape, _SPECIAL.values())) + ")")

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._ids = {text: i for i, text in self._SPECIAL.items()}

    def encode(self, text: str) -> list[int]:
        if self.vocab_size < 256 + self.offset:
            raise ValueError(f"this model has no tokenizer.json and its vocabulary ({self.vocab_size}) is too small "
                             f"for byte tokens; pass token ids instead of text")
        if BOS_TEXT[0] not in text:  # the common case: no special token can be in it
            return [b + self.offset for b in text.encode("utf-8")]
        ids: list[int] = []
        for piece in self._SPLIT.split(text):
            ids += [self._ids[piece]] if piece in self._ids else [b + self.offset for b in piece.encode("utf-8")]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        pieces, run = [], bytearray()
        for i in ids:
            if self.offset <= i < 256 + self.offset:
                run.append(i - self.offset)
            elif not skip_special_tokens and i in self._SPECIAL:
                pieces += [run.decode("utf-8", errors="replace"), self._SPECIAL[i]]
                run = bytearray()
        return "".join(pieces) + run.decode("utf-8", errors="replace")

    def special_tokens(self) -> dict[int, str]:
        return dict(self._SPECIAL)

    @property
    def max_bytes_per_token(self) -> int:
        return max(len(t.encode("utf-8")) for t in self._SPECIAL.values())


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

    @functools.cached_property
    def max_bytes_per_token(self) -> int:
        """An upper bound on the UTF-8 bytes of text one token stands for (a byte-level piece's characters take
        one or two bytes each in UTF-8, so this may overestimate, never under)."""
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        return max(len(piece.encode("utf-8")) for piece in vocab)


def load_tokenizer(directory: str | os.PathLike | None, vocab_size: int):
    path = Path(directory) / "tokenizer.json" if directory is not None else None
    if path is not None and path.is_file():
        return JsonTokenizer(path)
    return ByteTokenizer(vocab_size)


def tokenizer_config(directory: str | os.PathLike | None) -> dict:
    """The model directory's `tokenizer_config.json` (Hugging Face's), or {} where it has none."""
    path = Path(directory) / "tokenizer_config.json" if directory is not None else None
    if path is not None and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {}


def hf_tokenizer_config(tokenizer, bos_token_id: int, eos_token_id: int, model_max_length: int) -> dict:
    """The `tokenizer_config.json` that makes Hugging Face tokenizers encode as the server does: BOS first
    (add_bos_token, SERVING §E), no EOS, V4's BOS/EOS strings. The server's GET /tokenizer_info
    answers the same (vLLM's shape: the tokenizer config plus `tokenizer_class`)."""
    special = tokenizer.special_tokens()
    eos = special.get(eos_token_id, EOS_TEXT)
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special.get(bos_token_id, BOS_TEXT),
            "eos_token": eos, "pad_token": eos, "unk_token": None, "add_bos_token": True, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": model_max_length}


def write_hf_tokenizer(source: str | os.PathLike, directory: str | os.PathLike, bos_token_id: int = 0,
                       eos_token_id: int = 1, model_max_length: int = 65536) -> None:
    """Write `tokenizer.json` (from `source`, with a post-processor that puts BOS first when special tokens are
    asked for, as DeepSeek's own tokenizer does) and `tokenizer_config.json` into a model directory, so that
    `transformers.AutoTokenizer` and `tokenizers` loaded from it count tokens as the server does."""
    from tokenizers import Tokenizer, processors

    raw = Tokenizer.from_file(os.fspath(source))
    bos = raw.id_to_token(bos_token_id)
    raw.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, bos_token_id)])
    directory = Path(directory)
    raw.save(os.fspath(directory / "tokenizer.json"))
    config = hf_tokenizer_config(JsonTokenizer(directory / "tokenizer.json"), bos_token_id, eos_token_id,
                                 model_max_length)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                     encoding="utf-8")
