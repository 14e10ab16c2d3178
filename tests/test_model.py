"""Tests of model.py: shapes, masking and padding invariance, upstream
checkpoint compatibility, MoCo's queue, the aggregator factory. Small sizes: the whole file runs in
seconds on a CPU."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import AGGREGATORS, TCA, GRUModule, LSTMModule, MoCo, NetVLAD, NeXtVLAD, build_model
from similarity import chamfer_similarity
from utils import make_frame_mask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C = 32  # feature size of the small test models


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def build(name, **kwargs):
    """Every aggregator at test size."""
    if name == "tca":
        return TCA(feature_size=C, nhead=4, nlayers=2, dim_feedforward=64, **kwargs)
    if name == "tca_netvlad":
        return TCA(feature_size=C, nhead=4, dim_feedforward=64, pooling="netvlad", num_clusters=4, output_dim=16,
                   **kwargs)
    if name == "netvlad":
        return NetVLAD(C, num_clusters=4, output_dim=16, **kwargs)
    if name == "nextvlad":
        return NeXtVLAD(C, num_clusters=4, output_dim=16, groups=4, **kwargs)
    if name == "lstm":
        return LSTMModule(feature_size=C, output_dim=24, nhid=24, **kwargs)
    return GRUModule(feature_size=C, output_dim=24, nhid=24, **kwargs)


NO_DROPOUT = {"tca": {"dropout": 0.0}, "tca_netvlad": {"dropout": 0.0}, "netvlad": {"drop_rate": 0.0},
              "nextvlad": {"drop_rate": 0.0}, "lstm": {"dropout": 0.0}, "gru": {"dropout": 0.0}}


def padded(videos, T):
    """List of (T_i, C) videos -> (N, C, T) zero-padded batch and num_frames."""
    x = torch.zeros(len(videos), C, T)
    for i, v in enumerate(videos):
        x[i, :, :len(v)] = v.t()
    return x, torch.tensor([len(v) for v in videos])


# --------------------------------------------------------------------------
# aggregators: shapes, norms, padding

@pytest.mark.parametrize("name", AGGREGATORS)
def test_output_shapes_and_unit_norms(name):
    model = build(name).eval()
    x, num_frames = padded([torch.randn(t, C) for t in (7, 12, 3)], 12)
    with torch.no_grad():
        video = model(x, num_frames)
        frames = model.encode(x, num_frames)
    assert video.shape == (3, model.output_dim)
    assert torch.allclose(video.norm(dim=1), torch.ones(3), atol=1e-5)
    if name in ("netvlad", "nextvlad"):  # cluster-level descriptors, intra-normalised
        assert frames.shape[:2] == (3, 4)
        assert torch.allclose(frames.norm(dim=2), torch.ones(3, 4), atol=1e-5)
    else:
        width = C if name.startswith("tca") else 24
        assert frames.shape == (3, 12, width)
        mask = make_frame_mask(num_frames, 12)
        assert torch.allclose(frames.norm(dim=2)[mask], torch.ones(int(mask.sum())), atol=1e-5)
        assert frames[~mask].abs().max() == 0  # padded frames are zero


@pytest.mark.parametrize("name", AGGREGATORS)
@pytest.mark.parametrize("training", [False, True])
def test_padding_invariance(name, training):
    """The same videos padded to 50 or to 300 frames give the same embeddings,
    in eval mode and (batch statistics over valid frames only) in training."""
    model = build(name, **NO_DROPOUT[name]).train(training)
    videos = [torch.randn(40, C), torch.randn(17, C), torch.randn(50, C)]
    x50, n = padded(videos, 50)
    x300, _ = padded(videos, 300)
    assert torch.allclose(model(x50, n), model(x300, n), atol=1e-5)
    e50, e300 = model.encode(x50, n), model.encode(x300, n)
    if name in ("netvlad", "nextvlad"):
        assert torch.allclose(e50, e300, atol=1e-5)
    else:
        assert torch.allclose(e50, e300[:, :50], atol=1e-5)
        assert e300[:, 50:].abs().max() == 0


def test_padding_values_are_ignored():
    """Whatever sits in the padded frames (not only zeros) changes nothing."""
    model = build("tca").eval()
    x, n = padded([torch.randn(9, C), torch.randn(4, C)], 20)
    noisy = x.clone()
    noisy[0, :, 9:] = 100 * torch.randn(C, 11)
    noisy[1, :, 4:] = float("nan")
    assert torch.allclose(model(x, n), model(noisy, n), atol=1e-6)
    assert torch.allclose(model.encode(x, n), model.encode(noisy, n), atol=1e-6)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_batched_encode_equals_per_video_encode(name):
    model = build(name).eval()
    videos = [torch.randn(t, C) for t in (30, 5, 18, 1)]
    x, n = padded(videos, 32)
    batched = model.encode(x, n)
    embeddings = model(x, n)
    assert torch.allclose(model(videos), embeddings, atol=1e-6)
    for i, v in enumerate(videos):
        alone = model.encode(v.t().unsqueeze(0), torch.tensor([len(v)]))[0]
        if name in ("netvlad", "nextvlad"):
            assert torch.allclose(batched[i], alone, atol=1e-5)
        else:
            assert torch.allclose(batched[i, :len(v)], alone, atol=1e-5)
        assert torch.allclose(embeddings[i], model(v.t().unsqueeze(0), [len(v)])[0], atol=1e-5)


def test_empty_video_and_overlong_num_frames():
    """A video without frames embeds to zeros (no NaN); num_frames beyond T
    (upstream passes the uncropped length) counts as T; (N, 1) float lengths
    as upstream's data loader makes them are accepted."""
    model = build("tca").eval()
    x = torch.randn(1, C, 10).repeat(3, 1, 1)
    out = model(x, torch.tensor([[0.0], [10.0], [25.0]]))
    assert torch.isfinite(out).all()
    assert out[0].abs().max() == 0
    assert torch.allclose(out[1], out[2])
    assert model.encode(x, torch.tensor([0, 10, 10]))[0].abs().max() == 0


