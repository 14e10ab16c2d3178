"""Models of TCA (Temporal Context Aggregation for Video Retrieval, Shao et al.,
WACV 2021) and the similarity functions used to compare their embeddings.

- TCA: a Transformer encoder over the frame features of a video. `forward`
  gives the video-level embedding (TCA_c), `encode` the frame-level ones
  (TCA_f, compared with chamfer similarity).
- NetVLAD, NeXtVLAD, LSTMModule, GRUModule: the other aggregators of the
  paper's comparison, with the upstream constructor arguments.
- MoCo: query/key encoders and a queue of negatives (He et al., CVPR 2020).
- AGGREGATORS and build_model: the one factory that training and evaluation
  build their aggregator with (its keyword arguments are what a checkpoint
  stores as "model_args"); ARCHITECTURE_FLAGS: the command-line flag of each.

The similarities that compare the outputs are in similarity.py.

Parameter names are those of the upstream code
(github.com/xwen99/temporal_context_aggregation), so its state dicts load with
`strict=True` and give the same outputs in eval mode.

Conventions: a batch of videos is `x` (N, C, T) -- channels before time, as
upstream -- plus `num_frames` (N,) or (N, 1), the number of valid frames of
each video (None: all T frames are valid); frames at t >= num_frames are
padding and never influence the output. A `num_frames` larger than T counts
as T (upstream's data loader passes the uncropped length). `forward` also
accepts a list of (T_i, C) videos instead.
"""
import copy
import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import l2_normalize, make_frame_mask, pad_sequences


# --------------------------------------------------------------------------
# helpers shared by the aggregators

def _frame_mask(x, num_frames):
    """Bool (N, T) mask of the valid frames of x (N, C, T), on x's device;
    num_frames None: every frame is valid."""
    if num_frames is None:
        return torch.ones(x.shape[0], x.shape[-1], dtype=torch.bool, device=x.device)
    num_frames = torch.as_tensor(num_frames, device=x.device)
    if num_frames.numel() != x.shape[0]:
        raise ValueError(f"num_frames has {num_frames.numel()} entries for a batch of {x.shape[0]} videos")
    return make_frame_mask(num_frames, x.shape[-1])


def _check_channels(x, feature_size):
    if x.dim() != 3 or x.shape[1] != feature_size:
        raise ValueError(f"expected input (N, C={feature_size}, T), got {tuple(x.shape)}")


def _masked_batch_norm(bn, x, frame_mask):
    """BatchNorm1d over the valid frames of x (N, C, T) only: padding neither
    enters the batch statistics in training nor gets a value (it stays zero).
    In eval mode this equals bn(x) on the valid frames."""
    frames = x.transpose(1, 2)[frame_mask]  # (M, C), M = number of valid frames
    out = x.new_zeros(x.shape[0], x.shape[2], x.shape[1])  # (N, T, C)
    out[frame_mask] = bn(frames)
    return out.transpose(1, 2)  # (N, C, T)


def _masked_mean(frames, frame_mask):
    """Mean of frames (N, T, C) over the valid ones; zero for an empty video."""
    frames = frames.masked_fill(~frame_mask.unsqueeze(-1), 0)
    count = frame_mask.sum(1, keepdim=True).clamp(min=1).to(frames.dtype)  # (N, 1)
    return frames.sum(1) / count  # (N, C)


def _pad_videos(module, videos):
    """A list of (T_i, C) videos as a padded (N, C, T) batch and num_frames (N,)
    on the module's device and dtype."""
    param = next(module.parameters())
    padded, num_frames = pad_sequences(videos, dtype=param.dtype, device=param.device)
    return padded.transpose(1, 2), num_frames


def _concat_videos(module, videos):
    """A list of (T_i, C) videos as their frames (M, C) one after another, on
    the module's device and dtype, and their lengths (N,)."""
    param = next(module.parameters())
    tensors = [torch.as_tensor(v) for v in videos]
    for t in tensors:
        if t.dim() != 2 or t.shape[1] != module.feature_size:
            raise ValueError(f"expected videos (T, C={module.feature_size}), got {tuple(t.shape)}")
    count = torch.tensor([len(t) for t in tensors], dtype=torch.long, device=param.device)
    if not tensors:
        return param.new_zeros(0, module.feature_size), count
    return torch.cat(tensors).to(device=param.device, dtype=param.dtype), count


