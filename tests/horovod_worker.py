"""Run by tests/test_horovod.py under `horovodrun -np 2`: exercises the Horovod
operations training relies on and writes what this rank saw to
OUT_DIR/rank<r>.json. Usage: horovod_worker.py OUT_DIR [--adasum]"""
import json
import os
import sys

import torch
import horovod.torch as hvd


def sgd_step(w0, gradient, lr, **dist_kwargs):
    """One SGD step on loss = <w, gradient>, whose gradient is `gradient`."""
    w = torch.nn.Parameter(w0.clone())
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=lr),
                                   named_parameters=[("w", w)], **dist_kwargs)
    opt.zero_grad()
    (w * gradient).sum().backward()
    opt.step()
    return w.detach().tolist()


def main():
    out_dir, adasum = sys.argv[1], "--adasum" in sys.argv
    hvd.init()
    r, size = hvd.rank(), hvd.size()
    result = {"rank": r, "size": size, "controller": "mpi" if hvd.mpi_enabled() else "gloo"}

    result["allreduce_sum"] = hvd.allreduce(torch.tensor([r + 1.0]), op=hvd.Sum).tolist()
    result["allreduce_avg"] = hvd.allreduce(torch.tensor([r + 1.0]), op=hvd.Average).tolist()
    # ranks contribute different numbers of rows: (r + 1, 2) filled with r
    result["allgather"] = hvd.allgather(torch.full((r + 1, 2), float(r))).tolist()

    torch.manual_seed(100 + r)  # different initial weights on every rank
    model = torch.nn.Linear(3, 2)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    result["broadcast_weight"] = model.weight.detach().tolist()

    # fp16-compressed gradient averaging: rank r's gradient is (r + 1) * ones
    result["fp16_step"] = sgd_step(torch.zeros(4), torch.full((4,), r + 1.0), lr=0.5,
                                   compression=hvd.Compression.fp16)
    if adasum:
        # orthogonal gradients: Adasum adds them; parallel ones: it averages them
        e = torch.eye(4)
        result["adasum_orthogonal"] = sgd_step(torch.zeros(4), e[r], lr=0.5, op=hvd.Adasum)
        result["adasum_parallel"] = sgd_step(torch.zeros(4), e[0] * 2.0, lr=0.5, op=hvd.Adasum)

    with open(os.path.join(out_dir, f"rank{r}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