def test_tca_runs_of_equal_lengths_and_empty_videos():
    """Attention runs once per run of consecutive equal-length videos: runs,
    lone videos and empty videos in any order give each video's own output
    and gradients, from a padded batch and from a list alike."""
    model = build("tca", dropout=0.0).train()
    lengths = (4, 4, 4, 0, 7, 2, 2, 0, 0, 9, 4)
    videos = [torch.randn(t, C) for t in lengths]
    x, n = padded(videos, 9)
    x.requires_grad_(True)
    batched = model(x, n)
    batched.square().sum().backward()
    from_list = model([v.requires_grad_(True) for v in videos])
    from_list.square().sum().backward()
    for i, v in enumerate(videos):
        assert torch.allclose(from_list[i], batched[i], atol=1e-6)
        if len(v) == 0:
            assert batched[i].abs().max() == 0
            continue
        alone = v.detach().t().unsqueeze(0).requires_grad_(True)
        out = model(alone, [len(v)])
        out.square().sum().backward()
        assert torch.allclose(batched[i], out[0], atol=1e-5)
        assert torch.allclose(x.grad[i, :, :len(v)], alone.grad[0], atol=1e-5)
        assert torch.allclose(v.grad, alone.grad[0].t(), atol=1e-5)
    assert x.grad[:, :, 9:].abs().sum() == 0


def test_tca_training_has_gradients_and_dropout():
    model = build("tca", dropout=0.5).train()
    x, n = padded([torch.randn(8, C), torch.randn(5, C)], 8)
    out = model(x, n)
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert not torch.allclose(model(x, n), model(x, n))  # dropout is active in training


def test_follows_input_dtype():
    model = build("tca").double().eval()
    x, n = padded([torch.randn(6, C)], 8)
    assert model(x.double(), n).dtype == torch.float64
    assert model.encode(x.double(), n).dtype == torch.float64
    assert model([torch.randn(5, C, dtype=torch.float64)]).dtype == torch.float64
    q = torch.randn(2, 4, C, dtype=torch.float64)
    assert chamfer_similarity(q, None, q, None).dtype == torch.float64
    moco = MoCo(build("tca"), dim=C, K=8).double()
    logits, labels = moco(x.double(), x.double(), x.double(), n, n, n)
    assert logits.dtype == moco.queue.dtype == torch.float64 and labels.device == logits.device


def test_bad_arguments():
    with pytest.raises(ValueError, match="pooling"):
        TCA(feature_size=C, nhead=4, pooling="max")
    with pytest.raises(ValueError, match="nhid"):
        LSTMModule(feature_size=C, output_dim=16, nhid=24)
    with pytest.raises(ValueError, match="C=32"):
        build("tca")(torch.randn(2, 16, 5), torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="num_frames"):
        build("tca")(torch.randn(2, C, 5), torch.tensor([5, 5, 5]))
    with pytest.raises(ValueError, match="unknown aggregator 'transformer'"):
        build_model("transformer")


# --------------------------------------------------------------------------
# upstream checkpoints: key names, strict loading, same outputs

def transformer_keys(nlayers):
    names = ["self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
             "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
             "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"]
    return {f"transformer_encoder.layers.{i}.{n}" for i in range(nlayers) for n in names}


