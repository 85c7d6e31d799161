"""The offline corpus is deterministic and split by file, and the BPE tokenizer keeps V4's special-token ids."""

import json

from dsv4jax.tokenizer import JsonTokenizer
from dsv4jax.train.bpe import SPECIAL_TOKENS, train_tokenizer
from dsv4jax.train.corpus import build_corpus, is_heldout


def _fake_stdlib(root):
    for i in range(60):
        package = root / ("pkg" if i % 3 else "test") / f"mod{i}.py"  # the test/ package is excluded
        package.parent.mkdir(parents=True, exist_ok=True)
        package.write_text(f"def function_{i}(value):\n    return value * {i}  # module {i}\n")


def test_corpus_is_deterministic_and_split_by_file(tmp_path):
    _fake_stdlib(tmp_path / "lib")
    first = build_corpus(tmp_path / "a", heldout_fraction=0.2, root=tmp_path / "lib")
    second = build_corpus(tmp_path / "b", heldout_fraction=0.2, root=tmp_path / "lib")
    assert first["sha256"] == second["sha256"]
    assert first["train"]["files"] + first["heldout"]["files"] == 40
    heldout = (tmp_path / "a" / "heldout.txt").read_text()
    for i in range(60):
        if i % 3:
            assert (f"# file: pkg/mod{i}.py" in heldout) == is_heldout(f"pkg/mod{i}.py", 0.2)
    assert "test/mod0.py" not in (tmp_path / "a" / "train.txt").read_text()
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["sha256"] == first["sha256"]


def test_tokenizer_special_ids_and_round_trip(tmp_path):
    _fake_stdlib(tmp_path / "lib")
    build_corpus(tmp_path / "corpus", root=tmp_path / "lib")
    train_tokenizer([tmp_path / "corpus" / "train.txt"], 400, tmp_path / "tokenizer.json")
    tokenizer = JsonTokenizer(tmp_path / "tokenizer.json")
    text = "def function_7(value):\n    return value * 7  # ünïcode ✓"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    raw = tokenizer._tokenizer
    assert [raw.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert raw.encode("<｜User｜>hi<｜Assistant｜>").ids[0] == SPECIAL_TOKENS.index("<｜User｜>")
