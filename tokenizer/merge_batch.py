"""BPE on many pre-tokens at once, vectorised with numpy.

The rule is :func:`scratchlm.tokenizer.apply_merges.merge_by_rank`'s: in each
pre-token, merge the adjacent pair with the lowest rank (leftmost among
equals), one merge at a time, until no pair has a rank. Run in Python, each
merge costs ~1 us of interpreter work, and the first encode of a text has
hundreds of thousands of them (313K for the 50K distinct pre-tokens of the
Python docs). Here one *round* makes one merge in every pre-token still
merging, with a few array operations over all of them.

Pre-tokens of similar length share a 2-D array, one column each (column-major,
so the per-round reductions run down contiguous rows), padded at the end with
a pad id that is in no pair. For "hello" and " the"::

    ids      h        " "         key[j] = rank of the pair starting at j,
             e        t                    packed as rank * 64 + j, or
             l        h                    NO_KEY where that pair has none
             l        e
             o        pad

A round takes the minimum key of each column: the lowest rank and, among
equal ranks, the smallest position - exactly the pair merge_by_rank picks.
Pre-tokens whose minimum is NO_KEY are finished and leave. In the others the
pair's left token becomes the merged id and its right token turns into a pad;
each pre-token is a doubly linked list over its live positions, so nothing
moves; then the two pairs touching the merged token get new keys.

Pair ranks come from an open-addressing hash table held in arrays (looked up
for all pre-tokens at once), except in the first round, where every token is
still a byte and a 256 x 256 table indexed by the two byte values answers.

>>> ranks = {(97, 98): (0, 256), (256, 99): (1, 257)}   # a+b -> 256, ab+c -> 257
>>> BatchMerger(ranks, list(range(256))).merge([b"abcab", b"c", b"ba"])
[[257, 256], [99], [98, 97]]
"""

from __future__ import annotations

import numpy as np

Ranks = dict[tuple[int, int], tuple[int, int]]

# Pieces may be at most this many bytes: a key packs the position in 6 bits.
MAX_PIECE_BYTES = 64
# Pair keys (left * base + right) must fit in int64, so ids must stay below this.
MAX_ID = 3_000_000_000
_POSITION_BITS = 6
NO_KEY = np.iinfo(np.int64).max
_EMPTY_SLOT = -1
# Fibonacci hashing: multiply by 2^64 / golden ratio, keep the top bits.
_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