# --------------------------------------------------------------------------
# TCA

class TCA(nn.Module):
    """Temporal Context Aggregation: self-attention over the frames of a video.

    A post-LayerNorm `nn.TransformerEncoder` with ReLU and no positional
    encoding (as upstream), with padded frames masked out of the attention.

    pooling='mean' (upstream, TCA_c): masked mean of the frame outputs.
    pooling='netvlad': a NetVLAD(num_clusters, output_dim) head on the frame
        outputs (the NetVLAD+Transformer configuration), its dropout rate
        `dropout`; the video embedding then has output_dim dimensions. Not in
        the upstream code.
    """
    encodes_frames = True  # encode gives one embedding per frame (TCA_f)

    def __init__(self, feature_size=1024, nhead=8, nlayers=1, dim_feedforward=2048, dropout=0.1,
                 pooling='mean', num_clusters=256, output_dim=1024):
        super().__init__()
        if pooling not in ('mean', 'netvlad'):
            raise ValueError(f"pooling must be 'mean' or 'netvlad', got {pooling!r}")
        self.feature_size = feature_size
        self.pooling = pooling
        # the module holds the parameters (upstream names); frame_features runs it
        layer = nn.TransformerEncoderLayer(d_model=feature_size, nhead=nhead, dim_feedforward=dim_feedforward,
                                           dropout=dropout, activation='relu', batch_first=True, norm_first=False)
        self.transformer_encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        if pooling == 'netvlad':
            self.netvlad = NetVLAD(feature_size, num_clusters=num_clusters, output_dim=output_dim, drop_rate=dropout)
        self.output_dim = output_dim if pooling == 'netvlad' else feature_size

    def frame_features(self, x, num_frames):
        """Transformer outputs (N, T, C) of x (N, C, T), zero on padded frames,
        and the (N, T) mask of valid frames."""
        tokens, frame_mask = self._valid_tokens(x, num_frames)
        tokens = self._transform(tokens, frame_mask.sum(1))
        out = tokens.new_zeros(x.shape[0], x.shape[2], x.shape[1])  # (N, T, C)
        out[frame_mask] = tokens
        return out, frame_mask

    def _valid_tokens(self, x, num_frames):
        """The valid frames (M, C) of x (N, C, T), in (video, time) order, and
        the (N, T) mask of valid frames."""
        _check_channels(x, self.feature_size)
        frame_mask = _frame_mask(x, num_frames)  # (N, T)
        return x.transpose(1, 2)[frame_mask], frame_mask

    def _transform(self, tokens, num_frames):
        """Transformer outputs (M, C) of the valid frames `tokens` (M, C), in
        (video, time) order, of videos of num_frames (N,) frames.

        The layers' computation is spelled out here instead of calling
        self.transformer_encoder: the token-wise parts (projections,
        feed-forward, LayerNorm) then run on the valid frames only, and the
        output never depends on PyTorch's inference fast path, which is
        slower on CPU and returns zeros at padded frames where the regular
        path returns garbage. Same parameters, same result."""
        num_frames = num_frames.tolist()
        for layer in self.transformer_encoder.layers:
            attended = _self_attention(layer.self_attn, tokens, num_frames, self.training)
            tokens = layer.norm1(tokens + layer.dropout1(attended))
            hidden = layer.dropout(layer.activation(layer.linear1(tokens)))
            tokens = layer.norm2(tokens + layer.dropout2(layer.linear2(hidden)))
        return tokens

    def forward(self, x, num_frames=None):
        """Video embeddings (N, output_dim), L2-normalised, of x (N, C, T) or
        of a list of N (T_i, C) videos."""
        if self.pooling == 'netvlad':
            if isinstance(x, (list, tuple)):
                x, num_frames = _pad_videos(self, x)
            frames, frame_mask = self.frame_features(x, num_frames)
            return self.netvlad(frames.transpose(1, 2), frame_mask.sum(1))
        if isinstance(x, (list, tuple)):
            # the frames of a list go straight into the (M, C) tokens: no
            # padded copy to build and gather from
            tokens, count = _concat_videos(self, x)
        else:
            tokens, frame_mask = self._valid_tokens(x, num_frames)
            count = frame_mask.sum(1)
        tokens = self._transform(tokens, count)
        # mean of the valid frames' outputs straight from the (M, C) tokens (a
        # segment sum), without building the padded (N, T, C) output
        owner = torch.repeat_interleave(torch.arange(len(count), device=count.device), count)  # (M,)
        summed = tokens.new_zeros(len(count), tokens.shape[1]).index_add_(0, owner, tokens)  # (N, C)
        return l2_normalize(summed / count.clamp(min=1).unsqueeze(1).to(summed.dtype))  # (N, C)

    def encode(self, x, num_frames=None):
        """Frame embeddings (N, T, C) of x (N, C, T), L2-normalised per frame,
        padded frames zero. With pooling='netvlad' too these are the
        Transformer's frame outputs."""
        frames, _ = self.frame_features(x, num_frames)
        return l2_normalize(frames)  # zero frames stay zero

    def forward_and_encode(self, x, num_frames=None):
        """(forward, encode) of x (N, C, T) from one pass of the Transformer:
        (N, output_dim) and (N, T, C), what TCA_c and TCA_f need together."""
        frames, frame_mask = self.frame_features(x, num_frames)
        if self.pooling == 'netvlad':
            video = self.netvlad(frames.transpose(1, 2), frame_mask.sum(1))
        else:
            video = l2_normalize(_masked_mean(frames, frame_mask))
        return video, l2_normalize(frames)


