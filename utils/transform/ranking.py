"""Rank each cell's expressed genes (compiled numba kernels) and the gene names as bytes.

Ties are broken uniformly at random but reproducibly: a tie group, in gene-index order, is
shuffled (Fisher-Yates) with a counter-based hash of (seed, global cell index, position), so the
result depends only on the cell's values and input index, whatever the chunking or workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(inline="always", cache=True)
def _splitmix64(x):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


COUNTING_LIMIT = 4096  # rows of whole numbers below this are counting-sorted


@njit(cache=True, nogil=True)
def rank_workspace(widest):
    """Work arrays of ``rank_row`` for rows of up to ``widest`` entries."""
    return (np.empty(widest, np.uint32), np.empty(widest, np.uint32), np.empty(widest, np.int32),
            np.empty(widest, np.int32), np.empty((4, 256), np.int64), np.empty(COUNTING_LIMIT, np.int64))


@njit(cache=True, nogil=True)
def rank_row(values, cell_key, workspace):
    """Positions ``0..n-1`` of one row's float32 ``values`` in rank order: value descending, ties
    shuffled with the row's ``cell_key``. The result is one of ``workspace``'s arrays (valid until
    the next call). Both sorts are stable, so ties reach the shuffle in gene-index order."""
    n = values.shape[0]
    ka, kb, pa, pb, count, buckets = workspace
    # The largest value and whether all are whole numbers, in a loop that vectorizes: the bits of
    # non-negative floats order like their values; capping keeps the integer conversion defined.
    bits = values.view(np.uint32)
    top_bits = np.uint32(0)
    fractional = 0
    for j in range(n):
        top_bits = max(top_bits, bits[j])
        capped = min(values[j], np.float32(1 << 30))  # floats this large are whole anyway
        fractional += np.float32(np.int32(capped)) != capped
    top = np.array([top_bits], np.uint32).view(np.float32)[0] if n else np.float32(0)
    if fractional == 0 and top < COUNTING_LIMIT:
        # Raw counts: one counting sort on the value (two passes instead of the radix's three).
        m = np.int64(top)
        buckets[: m + 1] = 0
        for j in range(n):
            buckets[np.int64(values[j])] += 1
        total = 0
        for v in range(m, -1, -1):  # descending
            c = buckets[v]
            buckets[v] = total
            total += c
        for j in range(n):
            v = np.int64(values[j])
            t = buckets[v]
            buckets[v] = t + 1
            ka[t] = np.uint32(v)
            pa[t] = j
    else:
        # LSD radix sort on the 4 bytes of the float32 bits (4 histograms from one pass; a byte
        # that every key shares is skipped).
        bits = values.view(np.uint32)
        count[:, :] = 0
        for j in range(n):
            key = np.uint32(0xFFFFFFFF) - bits[j]  # descending
            ka[j] = key
            pa[j] = j
            count[0, key & 255] += 1
            count[1, (key >> 8) & 255] += 1
            count[2, (key >> 16) & 255] += 1
            count[3, key >> 24] += 1
        for byte in range(4):
            shift = 8 * byte
            if count[byte, (ka[0] >> shift) & 255] == n:
                continue
            total = 0
            for b in range(256):
                c = count[byte, b]
                count[byte, b] = total
                total += c
            for j in range(n):
                d = (ka[j] >> shift) & 255
                t = count[byte, d]
                count[byte, d] = t + 1
                kb[t] = ka[j]
                pb[t] = pa[j]
            ka, kb = kb, ka
            pa, pb = pb, pa
    # Shuffle each tie group (still in gene-index order after the stable sort).
    group_start = 0
    for j in range(1, n + 1):
        if j == n or ka[j] != ka[group_start]:
            for i in range(j - group_start - 1, 0, -1):
                h = _splitmix64(cell_key + np.uint64(group_start + i)) >> np.uint64(32)
                k = np.int64((h * np.uint64(i + 1)) >> np.uint64(32))  # uniform in [0, i]
                a = group_start + i
                b = group_start + k
                tmp = pa[a]
                pa[a] = pa[b]
                pa[b] = tmp
            group_start = j
    return pa


@njit(cache=True, nogil=True)
def cell_key(seed_key, cell_id):
    """The tie-breaking key of one cell: depends on the seed and the cell's global index only."""
    return _splitmix64(seed_key ^ (np.uint64(cell_id) * _GOLDEN))


@njit(cache=True, nogil=True)
def seed_key(seed):
    return _splitmix64(np.uint64(seed) + _GOLDEN)


_SLOT = 16  # bytes per padded name: copying a fixed 16 bytes is much faster than a byte loop


@intrinsic
def _copy16(typingctx, dst, dst_pos, src, src_pos):
    """Copy 16 bytes from ``src[src_pos:]`` to ``dst[dst_pos:]`` (uint8 arrays) as one unaligned move."""
    sig = types.void(dst, types.intp, src, types.intp)

    def codegen(context, builder, signature, args):
        dst_array = context.make_array(signature.args[0])(context, builder, args[0])
        src_array = context.make_array(signature.args[2])(context, builder, args[2])
        to = builder.gep(dst_array.data, [args[1]])
        frm = builder.gep(src_array.data, [args[3]])
        cgutils.raw_memcpy(builder, to, frm, context.get_constant(types.intp, _SLOT), 1)
        return context.get_dummy_value()

    return sig, codegen


class GeneNameTable:
    """Gene names as one UTF-8 byte buffer plus offsets; names shorter than 16 bytes also in fixed
    16-byte slots (slot g at ``16 * g``), each followed by a space."""

    def __init__(self, names: Sequence[str]):
        encoded = [name.encode("utf-8") for name in names]
        self.lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        self.offsets[1:] = np.cumsum(self.lengths)
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        # Each byte to its place in its name's slot, with whole arrays (the API builds this per call).
        name_of_byte = np.repeat(np.arange(len(encoded)), self.lengths)
        place = np.arange(len(self.buffer)) - self.offsets[name_of_byte]
        short = self.lengths[name_of_byte] < _SLOT
        slots = np.zeros(len(encoded) * _SLOT, dtype=np.uint8)
        slots[name_of_byte[short] * _SLOT + place[short]] = self.buffer[short]
        short_names = np.flatnonzero(self.lengths < _SLOT)
        slots[short_names * _SLOT + self.lengths[short_names]] = 32  # space
        self.slots = slots


@njit(cache=True, nogil=True)
def copy_bytes(dst, dst_pos, src, src_pos, n):
    """``dst[dst_pos:dst_pos + n] = src[src_pos:src_pos + n]`` in 16-byte moves; may write up
    to 15 bytes past the end and read past ``src_pos + n``, so both need 16 bytes of slack."""
    for k in range(0, n, _SLOT):
        _copy16(dst, dst_pos + k, src, src_pos + k)