def bn_keys(name):
    return {f"{name}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def linear_keys(*names):
    return {f"{n}.{k}" for n in names for k in ("weight", "bias")}


# the keys of upstream's state dicts, written out from its model.py
UPSTREAM_KEYS = {
    "tca": transformer_keys(2),
    "netvlad": bn_keys("bn1") | linear_keys("conv", "fc1", "fc2", "fc3") | {"centroids"}
    | bn_keys("bn2") | bn_keys("bn3") | bn_keys("bn4"),
    "nextvlad": linear_keys("conv1", "conv2", "fc1", "fc2", "fc3") | {"conv3.weight", "centroids"}
    | bn_keys("bn1") | bn_keys("bn2") | bn_keys("bn3") | bn_keys("bn4"),
    "lstm": {f"LSTM.{w}_{l}" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") for l in ("l0", "l1")}
    | bn_keys("bn1"),
    "gru": {f"GRU.{w}_{l}" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") for l in ("l0", "l1")}
    | bn_keys("bn1"),
}


def random_state_dict(model):
    """A state dict with the model's keys and shapes and random values,
    including non-trivial BatchNorm running statistics."""
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            state[k] = torch.rand_like(v) + 0.5
        else:
            state[k] = torch.randn_like(v) * 0.3
    return state


@pytest.mark.parametrize("name", ["tca", "netvlad", "nextvlad", "lstm", "gru"])
def test_upstream_key_names_load_strict(name):
    model = build(name)
    assert set(model.state_dict()) == UPSTREAM_KEYS[name]
    model.load_state_dict(random_state_dict(model), strict=True)


def test_moco_keys():
    moco = MoCo(build("tca"), dim=C, K=8)
    expected = {"queue", "queue_ptr"} | {f"encoder_{e}.{k}" for e in "qk" for k in UPSTREAM_KEYS["tca"]}
    assert set(moco.state_dict()) == expected


def upstream_tca(state, nlayers, x, num_frames):
    """Upstream's TCA forward and (batch-size-1) encode in eval mode: a
    sequence-first nn.TransformerEncoder run over the padded batch."""
    layer = nn.TransformerEncoderLayer(d_model=C, nhead=4, dim_feedforward=64, dropout=0.1)
    encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False).eval()
    encoder.load_state_dict({k[len("transformer_encoder."):]: v for k, v in state.items()})
    mask = (num_frames.unsqueeze(1) > torch.arange(x.shape[2])).float()  # (N, T)
    out = encoder(x.permute(2, 0, 1), src_key_padding_mask=(1 - mask).bool()).permute(1, 0, 2)
    out = out * mask.unsqueeze(-1)
    video = F.normalize(out.sum(1) / mask.sum(1, keepdim=True), dim=1)
    return video, F.normalize(out, dim=2)


def upstream_netvlad_residuals(state, x, num_frames):
    """Upstream's NetVLAD.encode in eval mode (BatchNorm over every frame,
    padding included)."""
    bn = nn.BatchNorm1d(C).eval()
    bn.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("bn1.")})
    mask = (num_frames.unsqueeze(1) > torch.arange(x.shape[2])).float()
    x = F.normalize(bn(x), dim=1)
    assign = F.softmax(F.conv1d(x, state["conv.weight"], state["conv.bias"]), dim=1) * mask.unsqueeze(1)
    vlad = torch.bmm(assign, x.transpose(1, 2)) - state["centroids"] * assign.sum(-1, keepdim=True)
    return F.normalize(vlad, dim=2)


def upstream_nextvlad_residuals(state, x, num_frames):
    """Upstream's NeXtVLAD.encode in eval mode, with its reshapes."""
    N, _, T = x.shape
    bn = nn.BatchNorm1d(4 * 4).eval()
    bn.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("bn1.")})
    mask = (num_frames.unsqueeze(1) > torch.arange(T)).float()
    x = F.conv1d(F.normalize(x, dim=1), state["conv1.weight"], state["conv1.bias"])
    attention = (torch.sigmoid(F.conv1d(x, state["conv2.weight"], state["conv2.bias"])) * mask.unsqueeze(1))
    activation = bn(F.conv1d(x, state["conv3.weight"])).view(N, 4, -1)
    activation = F.softmax(activation, dim=1) * attention.view(N, 1, -1)
    group_size = C * 2 // 4
    vlad = torch.bmm(activation, x.view(N, group_size, -1).transpose(1, 2))
    vlad = vlad - state["centroids"] * activation.sum(-1, keepdim=True)
    return F.normalize(vlad, dim=2)