class _PairTable:
    """``(left, right) -> (rank, merged id)`` for arrays of pairs: linear probing in numpy arrays.

    The table is at most a quarter full, so a lookup needs ~1.2 probes for a
    pair that is there and ~1.4 for one that is not (Knuth's estimates for
    linear probing); each probe is a few array operations over the pairs
    still unresolved.
    """

    def __init__(self, ranks: Ranks, key_base: int):
        self._key_base = key_base
        count = len(ranks)
        self._bits = max(4, (4 * count).bit_length())
        size = 1 << self._bits
        keys = np.array([left * key_base + right for left, right in ranks], dtype=np.int64).reshape(-1)
        self._keys = np.full(size, _EMPTY_SLOT, dtype=np.int64)
        self._ranks = np.zeros(size, dtype=np.int64)
        self._merged = np.zeros(size, dtype=np.int64)
        entry_ranks = np.array([rank for rank, _ in ranks.values()], dtype=np.int64)
        entry_merged = np.array([merged for _, merged in ranks.values()], dtype=np.int64)
        # Insert all keys at once: per step, each free slot goes to the first
        # key that wants it; the others move one slot on.
        slots = self._hash(keys)
        pending = np.arange(count)
        while len(pending):
            wanted = slots[pending]
            free = self._keys[wanted] == _EMPTY_SLOT
            claimed, first = np.unique(wanted[free], return_index=True)
            winners = pending[free][first]
            self._keys[claimed] = keys[winners]
            self._ranks[claimed] = entry_ranks[winners]
            self._merged[claimed] = entry_merged[winners]
            placed = np.zeros(count, dtype=bool)
            placed[winners] = True
            pending = pending[~placed[pending]]
            slots[pending] = (slots[pending] + 1) & (size - 1)

    def _hash(self, keys: np.ndarray) -> np.ndarray:
        return ((keys.view(np.uint64) * _HASH_MULTIPLIER) >> np.uint64(64 - self._bits)).astype(np.int64)

    def lookup(self, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(rank, merged id)`` arrays for the pairs; rank is NO_KEY where a pair has no merge."""
        keys = left * self._key_base + right
        ranks = np.full(len(keys), NO_KEY, dtype=np.int64)
        merged = np.zeros(len(keys), dtype=np.int64)
        pending = np.arange(len(keys))
        slots = self._hash(keys)
        mask = len(self._keys) - 1
        while len(pending):
            stored = self._keys[slots]
            hit = stored == keys
            ranks[pending[hit]] = self._ranks[slots[hit]]
            merged[pending[hit]] = self._merged[slots[hit]]
            probe_on = ~hit & (stored != _EMPTY_SLOT)
            pending, keys, slots = pending[probe_on], keys[probe_on], (slots[probe_on] + 1) & mask
        return ranks, merged


class BatchMerger:
    """``merge_by_rank`` for a list of byte strings, one vectorised round per merge.

    ``ranks`` maps ``(left id, right id) -> (rank, merged id)``; ``byte_ids[b]``
    is the id of the single byte ``b``. Building one takes ~30 ms for GPT-2's
    50K merges.
    """

    def __init__(self, ranks: Ranks, byte_ids: list[int]):
        largest = max([max(*pair, merged) for pair, (_, merged) in ranks.items()] + list(byte_ids))
        if largest >= MAX_ID:
            raise ValueError(f"ids must be below {MAX_ID:,} for a BatchMerger, got {largest:,}")
        self._pad = largest + 1  # an id that is in no pair, so pairs with it have no rank
        self._pairs = _PairTable(ranks, key_base=largest + 2)
        self._byte_ids = np.array(byte_ids, dtype=np.int64)
        # First-round table: (first byte << 8 | second byte) -> rank of that pair of byte ids.
        first, second = np.divmod(np.arange(1 << 16), 1 << 8)
        self._byte_pair_ranks, _ = self._pairs.lookup(self._byte_ids[first], self._byte_ids[second])

    def merge(self, pieces: list[bytes]) -> list[list[int]]:
        """The ids of each byte string, as ``merge_by_rank`` would give them."""
        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        if len(pieces) and lengths.max() > MAX_PIECE_BYTES:
            raise ValueError(f"pieces must be at most {MAX_PIECE_BYTES} bytes long, got {int(lengths.max())}")
        results: list[list[int] | None] = [None] * len(pieces)
        data = np.frombuffer(b"".join(pieces), dtype=np.uint8)
        starts = np.cumsum(lengths) - lengths
        for index in np.flatnonzero(lengths < 2).tolist():  # nothing to merge
            results[index] = self._byte_ids[data[starts[index] : starts[index] + lengths[index]]].tolist()
        # One array per length range [low, 2 low): pieces in it differ in
        # length by less than 2x, so padding at most doubles the work.
        low = 2
        while low <= lengths.max(initial=0):
            chosen = np.flatnonzero((lengths >= low) & (lengths < 2 * low))
            if len(chosen):
                self._merge_group(data, starts[chosen], lengths[chosen], chosen, results)
            low *= 2
        return results  # type: ignore[return-value]

    def _merge_group(self, data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, indices: np.ndarray,
                     results: list) -> None:
        """Merge ``data[start : start + length]`` for each start and length; store at ``results[index]``."""
        width, count = int(lengths.max()), len(indices)
        positions = np.arange(width)[:, None]
        real = positions < lengths  # (width, count), like every array below
        raw = np.zeros((width, count), dtype=np.int64)
        raw[real] = data[(starts + positions)[real]]
        ids = np.where(real, self._byte_ids[raw], self._pad)
        keys = np.full((width, count), NO_KEY, dtype=np.int64)
        first_ranks = self._byte_pair_ranks[raw[:-1] << 8 | raw[1:]]
        keys[:-1] = np.where(real[1:] & (first_ranks != NO_KEY), first_ranks << _POSITION_BITS | positions[:-1],
                             NO_KEY)
        following = np.broadcast_to(positions + 1, (width, count)).copy()  # width: no next token
        preceding = np.broadcast_to(positions - 1, (width, count)).copy()  # -1: no previous token

        emitted = np.zeros(count, dtype=bool)
        while True:
            best = keys.min(axis=0)
            finished = best == NO_KEY
            if finished.any():
                newly = finished & ~emitted
                self._emit(ids[:, newly], indices[newly], results)
                emitted |= newly
                if finished.all():
                    return
                # Finished columns are dropped once they are a quarter of the
                # array; copying every round cost ~10% of the merging.
                if 4 * int(finished.sum()) >= count:
                    going = ~finished
                    # Contiguous copies, so that the flat views below write through.
                    ids, keys, following, preceding = (
                        np.ascontiguousarray(array[:, going]) for array in (ids, keys, following, preceding)
                    )
                    indices, best, count = indices[going], best[going], int(going.sum())
                    finished, emitted = np.zeros(count, dtype=bool), np.zeros(count, dtype=bool)

            # Flat indices into the (width, count) arrays: position * count + column.
            column = np.flatnonzero(~finished)
            position = best[column] & ((1 << _POSITION_BITS) - 1)
            at = position * count + column
            flat_ids, flat_keys = ids.reshape(-1), keys.reshape(-1)
            flat_following, flat_preceding = following.reshape(-1), preceding.reshape(-1)

            # Merge: the left token becomes the merged one, the right token a pad.
            right = flat_following[at] * count + column
            _, merged = self._pairs.lookup(flat_ids[at], flat_ids[right])
            flat_ids[at] = merged
            flat_ids[right] = self._pad
            flat_keys[right] = NO_KEY
            after = flat_following[right]
            flat_following[at] = after
            inside = after < width
            after_at = (after * count + column)[inside]
            flat_preceding[after_at] = position[inside]

            # The pairs on both sides of the merged token are new.
            flat_keys[at] = NO_KEY
            ranks, _ = self._pairs.lookup(merged[inside], flat_ids[after_at])
            flat_keys[at[inside]] = self._pack(ranks, position[inside])
            before = flat_preceding[at]
            has_left = before >= 0
            before_at = (before * count + column)[has_left]
            ranks, _ = self._pairs.lookup(flat_ids[before_at], merged[has_left])
            flat_keys[before_at] = self._pack(ranks, before[has_left])

    @staticmethod
    def _pack(ranks: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Keys that order by rank, then by position; NO_KEY where there is no rank."""
        return np.where(ranks == NO_KEY, NO_KEY, ranks << _POSITION_BITS | positions)

    def _emit(self, ids: np.ndarray, indices: np.ndarray, results: list) -> None:
        """Store the live tokens of each finished column of ``ids`` at ``results[index]``."""
        tokens = ids.T  # one row per piece, in order
        live = tokens != self._pad
        flat = tokens[live].tolist()
        offset = 0
        for index, size in zip(indices.tolist(), live.sum(axis=1).tolist()):
            results[index] = flat[offset : offset + size]
            offset += size
