"""The similarity functions that compare video representations: cosine of
video embeddings (TCA_c), chamfer (TCA_f) and symmetric chamfer (TCA_sym) of
frame embeddings (ViSiL, Kordopatis-Zilos et al., ICCV 2019). Training,
evaluation and the benchmark all score with these.

The chamfer functions take padded frame embeddings (N, T, C) with their
num_frames (N,) and compute the frame-to-frame products in length-bounded
blocks, so memory stays bounded whatever the number and length of videos.
"""
import math

import torch

from utils import l2_normalize, length_buckets, make_frame_mask

# chamfer similarities are computed in blocks of at most this many
# frame-to-frame similarities (64 MB in float32).
CHAMFER_CHUNK_SIZE = 1 << 24

# a chamfer block's longest video is at most this many times its shortest:
# padding (by replication) then costs at most ~15% of the products' FLOPs
# whatever the spread of lengths (bench/NOTES.md).
CHAMFER_LENGTH_SPREAD = 1.15


def cosine_similarity(queries, database):
    """Cosine similarity (Q, D) of video embeddings queries (Q, C) and
    database (D, C)."""
    return l2_normalize(queries) @ l2_normalize(database).t()


def chamfer_similarity(query, query_num_frames, database, database_num_frames, chunk_size=CHAMFER_CHUNK_SIZE):
    """Chamfer similarity (Q, D) of frame embeddings (ViSiL): for each query
    video, the mean over its valid frames of the best dot product with any
    valid frame of the database video.

    query (Q, Tq, C), database (D, Td, C); *_num_frames (Q,) / (D,), or None
    when every frame is valid. A video without frames scores 0.
    chunk_size bounds the frame-to-frame similarities held at once (memory
    is about max(chunk_size, longest video) elements), whatever the lengths.
    """
    return _chamfer(query, query_num_frames, database, database_num_frames, chunk_size, False)[0]


def symmetric_chamfer_similarity(query, query_num_frames, database, database_num_frames,
                                 chunk_size=CHAMFER_CHUNK_SIZE):
    """(chamfer(query, database) + chamfer(database, query)^T) / 2, (Q, D).
    Both directions come from the same frame-to-frame similarities."""
    return chamfer_similarities(query, query_num_frames, database, database_num_frames, chunk_size)[1]


def chamfer_similarities(query, query_num_frames, database, database_num_frames, chunk_size=CHAMFER_CHUNK_SIZE):
    """(chamfer, symmetric chamfer), both (Q, D), from one pass over the
    frame-to-frame similarities: what TCA_f and TCA_sym cost together is
    what TCA_sym costs alone."""
    forward, reverse = _chamfer(query, query_num_frames, database, database_num_frames, chunk_size, True)
    return forward, (forward + reverse) / 2


def _as_frames(x, num_frames):
    x = torch.as_tensor(x)
    if x.dim() != 3:
        raise ValueError(f"expected frame embeddings (N, T, C), got {tuple(x.shape)}")
    if num_frames is None:
        num_frames = torch.full((x.shape[0],), x.shape[1], device=x.device)
    num_frames = torch.as_tensor(num_frames, device=x.device).reshape(-1).long().clamp(0, x.shape[1])
    if num_frames.numel() != x.shape[0]:
        raise ValueError(f"num_frames has {num_frames.numel()} entries for {x.shape[0]} videos")
    return x, num_frames


def _replicate_padding(x, num_frames):
    """Fill the padded frames of x (n, T, C) with each video's first frame:
    a duplicate never changes a max, so no mask is needed on the similarity
    matrix. Every video must have a frame."""
    valid = make_frame_mask(num_frames, x.shape[1])  # (n, T)
    return torch.where(valid.unsqueeze(-1), x, x[:, :1])


def _length_blocks(order, lengths, budget):
    """Blocks of videos (sorted by length) of similar length within budget
    padded frames: yields (indices, padded length)."""
    for start, stop in length_buckets(lengths, budget, spread=CHAMFER_LENGTH_SPREAD):
        yield order[start:stop], lengths[stop - 1]


