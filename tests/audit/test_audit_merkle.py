"""RFC 9162 Merkle tree: known answers, proofs, and the incremental frontier."""

from __future__ import annotations

import hashlib

import pytest
from audit_scenario import check_vector

from fincluster.audit.merkle import (
    EMPTY_ROOT,
    Frontier,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    merkle_root,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

# Eight leaf entries of growing length; the first is the empty string.
ENTRIES = [bytes(range(16 * i, 16 * i + i)) for i in range(8)]


def reference_root(leaves: list[bytes]) -> bytes:
    """MTH written straight from RFC 9162 section 2.1.1, independent of the code under test."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + reference_root(leaves[:k]) + reference_root(leaves[k:])).digest()


def leaves_of(n: int) -> list[bytes]:
    return [leaf_hash(f"entry {i}".encode()) for i in range(n)]


def test_empty_tree_hash_is_sha256_of_the_empty_string() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert Frontier().root() == EMPTY_ROOT
    assert merkle_root([]) == EMPTY_ROOT


def test_leaf_and_node_hashes_use_the_rfc_domain_prefixes() -> None:
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    assert node_hash(b"L" * 32, b"R" * 32) == hashlib.sha256(b"\x01" + b"L" * 32 + b"R" * 32).digest()


def test_roots_and_proofs_match_the_known_answer_vector() -> None:
    leaves = [leaf_hash(entry) for entry in ENTRIES]
    vector = {
        "entries_hex": [entry.hex() for entry in ENTRIES],
        "leaf_hashes": [leaf.hex() for leaf in leaves],
        "roots": {str(n): merkle_root(leaves[:n]).hex() for n in range(9)},
        "inclusion_proofs": {
            f"{index}/{size}": [h.hex() for h in inclusion_proof(index, leaves[:size])]
            for index, size in [(0, 1), (0, 8), (5, 8), (2, 3), (4, 7), (6, 7)]
        },
        "consistency_proofs": {
            f"{old}/{new}": [h.hex() for h in consistency_proof(old, leaves[:new])]
            for old, new in [(1, 8), (3, 7), (4, 8), (6, 8), (2, 5), (8, 8)]
        },
    }
    check_vector("merkle.json", vector)


def test_three_leaf_root_is_the_rfc_composition() -> None:
    a, b, c = leaves_of(3)
    assert merkle_root([a, b, c]) == node_hash(node_hash(a, b), c)


@pytest.mark.parametrize("size", range(0, 70))
def test_frontier_root_equals_the_recursive_definition(size: int) -> None:
    leaves = leaves_of(size)
    frontier = Frontier()
    for leaf in leaves:
        frontier.append(leaf)
    assert frontier.root() == reference_root(leaves)
    assert len(frontier.subtree_roots) == size.bit_count()
    assert Frontier(size, frontier.subtree_roots).root() == frontier.root()


def test_frontier_continues_from_a_saved_state() -> None:
    leaves = leaves_of(45)
    saved = Frontier()
    for leaf in leaves[:21]:
        saved.append(leaf)
    resumed = Frontier(saved.size, saved.subtree_roots)
    for leaf in leaves[21:]:
        resumed.append(leaf)
    assert resumed.root() == reference_root(leaves)


def test_frontier_refuses_roots_that_do_not_fit_the_size() -> None:
    with pytest.raises(ValueError, match="subtree roots"):
        Frontier(3, [b"x" * 32])


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 32, 33])
def test_every_inclusion_proof_verifies_and_a_wrong_one_does_not(size: int) -> None:
    leaves = leaves_of(size)
    root = reference_root(leaves)
    for index in range(size):
        proof = inclusion_proof(index, leaves)
        assert verify_inclusion(index, size, leaves[index], proof, root)
        assert not verify_inclusion(index, size, leaf_hash(b"forged"), proof, root)
        if size > 1:
            assert not verify_inclusion((index + 1) % size, size, leaves[index], proof, root)
            assert not verify_inclusion(index, size, leaves[index], proof[:-1], root)


@pytest.mark.parametrize("new_size", [1, 2, 3, 7, 8, 9, 16, 21])
def test_every_consistency_proof_verifies_and_a_rewritten_history_does_not(new_size: int) -> None:
    leaves = leaves_of(new_size)
    new_root = reference_root(leaves)
    for old_size in range(1, new_size + 1):
        proof = consistency_proof(old_size, leaves)
        assert verify_consistency(old_size, new_size, reference_root(leaves[:old_size]), new_root, proof)
        rewritten = [*leaves[: old_size - 1], leaf_hash(b"rewritten")]
        if old_size < new_size:
            assert not verify_consistency(old_size, new_size, reference_root(rewritten), new_root, proof)


def test_proof_arguments_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError):
        inclusion_proof(3, leaves_of(3))
    with pytest.raises(ValueError):
        consistency_proof(0, leaves_of(3))
    assert not verify_inclusion(3, 3, leaf_hash(b""), [], EMPTY_ROOT)
    assert not verify_consistency(4, 3, EMPTY_ROOT, EMPTY_ROOT, [])
