"""Generation tasks scored by exact match (after stripping) or by a regular expression."""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    output: str
    correct: bool


def evaluate_generation(model, records, max_new_tokens: int = 64, batch_size: int = 8, temperature: float = 0.0,
                        seed: int = 0, mesh=None) -> tuple[list[GenerationResult], float]:
    """records: dicts with "prompt" and either "answer" (exact match) or "regex" (re.search on the output).
    Generation runs through the serving engine (over `mesh` if given)."""
    results = []
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        for record in batch:
            if "prompt" not in record or not ("answer" in record or "regex" in record):
                raise ValueError(f"record {record!r} needs 'prompt' and 'answer' or 'regex'")
        outputs = model.generate([r["prompt"] for r in batch], max_new_tokens=max_new_tokens,
                                 temperature=temperature, seed=seed + start, mesh=mesh)
        for record, output in zip(batch, outputs):
            text = output if isinstance(output, str) else " ".join(map(str, output))
            if "regex" in record:
                correct = re.search(record["regex"], text) is not None
            else:
                correct = text.strip() == str(record["answer"]).strip()
            results.append(GenerationResult(text, correct))
    accuracy = sum(r.correct for r in results) / len(results) if results else 0.0
    return results, accuracy
