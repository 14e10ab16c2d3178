"""Horovod, as built by `make install`, works on 2 CPU ranks: collectives,
parameter broadcast, fp16-compressed gradient averaging (Gloo and MPI
controllers) and Adasum (MPI controller only); it is built with NCCL (for GPU
tensors) where the CUDA toolkit is there."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
HOROVODRUN = os.path.join(os.path.dirname(sys.executable), "horovodrun")


def run_workers(out_dir, controller, adasum=False):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1")
    cmd = [HOROVODRUN, "-np", "2", "-H", "localhost:2", f"--{controller}",
           sys.executable, os.path.join(HERE, "horovod_worker.py"), str(out_dir)]
    if adasum:
        cmd.append("--adasum")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.load(open(out_dir / f"rank{r}.json")) for r in range(2)]


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    return run_workers(tmp_path_factory.mktemp("gloo"), "gloo")


@pytest.fixture(scope="module")
def mpi_results(tmp_path_factory):
    # one MPI launch serves both the collectives and the Adasum test
    return run_workers(tmp_path_factory.mktemp("mpi"), "mpi", adasum=True)


def nccl_expected():
    """scripts/install.sh builds with NCCL when the CUDA toolkit is there: nvcc
    (under $CUDA_HOME, default /usr/local/cuda, or on PATH), a CUDA torch and
    the NCCL headers and library of torch's wheels (nvidia/nccl)."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if not (os.access(os.path.join(cuda_home, "bin", "nvcc"), os.X_OK) or shutil.which("nvcc")):
        return False
    if not torch.version.cuda:
        return False
    try:
        import nvidia.nccl
    except ImportError:
        return False
    d = list(nvidia.nccl.__path__)[0]
    return (os.path.isfile(os.path.join(d, "include", "nccl.h"))
            and os.path.isfile(os.path.join(d, "lib", "libnccl.so.2")))


def test_check_build_lists_pytorch_mpi_gloo_and_nccl_with_cuda():
    out = subprocess.run([HOROVODRUN, "--check-build"], capture_output=True, text=True).stdout
    expected = ("PyTorch", "MPI", "Gloo") + (("NCCL",) if nccl_expected() else ())
    for item in expected:
        assert f"[X] {item}" in out, out


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_collectives_broadcast_and_fp16_step(request, controller):
    results = request.getfixturevalue(f"{controller}_results")
    torch.manual_seed(100)  # rank 0's initial weights
    expected_weight = torch.nn.Linear(3, 2).weight.tolist()
    for r, res in enumerate(results):
        assert res["rank"] == r and res["size"] == 2 and res["controller"] == controller
        assert res["allreduce_sum"] == [3.0]
        assert res["allreduce_avg"] == [1.5]
        assert res["allgather"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        assert torch.allclose(torch.tensor(res["broadcast_weight"]), torch.tensor(expected_weight))
        # mean gradient 1.5, lr 0.5 -> every weight moves to -0.75 (exact in fp16)
        assert res["fp16_step"] == [-0.75] * 4


def test_adasum_step_under_mpi(mpi_results):
    for res in mpi_results:
        # Adasum(a, b) = (1 - a.b / 2|a|^2) a + (1 - a.b / 2|b|^2) b
        assert res["adasum_orthogonal"] == pytest.approx([-0.5, -0.5, 0.0, 0.0])
        assert res["adasum_parallel"] == pytest.approx([-1.0, 0.0, 0.0, 0.0])
