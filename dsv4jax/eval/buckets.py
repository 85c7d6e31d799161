"""Length buckets: padded shapes repeat, so each bucket compiles once."""

from __future__ import annotations

BUCKET_MULTIPLE = 64


def bucket_length(n: int) -> int:
    """The next power of two from 64 up to 1024, then multiples of 1024."""
    if n <= 1024:
        length = BUCKET_MULTIPLE
        while length < n:
            length *= 2
        return length
    return -(-n // 1024) * 1024


def batches_by_length(lengths: list[int], batch_size: int) -> list[tuple[int, list[int]]]:
    """Group item indices into (bucket length, up to batch_size indices), longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(bucket_length(lengths[i]), []).append(i)
    return [(length, members[s:s + batch_size]) for length, members in groups.items()
            for s in range(0, len(members), batch_size)]
