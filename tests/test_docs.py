"""The design documents are in the repository and every section reference resolves (docs/README.md).

A reference is `<NAME> §<section>`: NAME in capitals names docs/<NAME>.md, and that file has a heading
`## <section>. Title` or `### <section> Title` (sections are numbers like 8 or 8.4, or letters like D or D.1).
Inside docs/<NAME>.md a bare `§<section>` means its own document. Also: no machine paths and no issue numbers in
the package, the docs or the benchmarks. Pure text checks; no JAX needed.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# Where references are checked (the docs themselves too, see `test_references_inside_docs_resolve`).
REFERENCE_SCOPE = ("dsv4jax", "bench", "tests", "examples", "README.md")
# Where machine paths and issue numbers are not allowed (bench/results/ records runs and is checked separately).
CLEAN_SCOPE = ("dsv4jax", "docs", "bench")
SUFFIXES = {".py", ".md", ".ipynb", ".txt", ".toml", ".cfg", ".sh", ".yaml", ".yml"}
THIS = pathlib.Path(__file__).resolve()

SECTION = r"(?:[A-Z](?:\.\d+)*|\d+(?:\.\d+)*)(?!\w)"
REF = re.compile(r"(?:(?<!\w)(?P<name>[A-Z][A-Z0-9_]*)(?P<md>\.md)? )?§(?P<sec>" + SECTION + ")")
ABSOLUTE = re.compile(r"(?<![\w.])/(?:work|root|home)/")
SPEC_PATH = re.compile(r"shared/spec/")
ISSUE = re.compile(r"\bissues? #\d+", re.IGNORECASE)


def _files(scope, exclude_results=True):
    for top in scope:
        path = ROOT / top
        if path.is_file():
            yield path
            continue
        for file in sorted(path.rglob("*")):
            if (not file.is_file() or file.suffix not in SUFFIXES or file.resolve() == THIS
                    or "__pycache__" in file.parts or ".ipynb_checkpoints" in file.parts):
                continue
            if exclude_results and file.relative_to(ROOT).parts[:2] == ("bench", "results"):
                continue
            yield file


def _lines(file):
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        yield f"{file.relative_to(ROOT)}:{number}", line


def _sections(name: str) -> set[str] | None:
    path = DOCS / f"{name}.md"
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^#+ (" + SECTION + r")(?:[. ]|$)", text, re.M)}


def _problems(where: str, line: str, own: str | None = None) -> list[str]:
    """What is wrong with the section references of one line (own: the document a bare § means, in docs/)."""
    problems = []
    for m in REF.finditer(line):
        name, sec = m.group("name") or own, m.group("sec")
        if name is None:
            problems.append(f"{where}: bare '§{sec}' — name the document: 'ARCHITECTURE §{sec}', "
                            f"'PARALLELISM §{sec}' or 'SERVING §{sec}' (docs/README.md)")
            continue
        if m.group("md"):
            problems.append(f"{where}: '{m.group(0)}' — write '{name} §{sec}' (no .md)")
        sections = _sections(name)
        if sections is None:
            problems.append(f"{where}: '{m.group(0)}' — there is no docs/{name}.md")
        elif sec not in sections:
            problems.append(f"{where}: '{m.group(0)}' — docs/{name}.md has no heading numbered {sec}")
    return problems


def test_the_design_documents_exist():
    for name in ("README", "ARCHITECTURE", "PARALLELISM", "SERVING"):
        assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing"


def test_every_section_reference_names_an_existing_section():
    problems = [p for file in _files(REFERENCE_SCOPE) for where, line in _lines(file) for p in _problems(where, line)]
    assert not problems, f"{len(problems)} unresolved section references:\n" + "\n".join(problems)


def test_references_inside_docs_resolve():
    problems = [p for file in sorted(DOCS.glob("*.md")) for where, line in _lines(file)
                for p in _problems(where, line, own=None if file.stem == "README" else file.stem)]
    assert not problems, "\n".join(problems)


def test_the_check_itself_catches_bad_references():
    assert _problems("x:1", "see ARCHITECTURE §8.4 and PARALLELISM §1.1 and SERVING §D.1") == []
    assert _problems("x:1", "see ARCHITECTURE §99")  # no such section
    assert _problems("x:1", "see §8.4")  # bare
    assert _problems("x:1", "see SERVING.md §D.1")  # .md form
    assert _problems("x:1", "see NOWHERE §1")  # no such document
    assert _problems("x:1", "see ARCHITECTURE §8.3–8.4") == []  # a range is one reference


@pytest.mark.parametrize("pattern, what", [(ABSOLUTE, "an absolute machine path"),
                                           (SPEC_PATH, "a path to design specs outside the repository"),
                                           (ISSUE, "an issue number")])
def test_no_machine_paths_or_issue_numbers(pattern, what):
    found = [f"{where}: {line.strip()[:120]}" for file in _files(CLEAN_SCOPE) for where, line in _lines(file)
             if pattern.search(line)]
    assert not found, (f"{what} in {len(found)} places (use repository-relative paths, docs/<NAME>.md, and "
                       "describe the work instead of citing a tracker):\n" + "\n".join(found))