def _self_attention(attn, tokens, num_frames, training):
    """nn.MultiheadAttention `attn` (its in_proj/out_proj weights and dropout)
    applied to the valid frames tokens (M, C) of videos of num_frames (a list
    of N lengths), each frame attending to the frames of its own video.
    Returns (M, C)."""
    C = tokens.shape[1]
    heads = attn.num_heads
    dropout = attn.dropout if training else 0.0
    qkv = F.linear(tokens, attn.in_proj_weight, attn.in_proj_bias)  # (M, 3C)
    # Consecutive videos of equal length are contiguous in qkv: each run of
    # them is one batched call on a view, with no padding. A padded (N, T, 3C)
    # copy would cost more memory traffic than the attention saves here.
    outs, start = [], 0
    for length, run in itertools.groupby(num_frames):
        size = length * len(list(run))
        if length > 0:
            q, k, v = qkv[start:start + size].view(-1, length, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (n, heads, length, C / heads)
            outs.append(out.transpose(1, 2).reshape(size, C))
        start += size
    out = outs[0] if len(outs) == 1 else torch.cat(outs) if outs else qkv.new_zeros(0, C)
    return attn.out_proj(out)


# --------------------------------------------------------------------------
# NetVLAD and NeXtVLAD

class _VLAD(nn.Module):
    """What NetVLAD and NeXtVLAD share: given their `residuals(x, num_frames)`
    (N, num_clusters, D), forward is the gated head's (N, output_dim)
    L2-normalised video embedding and encode the residuals themselves
    (upstream's frame-level output of these models)."""
    encodes_frames = False  # encode gives one descriptor per cluster, not per frame

    def _add_gated_head(self, vlad_size, output_dim, drop_rate, gating_reduction):
        """The head modules, under upstream's names: BN, dropout, fc1 + BN,
        context gating (fc2, BN, fc3)."""
        self.bn2 = nn.BatchNorm1d(vlad_size)
        self.drop = nn.Dropout(drop_rate)
        self.fc1 = nn.Linear(vlad_size, output_dim)
        self.bn3 = nn.BatchNorm1d(output_dim)
        self.fc2 = nn.Linear(output_dim, output_dim // gating_reduction)
        self.bn4 = nn.BatchNorm1d(output_dim // gating_reduction)
        self.fc3 = nn.Linear(output_dim // gating_reduction, output_dim)

    def _gated_embedding(self, vlad):
        """The head on vlad (N, K * D): BN, dropout, fc + BN, context gating, L2 norm."""
        activation = self.bn3(self.fc1(self.drop(self.bn2(vlad))))  # (N, output_dim)
        gates = torch.sigmoid(self.fc3(F.relu(self.bn4(self.fc2(activation)))))  # (N, output_dim)
        return l2_normalize(activation * gates)

    def forward(self, x, num_frames=None):
        if isinstance(x, (list, tuple)):
            x, num_frames = _pad_videos(self, x)
        return self._gated_embedding(self.residuals(x, num_frames).flatten(1))

    def encode(self, x, num_frames=None):
        return self.residuals(x, num_frames)

    def forward_and_encode(self, x, num_frames=None):
        """(forward, encode) of x (N, C, T) from one computation of the residuals."""
        vlad = self.residuals(x, num_frames)
        return self._gated_embedding(vlad.flatten(1)), vlad


class NetVLAD(_VLAD):
    """NetVLAD pooling (Arandjelovic et al., CVPR 2016) with context gating
    (Miech et al., 2017), as in upstream.

    forward: (N, output_dim) L2-normalised video embedding.
    encode: (N, num_clusters, feature_size) intra-normalised VLAD residuals.
    """

    def __init__(self, feature_size, num_clusters=256, output_dim=1024, normalize_input=True, alpha=1.0,
                 drop_rate=0.5, gating_reduction=8):
        super().__init__()
        self.feature_size = feature_size
        self.num_clusters = num_clusters
        self.normalize_input = normalize_input
        self.alpha = alpha
        self.output_dim = output_dim

        self.bn1 = nn.BatchNorm1d(feature_size)
        self.conv = nn.Conv1d(feature_size, num_clusters, kernel_size=1, bias=True)  # soft-assignment
        self.centroids = nn.Parameter(torch.rand(num_clusters, feature_size))
        self._add_gated_head(feature_size * num_clusters, output_dim, drop_rate, gating_reduction)
        # initialise the assignment from the centroids, as upstream does
        # (its bias uses the centroid norm, not the squared norm of the paper)
        with torch.no_grad():
            self.conv.weight.copy_(2.0 * alpha * self.centroids.unsqueeze(-1))
            self.conv.bias.copy_(-alpha * self.centroids.norm(dim=1))

    def residuals(self, x, num_frames):
        """Intra-normalised VLAD (N, num_clusters, feature_size) of x (N, C, T)."""
        _check_channels(x, self.feature_size)
        frame_mask = _frame_mask(x, num_frames)  # (N, T)
        x = _masked_batch_norm(self.bn1, x, frame_mask)
        if self.normalize_input:
            x = l2_normalize(x, dim=1)
        soft_assign = F.softmax(self.conv(x), dim=1)  # (N, K, T)
        soft_assign = soft_assign * frame_mask.unsqueeze(1).to(x.dtype)
        vlad = torch.bmm(soft_assign, x.transpose(1, 2))  # (N, K, C)
        vlad = vlad - self.centroids * soft_assign.sum(-1, keepdim=True)
        return l2_normalize(vlad, dim=2)


class NeXtVLAD(_VLAD):
    """NeXtVLAD pooling (Lin et al., 2018) with context gating, as in upstream.

    The grouping follows upstream's reshapes exactly (channel f * groups + g of
    the expanded features belongs to group g), so its checkpoints give the
    same outputs. forward/encode as NetVLAD.
    """
    def __init__(self, feature_size, num_clusters=64, output_dim=1024, normalize_input=True, expansion=2,
                 groups=8, drop_rate=0.5, gating_reduction=8):
        super().__init__()
        self.feature_size = feature_size
        self.num_clusters = num_clusters
        self.normalize_input = normalize_input
        self.expansion = expansion
        self.groups = groups
        self.output_dim = output_dim
        group_size = feature_size * expansion // groups

        self.conv1 = nn.Conv1d(feature_size, feature_size * expansion, kernel_size=1, bias=True)
        self.conv2 = nn.Conv1d(feature_size * expansion, groups, kernel_size=1, bias=True)  # group attention
        self.conv3 = nn.Conv1d(feature_size * expansion, num_clusters * groups, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm1d(num_clusters * groups)
        self.centroids = nn.Parameter(torch.rand(num_clusters, group_size))
        self._add_gated_head(group_size * num_clusters, output_dim, drop_rate, gating_reduction)

    def residuals(self, x, num_frames):
        """Intra-normalised VLAD (N, num_clusters, feature_size * expansion // groups)."""
        _check_channels(x, self.feature_size)
        N = x.shape[0]
        frame_mask = _frame_mask(x, num_frames)  # (N, T)
        if self.normalize_input:
            x = l2_normalize(x, dim=1)
        x = self.conv1(x)  # (N, C * E, T)
        attention = torch.sigmoid(self.conv2(x)) * frame_mask.unsqueeze(1).to(x.dtype)  # (N, G, T)
        attention = attention.reshape(N, 1, -1)  # (N, 1, G * T)
        activation = _masked_batch_norm(self.bn1, self.conv3(x), frame_mask)  # (N, K * G, T)
        activation = F.softmax(activation.reshape(N, self.num_clusters, -1), dim=1)  # (N, K, G * T)
        activation = activation * attention
        group_features = x.reshape(N, self.feature_size * self.expansion // self.groups, -1)  # (N, C*E/G, G * T)
        vlad = torch.bmm(activation, group_features.transpose(1, 2))  # (N, K, C*E/G)
        vlad = vlad - self.centroids * activation.sum(-1, keepdim=True)
        return l2_normalize(vlad, dim=2)


# --------------------------------------------------------------------------
# recurrent baselines

class _RecurrentModule(nn.Module):
    """BatchNorm over the input frames, then a recurrent network; forward is
    the masked mean of its outputs, encode the outputs themselves."""
    encodes_frames = True

    def __init__(self, rnn_class, rnn_name, feature_size, output_dim, nhid, nlayers, dropout):
        super().__init__()
        if output_dim != nhid:
            # upstream ignores output_dim: the embedding has nhid dimensions
            raise ValueError(f"output_dim ({output_dim}) must equal nhid ({nhid}): the embedding is the hidden state")
        self.feature_size = feature_size
        self.nhid = nhid
        self.nlayers = nlayers
        self.output_dim = output_dim
        self.dropout = dropout
        self._rnn_name = rnn_name
        setattr(self, rnn_name, rnn_class(input_size=feature_size, hidden_size=nhid, num_layers=nlayers,
                                          dropout=dropout, batch_first=True))
        self.bn1 = nn.BatchNorm1d(feature_size)

    def frame_features(self, x, num_frames):
        """Recurrent outputs (N, T, nhid), zero on padded frames, and the mask."""
        _check_channels(x, self.feature_size)
        frame_mask = _frame_mask(x, num_frames)
        x = _masked_batch_norm(self.bn1, x, frame_mask)
        # padding comes after the valid frames, so a forward recurrence leaves
        # the valid outputs untouched
        out, _ = getattr(self, self._rnn_name)(x.transpose(1, 2))  # (N, T, nhid)
        return out.masked_fill(~frame_mask.unsqueeze(-1), 0), frame_mask

    def forward(self, x, num_frames=None):
        if isinstance(x, (list, tuple)):
            x, num_frames = _pad_videos(self, x)
        return l2_normalize(_masked_mean(*self.frame_features(x, num_frames)))  # (N, nhid)

    def encode(self, x, num_frames=None):
        return l2_normalize(self.frame_features(x, num_frames)[0])  # (N, T, nhid)

    def forward_and_encode(self, x, num_frames=None):
        """(forward, encode) of x (N, C, T) from one pass of the recurrence."""
        frames, frame_mask = self.frame_features(x, num_frames)
        return l2_normalize(_masked_mean(frames, frame_mask)), l2_normalize(frames)


class LSTMModule(_RecurrentModule):
    def __init__(self, feature_size=1024, output_dim=1024, nhid=1024, nlayers=2, dropout=0.2):
        super().__init__(nn.LSTM, 'LSTM', feature_size, output_dim, nhid, nlayers, dropout)


class GRUModule(_RecurrentModule):
    def __init__(self, feature_size=1024, output_dim=1024, nhid=1024, nlayers=2, dropout=0.2):
        super().__init__(nn.GRU, 'GRU', feature_size, output_dim, nhid, nlayers, dropout)


# --------------------------------------------------------------------------
# MoCo

class MoCo(nn.Module):
    """Momentum Contrast (He et al., "Momentum Contrast for Unsupervised Visual
    Representation Learning", CVPR 2020, arxiv.org/abs/1911.05722) as TCA uses
    it: the anchor goes through the query encoder, its positive and the
    negatives through the momentum (key) encoder; logits are the anchor
    against its positive and against the queue, and the negatives' keys,
    gathered from all workers, are then enqueued.

    dim: embedding size of base_encoder; K: queue length; m: momentum of the
    key encoder (m=0 copies the query encoder); T: softmax temperature;
    gather: a function concatenating a tensor from every worker along dim 0
    (utils.all_gatherer), None for a single process.
    """

    def __init__(self, base_encoder, dim=1024, K=65536, m=0.999, T=0.07, gather=None):
        super().__init__()
        self.gather = gather
        self.K = K
        self.m = m
        self.T = T
        self.encoder_q = base_encoder
        self.encoder_k = copy.deepcopy(base_encoder)
        for param_k in self.encoder_k.parameters():
            param_k.requires_grad = False  # updated by momentum only
        self.register_buffer("queue", l2_normalize(torch.randn(dim, K), dim=0))  # (dim, K)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.mul_(self.m).add_(param_q.detach(), alpha=1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        """Write keys (B, dim) from every worker into the queue at queue_ptr,
        wrapping around its end (upstream asserts K % B == 0 instead, which
        fails with its own README's settings). With B > K only the last K
        keys are kept."""
        if self.gather is not None:
            keys = self.gather(keys)
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        positions = (ptr + torch.arange(batch_size, device=self.queue.device)) % self.K
        if batch_size > self.K:
            keys, positions = keys[-self.K:], positions[-self.K:]
        self.queue[:, positions] = keys.t().to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    def forward(self, a, p, n, len_a, len_p, len_n):
        """a, p: anchors and positives (N, C, T); n: negatives (N, C, T) or
        (N, neg_num, C, T); len_*: their num_frames ((N,) or (N, neg_num)).
        Returns logits (N, 1 + K) -- column 0 the positive -- and labels (N,)
        of zeros."""
        if n.dim() == 4:
            n = n.reshape(-1, n.shape[2], n.shape[3])  # (N * neg_num, C, T)
            len_n = len_n.reshape(-1)
        q = l2_normalize(self.encoder_q(a, len_a), dim=1)  # (N, dim)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            p = l2_normalize(self.encoder_k(p, len_p), dim=1)  # (N, dim)
            k = l2_normalize(self.encoder_k(n, len_n), dim=1)  # (N * neg_num, dim)
        l_pos = (q * p).sum(1, keepdim=True)  # (N, 1)
        l_neg = q @ self.queue.clone().detach()  # (N, K)
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k)
        return logits, labels


# --------------------------------------------------------------------------
# the factory training and evaluation share

AGGREGATORS = ("tca", "tca_netvlad", "netvlad", "nextvlad", "lstm", "gru")

# The command-line flag (train.py's, and evaluation.py's for a bare state
# dict) of each build_model argument that fixes the architecture; dropout is
# a training setting, not part of it.
ARCHITECTURE_FLAGS = {"aggregator": "aggregator", "pca_components": "feature_size", "num_layers": "num_layers",
                      "num_clusters": "num_clusters", "output_dim": "output_dim",
                      "normalize_input": "normalize_input"}


def build_model(aggregator="tca", feature_size=1024, num_layers=1, num_clusters=256, output_dim=1024,
                normalize_input=False, dropout=0.0):
    """The aggregator `aggregator` with upstream's constructor arguments.
    These keyword arguments are a checkpoint's "model_args" (train.py), so a
    checkpoint rebuilds its model with build_model(**model_args).

    num_layers: Transformer (tca*) or recurrent (lstm, gru) layers;
    num_clusters, normalize_input: the VLADs'; output_dim: the VLADs'
    embedding size and the recurrent hidden size (TCA's embedding has
    feature_size dimensions); dropout: TCA's and between recurrent layers
    (the VLADs keep upstream's own rate, as upstream builds them)."""
    if aggregator == "tca":
        return TCA(feature_size=feature_size, nlayers=num_layers, dropout=dropout)
    if aggregator == "tca_netvlad":
        return TCA(feature_size=feature_size, nlayers=num_layers, dropout=dropout,
                   pooling="netvlad", num_clusters=num_clusters, output_dim=output_dim)
    if aggregator == "netvlad":
        return NetVLAD(feature_size=feature_size, num_clusters=num_clusters, output_dim=output_dim,
                       normalize_input=normalize_input)
    if aggregator == "nextvlad":
        return NeXtVLAD(feature_size=feature_size, num_clusters=num_clusters, output_dim=output_dim,
                        normalize_input=normalize_input)
    if aggregator in ("lstm", "gru"):
        recurrent = LSTMModule if aggregator == "lstm" else GRUModule
        # dropout acts between recurrent layers only (PyTorch warns when there is one)
        return recurrent(feature_size=feature_size, output_dim=output_dim, nhid=output_dim, nlayers=num_layers,
                         dropout=dropout if num_layers > 1 else 0.0)
    raise ValueError(f"unknown aggregator {aggregator!r} (choose from {', '.join(AGGREGATORS)})")
