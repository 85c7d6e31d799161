"""A corpus that exists offline on every machine: the Python standard library's own source.

Deterministic: files are taken in sorted order from the running interpreter's stdlib (site-packages and vendored
third-party code excluded; the stdlib's own test suite and tools only with `include_tests`), and each file goes to
the held-out split iff a hash of its relative path says so. The manifest records the Python version and a digest, since another Python has another stdlib.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

ALWAYS_EXCLUDED = {"site-packages", "__pycache__", "ensurepip", "pydoc_data"}
TESTS_AND_TOOLS = {"test", "tests", "idlelib", "lib2to3", "turtledemo"}
EXCLUDED_PARTS = ALWAYS_EXCLUDED | TESTS_AND_TOOLS


def stdlib_files(root: str | Path | None = None, include_tests: bool = False) -> list[Path]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    excluded = ALWAYS_EXCLUDED if include_tests else EXCLUDED_PARTS
    files = [p for p in root.rglob("*.py")
             if not excluded.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_heldout(relative_path: str, fraction: float) -> bool:
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def build_corpus(out_dir: str | Path, heldout_fraction: float = 0.02, root: str | Path | None = None,
                 include_tests: bool = False) -> dict:
    """Write train.txt and heldout.txt (documents joined by a blank-line separator) and manifest.json.

    `include_tests` adds the stdlib's test suite and tools (about 2.7x the text): more data for a model trained
    for many passes."""
    import platform

    root = Path(root or sysconfig.get_paths()["stdlib"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "heldout": []}
    for path in stdlib_files(root, include_tests):
        relative = path.relative_to(root).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        splits["heldout" if is_heldout(relative, heldout_fraction) else "train"].append((relative, text))
    manifest = {"source": "python-stdlib" + ("+tests" if include_tests else ""), "python": platform.python_version(),
                "heldout_fraction": heldout_fraction}
    digest = hashlib.sha256()
    for name, documents in splits.items():
        body = "\n\n".join(f"# file: {relative}\n{text}" for relative, text in documents)
        (out_dir / f"{name}.txt").write_text(body, encoding="utf-8")
        digest.update(body.encode())
        manifest[name] = {"files": len(documents), "characters": len(body)}
    manifest["sha256"] = digest.hexdigest()
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