def _chamfer(query, query_num_frames, database, database_num_frames, chunk_size, symmetric):
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    query, qn = _as_frames(query, query_num_frames)
    database, dn = _as_frames(database, database_num_frames)
    if query.shape[2] != database.shape[2]:
        raise ValueError(f"query has {query.shape[2]} channels, database {database.shape[2]}")
    # (forward, reverse) (Q, D): the query-to-database chamfer and, when
    # symmetric, the database-to-query one
    out = query.new_zeros(1 + symmetric, query.shape[0], database.shape[0])
    # Sorting videos by length and padding them in blocks of similar length
    # keeps the work on padding small; empty videos are skipped (score 0).
    q_order = torch.argsort(qn)
    q_order = q_order[qn[q_order] > 0]
    d_order = torch.argsort(dn)
    d_order = d_order[dn[d_order] > 0]
    q_lengths, d_lengths = qn[q_order].tolist(), dn[d_order].tolist()
    if not q_lengths or not d_lengths:
        return out[0], out[1] if symmetric else None
    # Query blocks of about sqrt(chunk_size) frames (more if the database is
    # small) and database blocks filling the rest of the chunk keep each
    # matrix product large and square enough to run near peak speed. A block
    # holding one video longer than its budget is cut into frame ranges by
    # _chamfer_block.
    row_budget = max(math.isqrt(chunk_size), chunk_size // sum(d_lengths))
    # Length-bounded query blocks are small; consecutive ones are stacked into
    # groups of at most row_budget rows (padded once, about the size of
    # `query`), so each matrix product still has many rows.
    groups, group = [], []
    for q_idx, q_len in _length_blocks(q_order, q_lengths, row_budget):
        if group and sum(b.shape[0] * b.shape[1] for _, b in group) + len(q_idx) * q_len > row_budget:
            groups.append(group)
            group = []
        group.append((q_idx, _replicate_padding(query[q_idx, :q_len], qn[q_idx])))  # (nq, Tq, C)
    groups.append(group)
    groups = [(group, torch.cat([b.reshape(-1, b.shape[2]) for _, b in group])) for group in groups]
    rows = max(len(group_rows) for _, group_rows in groups)
    for d_idx, d_len in _length_blocks(d_order, d_lengths, max(1, chunk_size // rows)):
        d_block = _replicate_padding(database[d_idx, :d_len], dn[d_idx])  # (nd, Td, C)
        for group, group_rows in groups:
            if len(group_rows) * d_block.shape[0] * d_len <= chunk_size:
                sims = torch.mm(group_rows, d_block.reshape(-1, d_block.shape[2]).t())  # (R, nd * Td)
                for q_idx, sims in _split_group(group, sims, qn, dn[d_idx], symmetric):
                    out[:, q_idx.unsqueeze(1), d_idx.unsqueeze(0)] = sims
            else:  # a database video longer than the budget: frame ranges
                for q_idx, q_block in group:
                    sims = _chamfer_block(q_block, qn[q_idx], d_block, dn[d_idx], chunk_size, symmetric)
                    out[:, q_idx.unsqueeze(1), d_idx.unsqueeze(0)] = sims
    return out[0], out[1] if symmetric else None


def _split_group(group, sims, qn, dn, symmetric):
    """Yield (query indices, (1 or 2, nq, nd) chamfer similarities: forward,
    and reverse when symmetric) for each query block of `group` from the
    similarities sims (R, nd * Td) of its stacked frames with a block of
    database videos padded by replication."""
    nd = len(dn)
    d_len = sims.shape[1] // nd
    best_d = sims.view(-1, nd, d_len).amax(2)  # (R, nd) best database frame of each query frame
    start = 0
    for q_idx, q_block in group:
        nq, q_len, _ = q_block.shape
        rows = slice(start, start + nq * q_len)
        start += nq * q_len
        q_valid = make_frame_mask(qn[q_idx], q_len).to(sims.dtype)  # (nq, Tq)
        result = (best_d[rows].view(nq, q_len, nd) * q_valid.unsqueeze(2)).sum(1)  # (nq, nd)
        result = result / qn[q_idx].unsqueeze(1).to(sims.dtype)
        if symmetric:
            best_q = sims[rows].view(nq, q_len, nd, d_len).amax(1)  # (nq, nd, Td) best query frame
            d_valid = make_frame_mask(dn, d_len).to(sims.dtype)  # (nd, Td)
            yield q_idx, torch.stack([result, (best_q * d_valid).sum(2) / dn.to(sims.dtype)])
        else:
            yield q_idx, result.unsqueeze(0)


def _chamfer_block(q_block, qn, d_block, dn, chunk_size, symmetric):
    """Chamfer (or symmetric chamfer) similarities (nq, nd) between a block of
    queries (nq, Tq, C) and of database videos (nd, Td, C), both padded by
    replication. Queries are cut into pieces (whole videos, or frame ranges
    of one long video) of at most chunk_size similarities."""
    nq, q_len, C = q_block.shape
    nd, d_len, _ = d_block.shape
    columns = nd * d_len
    d_matrix = d_block.reshape(columns, C).t()  # (C, nd * Td)
    q_valid = make_frame_mask(qn, q_len).to(q_block.dtype)  # (nq, Tq)
    q_to_d = q_block.new_zeros(nq, nd)  # sum over valid query frames of the best database frame
    d_to_q = q_block.new_full((nq, nd, d_len), -math.inf) if symmetric else None  # best query frame
    videos_per_piece = max(1, chunk_size // (q_len * columns))
    frames_per_piece = q_len if q_len * columns <= chunk_size else max(1, chunk_size // columns)
    for i in range(0, nq, videos_per_piece):
        j = min(i + videos_per_piece, nq)
        for t in range(0, q_len, frames_per_piece):
            u = min(t + frames_per_piece, q_len)
            piece = q_block[i:j, t:u].reshape(-1, C)  # ((j-i) * (u-t), C)
            sims = torch.mm(piece, d_matrix).view(j - i, u - t, nd, d_len)
            q_to_d[i:j] += torch.einsum('qtd,qt->qd', sims.amax(3), q_valid[i:j, t:u])
            if symmetric:
                d_to_q[i:j] = torch.maximum(d_to_q[i:j], sims.amax(1))
    result = q_to_d / qn.unsqueeze(1).to(q_to_d.dtype)
    if not symmetric:
        return result.unsqueeze(0)
    d_valid = make_frame_mask(dn, d_len).to(d_to_q.dtype)  # (nd, Td)
    return torch.stack([result, (d_to_q * d_valid).sum(2) / dn.to(d_to_q.dtype)])  # (2, nq, nd)
