"""Prefix caching of V4's state (SERVING §D.8): the host-side index of cached prompt pages and ring snapshots.

A page of `page_tokens` prompt positions is cached under the chain of its tokens and every token before it (an
entry per page, parent by parent, as vLLM's block hashes). Its compressed rows and indexer keys are read in place
by every request that shares the prefix: a sequence never writes the pages before its own position. Resuming at a
page boundary also needs the per-slot rings as of that boundary (sliding window, compressor and indexer blocks);
those are copied into a snapshot slot on the device when a prefill chunk ends there. A prefix hits at the longest
chain of cached pages whose last entry has a snapshot. With an MTP layer the snapshot also holds the MTP state,
which has already seen the token after the boundary, so that token must match too.

Pages in the cache are counted by the requests using them; an entry no running request uses is evictable, least
recently used first, when the page pool or the snapshot slots run short.
"""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass
class Entry:
    key: tuple  # (parent key, this page's tokens)
    page: int
    snapshot: int | None  # device snapshot slot of the rings at the end of this page, if one was taken
    next_token: int | None  # the token after the page, which an MTP snapshot has seen


@dataclasses.dataclass
class Hit:
    tokens: int  # cached positions (a multiple of page_tokens)
    pages: list[int]
    snapshot: int


class PrefixCache:
    def __init__(self, page_tokens: int, num_snapshots: int, match_next_token: bool):
        self.page_tokens, self.match_next_token = page_tokens, match_next_token
        self.entries: collections.OrderedDict[tuple, Entry] = collections.OrderedDict()  # least recent first
        self.by_page: dict[int, Entry] = {}
        self.users: collections.Counter[int] = collections.Counter()  # cached page -> running requests using it
        self.free_snapshots = list(range(num_snapshots - 1, -1, -1))

    @staticmethod
    def keys(tokens: list[int], page_tokens: int, pages: int) -> list[tuple]:
        """The chain keys of the first `pages` full pages of `tokens`: (hash of the parent key, the page's tokens),
        so equal keys mean equal pages after equal prefixes (up to a 64-bit hash collision of the parents)."""
        keys, parent = [], None
        for k in range(pages):
            parent = (hash(parent), tuple(tokens[k * page_tokens:(k + 1) * page_tokens]))
            keys.append(parent)
        return keys

    def lookup(self, tokens: list[int], limit: int, keys: list[tuple] | None = None) -> Hit | None:
        """The longest cached prefix of `tokens` of at most `limit` positions that can be resumed; its pages are
        marked used (release them with `unuse`). `keys`: the tokens' page keys, if computed already."""
        best, pages = None, []
        pages_wanted = limit // self.page_tokens
        keys = keys[:pages_wanted] if keys is not None else self.keys(tokens, self.page_tokens, pages_wanted)
        for k, key in enumerate(keys):
            entry = self.entries.get(key)
            if entry is None:
                break
            pages.append(entry.page)
            end = (k + 1) * self.page_tokens
            if entry.snapshot is not None and (not self.match_next_token or entry.next_token == tokens[end]):
                best = Hit(tokens=end, pages=list(pages), snapshot=entry.snapshot)
        if best is not None:
            for page in best.pages:
                self.users[page] += 1
                self.entries.move_to_end(self.by_page[page].key)
        return best

    def insert(self, key: tuple, page: int, snapshot: int | None, next_token: int | None) -> None:
        """Cache a page its owner (a running request) has finished writing; the owner counts as its user."""
        entry = Entry(key=key, page=page, snapshot=snapshot, next_token=next_token)
        self.entries[key] = entry
        self.by_page[page] = entry
        self.users[page] += 1

    def unuse(self, pages: list[int]) -> list[int]:
        """A request lets go of `pages`: the ones not in the cache, which the caller frees."""
        private = []
        for page in pages:
            if page in self.by_page:
                self.users[page] -= 1
            else:
                private.append(page)
        return private

    def evictable(self) -> int:
        return sum(1 for entry in self.entries.values() if self.users[entry.page] == 0)

    def evict(self, pages: int = 0, snapshots: int = 0) -> list[int]:
        """Drop least recently used unused entries until `pages` pages and `snapshots` snapshot slots came free;
        returns the pages, which the caller frees."""
        freed = []
        for key in list(self.entries):
            if len(freed) >= pages and len(self.free_snapshots) >= snapshots:
                break
            entry = self.entries[key]
            if self.users[entry.page]:
                continue
            del self.entries[key], self.by_page[entry.page], self.users[entry.page]
            freed.append(entry.page)
            if entry.snapshot is not None:
                self.free_snapshots.append(entry.snapshot)
        return freed

    def take_snapshot(self) -> tuple[int | None, list[int]]:
        """A free snapshot slot (None if every one is in use), evicting an unused entry if need be; and the pages
        that eviction freed, which the caller frees."""
        freed = self.evict(snapshots=1) if not self.free_snapshots else []
        return (self.free_snapshots.pop() if self.free_snapshots else None), freed