def upstream_gated_embedding(state, vlad):
    """The VLADs' eval-mode head in upstream: bn2, fc1 + bn3, context gating."""
    def bn(name, v):
        return F.batch_norm(v, state[f"{name}.running_mean"], state[f"{name}.running_var"],
                            state[f"{name}.weight"], state[f"{name}.bias"])
    activation = bn("bn3", F.linear(bn("bn2", vlad.flatten(1)), state["fc1.weight"], state["fc1.bias"]))
    gates = F.relu(bn("bn4", F.linear(activation, state["fc2.weight"], state["fc2.bias"])))
    gates = torch.sigmoid(F.linear(gates, state["fc3.weight"], state["fc3.bias"]))
    return F.normalize(activation * gates, dim=1)


def test_upstream_checkpoints_give_upstream_outputs():
    """A state dict loaded with strict=True gives upstream's eval-mode outputs
    (computed here as upstream computes them)."""
    videos = [torch.randn(t, C) for t in (9, 4, 12)]
    x, n = padded(videos, 12)
    with torch.no_grad():
        tca = build("tca").eval()
        state = random_state_dict(tca)
        tca.load_state_dict(state, strict=True)
        video, frames = upstream_tca(state, 2, x, n)
        assert torch.allclose(tca(x, n), video, atol=1e-5)
        assert torch.allclose(tca.encode(x, n), frames, atol=1e-5)

        netvlad = build("netvlad").eval()
        state = random_state_dict(netvlad)
        netvlad.load_state_dict(state, strict=True)
        vlad = upstream_netvlad_residuals(state, x, n)
        assert torch.allclose(netvlad.encode(x, n), vlad, atol=1e-5)
        assert torch.allclose(netvlad(x, n), upstream_gated_embedding(state, vlad), atol=1e-5)

        nextvlad = build("nextvlad").eval()
        state = random_state_dict(nextvlad)
        nextvlad.load_state_dict(state, strict=True)
        vlad = upstream_nextvlad_residuals(state, x, n)
        assert torch.allclose(nextvlad.encode(x, n), vlad, atol=1e-5)
        assert torch.allclose(nextvlad(x, n), upstream_gated_embedding(state, vlad), atol=1e-5)

        for name, rnn_class in (("lstm", nn.LSTM), ("gru", nn.GRU)):
            model = build(name).eval()
            state = random_state_dict(model)
            model.load_state_dict(state, strict=True)
            bn = nn.BatchNorm1d(C).eval()
            bn.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("bn1.")})
            rnn = rnn_class(C, 24, num_layers=2, batch_first=True).eval()
            rnn.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if not k.startswith("bn1.")})
            out = rnn(bn(x).transpose(1, 2))[0] * make_frame_mask(n, 12).unsqueeze(-1)
            expected = F.normalize(out.sum(1) / n.unsqueeze(1), dim=1)
            assert torch.allclose(model(x, n), expected, atol=1e-5)


def test_tca_matches_nn_transformer_encoder_in_training():
    """Training mode (no dropout, gradients on) gives the same valid-frame
    outputs as nn.TransformerEncoder's regular path."""
    tca = build("tca", dropout=0.0).train()
    reference = tca.transformer_encoder
    x, n = padded([torch.randn(10, C), torch.randn(3, C)], 10)
    mask = make_frame_mask(n, 10)
    expected = reference(x.transpose(1, 2), src_key_padding_mask=~mask)
    assert torch.allclose(tca.encode(x, n)[mask], F.normalize(expected, dim=2)[mask], atol=1e-5)


# --------------------------------------------------------------------------
# MoCo

def test_moco_initial_state_and_momentum():
    moco = MoCo(build("tca"), dim=C, K=16, m=0.9)
    assert moco.queue.shape == (C, 16)
    assert torch.allclose(moco.queue.norm(dim=0), torch.ones(16), atol=1e-5)
    assert int(moco.queue_ptr) == 0
    for q, k in zip(moco.encoder_q.parameters(), moco.encoder_k.parameters()):
        assert torch.equal(q, k) and not k.requires_grad and q.requires_grad
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(1.0)
    before = [k.clone() for k in moco.encoder_k.parameters()]
    moco._momentum_update_key_encoder()
    for q, k, k0 in zip(moco.encoder_q.parameters(), moco.encoder_k.parameters(), before):
        assert torch.allclose(k, 0.9 * k0 + 0.1 * q)
    moco.m = 0.0  # m=0 copies the query encoder
    moco._momentum_update_key_encoder()
    for q, k in zip(moco.encoder_q.parameters(), moco.encoder_k.parameters()):
        assert torch.equal(q, k)


