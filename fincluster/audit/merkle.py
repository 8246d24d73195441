"""The Merkle tree of RFC 9162 (Certificate Transparency v2), section 2.1.

Leaf hash ``SHA-256(0x00 || entry)``, interior node ``SHA-256(0x01 || left || right)``, the empty
tree hashes to ``SHA-256("")``. :class:`Frontier` keeps only the roots of the perfect subtrees of the
tree so far (at most log2(n) hashes), which is enough to append and to compute the root; the proof
functions take the full list of leaf hashes and follow the RFC's recursive definitions word for word.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


class Frontier:
    """The compact state of a tree of ``size`` leaves: its perfect subtree roots, largest first."""

    def __init__(self, size: int = 0, subtree_roots: Sequence[bytes] = ()) -> None:
        if size < 0 or len(subtree_roots) != size.bit_count():
            raise ValueError(f"a tree of {size} leaves has {size.bit_count()} subtree roots")
        self.size = size
        self._roots = list(subtree_roots)

    @property
    def subtree_roots(self) -> tuple[bytes, ...]:
        return tuple(self._roots)

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash; equal-sized neighbours merge, as the binary digits of the size carry."""
        self._roots.append(leaf)
        self.size += 1
        carries = (self.size & -self.size).bit_length() - 1
        for _ in range(carries):
            right = self._roots.pop()
            left = self._roots.pop()
            self._roots.append(node_hash(left, right))

    def root(self) -> bytes:
        if not self._roots:
            return EMPTY_ROOT
        result = self._roots[-1]
        for left in reversed(self._roots[:-1]):
            result = node_hash(left, result)
        return result


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1): where RFC 9162 splits a tree."""
    return 1 << ((n - 1).bit_length() - 1)


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) over leaf hashes."""
    frontier = Frontier()
    for leaf in leaves:
        frontier.append(leaf)
    return frontier.root()


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]): the audit path of leaf ``index`` in the tree over ``leaves``."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf {index} is not in a tree of {len(leaves)} leaves")
    n = len(leaves)
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return [*inclusion_proof(index, leaves[:k]), merkle_root(leaves[k:])]
    return [*inclusion_proof(index - k, leaves[k:]), merkle_root(leaves[:k])]


def consistency_proof(old_size: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]): shows the tree of ``old_size`` leaves is a prefix of the tree over ``leaves``."""
    if not 0 < old_size <= len(leaves):
        raise ValueError(f"no consistency proof from size {old_size} to {len(leaves)}")
    return _subproof(old_size, leaves, complete=True)


def _subproof(m: int, leaves: Sequence[bytes], *, complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [merkle_root(leaves)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, leaves[:k], complete=complete), merkle_root(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], complete=False), merkle_root(leaves[:k])]


def verify_inclusion(index: int, tree_size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2."""
    if not 0 <= index < tree_size:
        return False
    fn, sn, r = index, tree_size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 section 2.1.4.2."""
    if not 0 < old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if not proof:
        return False
    path = list(proof)
    if old_size.bit_count() == 1:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0
