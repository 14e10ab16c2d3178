"""Tests of similarity.py: cosine, chamfer and symmetric chamfer against
hand-computed and brute-force values, the length-bounded blocks."""
import pytest
import torch

from similarity import (CHAMFER_LENGTH_SPREAD, _length_blocks, chamfer_similarities, chamfer_similarity,
                        cosine_similarity, symmetric_chamfer_similarity)

C = 32


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def test_cosine_similarity():
    queries = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    database = torch.tensor([[0.0, 2.0], [1.0, 1.0], [-5.0, 0.0]])
    expected = torch.tensor([[0.8, 1.4 / 2 ** 0.5, -0.6], [0.0, 1 / 2 ** 0.5, -1.0]])
    assert torch.allclose(cosine_similarity(queries, database), expected, atol=1e-6)


def hand_case():
    """Query: 2 valid frames (+1 padded); database video 0: 3 frames (+0),
    video 1: 1 frame (+2 padded, holding values that would win a max)."""
    query = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])  # (1, 3, 2)
    database = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]],
                             [[0.0, -1.0], [5.0, 5.0], [5.0, 5.0]]])  # (2, 3, 2)
    return query, torch.tensor([2]), database, torch.tensor([3, 1])


def test_chamfer_hand_computed():
    # video 0: frame (1,0) best 1.0, frame (0,1) best 0.8 -> 0.9
    # video 1: only (0,-1): 0 and -1 -> -0.5
    query, qn, database, dn = hand_case()
    assert torch.allclose(chamfer_similarity(query, qn, database, dn), torch.tensor([[0.9, -0.5]]))


def test_symmetric_chamfer_hand_computed():
    # reverse video 0: (1,0) -> 1.0, (0.6,0.8) -> 0.8, (-1,0) -> 0.0: mean 0.6; (0.9 + 0.6) / 2 = 0.75
    # reverse video 1: (0,-1) -> max(0, -1) = 0.0; (-0.5 + 0.0) / 2 = -0.25
    query, qn, database, dn = hand_case()
    assert torch.allclose(symmetric_chamfer_similarity(query, qn, database, dn), torch.tensor([[0.75, -0.25]]))
    # and it is the mean of the two directions
    forward = chamfer_similarity(query, qn, database, dn)
    backward = chamfer_similarity(database, dn, query, qn)
    assert torch.allclose(symmetric_chamfer_similarity(query, qn, database, dn), (forward + backward.t()) / 2)


def brute_force_chamfer(query, qn, database, dn, symmetric):
    out = torch.zeros(len(query), len(database), dtype=torch.float64)
    for i in range(len(query)):
        for j in range(len(database)):
            if qn[i] and dn[j]:
                sim = query[i, :qn[i]].double() @ database[j, :dn[j]].double().t()
                out[i, j] = sim.amax(1).mean()
                if symmetric:
                    out[i, j] = (out[i, j] + sim.amax(0).mean()) / 2
    return out


@pytest.mark.parametrize("symmetric", [False, True])
def test_chunked_chamfer_equals_unchunked(symmetric):
    """Every chunk size -- down to one similarity per chunk, which splits
    videos into frame ranges -- gives the brute-force values; empty videos
    score 0."""
    function = symmetric_chamfer_similarity if symmetric else chamfer_similarity
    query, database = torch.randn(6, 13, 8), torch.randn(9, 11, 8)
    qn = torch.tensor([13, 0, 1, 5, 13, 9])
    dn = torch.tensor([11, 3, 0, 1, 11, 4, 7, 2, 10])
    expected = brute_force_chamfer(query, qn, database, dn, symmetric)
    unchunked = function(query, qn, database, dn)
    assert torch.allclose(unchunked.double(), expected, atol=1e-5)
    for chunk_size in (1, 7, 11, 60, 200):
        assert torch.allclose(function(query, qn, database, dn, chunk_size=chunk_size), unchunked, atol=1e-5)


def test_chamfer_without_num_frames_uses_all_frames():
    query, database = torch.randn(2, 5, 8), torch.randn(3, 4, 8)
    expected = brute_force_chamfer(query, [5, 5], database, [4, 4, 4], False)
    assert torch.allclose(chamfer_similarity(query, None, database, None).double(), expected, atol=1e-5)


def test_chamfer_blocks_bound_the_padding():
    """Each block of videos padded together has its longest at most
    CHAMFER_LENGTH_SPREAD times its shortest and fits the frame budget."""
    lengths = sorted(torch.randint(1, 300, (200,), generator=torch.Generator().manual_seed(0)).tolist())
    blocks = list(_length_blocks(torch.arange(len(lengths)), lengths, 4096))
    assert sum(len(idx) for idx, _ in blocks) == len(lengths)
    for idx, padded_length in blocks:
        block = [lengths[i] for i in idx.tolist()]
        assert padded_length == max(block)
        assert len(block) == 1 or (max(block) <= CHAMFER_LENGTH_SPREAD * min(block)
                                   and len(block) * max(block) <= 4096)


def test_chamfer_similarities_equal_the_single_functions_bit_for_bit():
    query, qn = torch.randn(3, 7, C), torch.tensor([7, 2, 5])
    database, dn = torch.randn(4, 9, C), torch.tensor([9, 1, 4, 6])
    for chunk_size in (1 << 24, 17):
        forward, symmetric = chamfer_similarities(query, qn, database, dn, chunk_size=chunk_size)
        assert torch.equal(forward, chamfer_similarity(query, qn, database, dn, chunk_size=chunk_size))
        assert torch.equal(symmetric, symmetric_chamfer_similarity(query, qn, database, dn, chunk_size=chunk_size))


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        chamfer_similarity(torch.randn(1, 2, 4), None, torch.randn(1, 2, 4), None, chunk_size=0)