def test_moco_queue_wraps_around():
    moco = MoCo(build("tca"), dim=4, K=8)
    moco.queue_ptr[0] = 6
    keys = torch.arange(16.0).view(4, 4)  # 4 keys
    old = moco.queue.clone()
    moco._dequeue_and_enqueue(keys)
    assert torch.equal(moco.queue[:, [6, 7, 0, 1]], keys.t())
    assert torch.equal(moco.queue[:, 2:6], old[:, 2:6])
    assert int(moco.queue_ptr) == 2
    many = torch.arange(44.0).view(11, 4)  # more keys than the queue holds: the last 8 stay
    moco._dequeue_and_enqueue(many)
    assert int(moco.queue_ptr) == (2 + 11) % 8
    for i in range(3, 11):
        assert torch.equal(moco.queue[:, (2 + i) % 8], many[i])


def test_moco_enqueues_every_workers_keys():
    """With a gather function (train.py: Horovod's allgather), the queue gets
    every worker's keys in rank order, and the pointer moves by all of them."""
    others = torch.full((2, 4), 7.0)  # the other rank's keys
    moco = MoCo(build("tca"), dim=4, K=8, gather=lambda keys: torch.cat([keys, others]))
    keys = torch.arange(8.0).view(2, 4)
    moco._dequeue_and_enqueue(keys)
    assert torch.equal(moco.queue[:, :4], torch.cat([keys, others]).t())
    assert int(moco.queue_ptr) == 4


def test_moco_forward_logits_and_enqueued_keys():
    """Logits are [anchor . positive, anchor . queue] / T; the negatives'
    keys (not the positives') are enqueued afterwards, negatives given as
    (N, neg_num, C, T)."""
    moco = MoCo(build("tca", dropout=0.0), dim=C, K=8, m=0.0, T=0.5).eval()
    a, len_a = padded([torch.randn(6, C), torch.randn(4, C)], 6)
    p, len_p = padded([torch.randn(5, C), torch.randn(6, C)], 6)
    n, len_n = padded([torch.randn(t, C) for t in (6, 2, 3, 5)], 6)
    n, len_n = n.view(2, 2, C, 6), len_n.view(2, 2)
    queue = moco.queue.clone()
    logits, labels = moco(a, p, n, len_a, len_p, len_n)
    assert logits.shape == (2, 1 + 8) and labels.tolist() == [0, 0]
    with torch.no_grad():
        q, k_p = moco.encoder_q(a, len_a), moco.encoder_k(p, len_p)
        k_n = moco.encoder_k(n.view(4, C, 6), len_n.view(4))
    assert torch.allclose(logits[:, 0], (q * k_p).sum(1) / 0.5, atol=1e-5)
    assert torch.allclose(logits[:, 1:], q @ queue / 0.5, atol=1e-5)
    assert torch.allclose(moco.queue[:, :4], k_n.t(), atol=1e-5)
    assert torch.equal(moco.queue[:, 4:], queue[:, 4:])
    assert int(moco.queue_ptr) == 4
    logits.sum().backward()  # gradients reach the query encoder only
    assert all(p.grad is not None for p in moco.encoder_q.parameters())
    assert all(p.grad is None for p in moco.encoder_k.parameters())


# --------------------------------------------------------------------------
# import hygiene

def test_import_needs_no_horovod_and_no_cuda_calls():
    code = "import sys, model; assert 'horovod' not in sys.modules and 'horovod.torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    with open(os.path.join(REPO, "model.py")) as f:
        assert ".cuda(" not in f.read()


def test_build_model_gives_every_aggregator_with_its_arguments():
    for aggregator in AGGREGATORS:
        model = build_model(aggregator, feature_size=C, num_layers=2, num_clusters=4, output_dim=16)
        assert model.feature_size == C
        assert model.output_dim == (C if aggregator == "tca" else 16)
    assert len(build_model("tca", feature_size=C, num_layers=3).transformer_encoder.layers) == 3
    assert build_model("netvlad", feature_size=C, num_clusters=4, normalize_input=True).normalize_input
    assert build_model("gru", feature_size=C, num_layers=1, output_dim=16, dropout=0.5).dropout == 0.0


@pytest.mark.parametrize("name", AGGREGATORS)
def test_forward_and_encode_equals_forward_and_encode(name):
    model = build_model(name, feature_size=C, num_layers=2, num_clusters=4, output_dim=16).eval()
    x, n = padded([torch.randn(6, C), torch.randn(3, C)], 8)
    with torch.no_grad():
        video, frames = model.forward_and_encode(x, n)
        assert torch.allclose(video, model(x, n), atol=1e-6)
        assert torch.allclose(frames, model.encode(x, n), atol=1e-6)
