"""The yardstick: fp32 matrix-multiply GFLOP/s, the most this machine does.
Every other section re-measures it within its own rounds and divides by it."""
from bench.common import fmt, gflops_summary, interleaved, peak_contender

SIZES = {"full": dict(n=2048, matmuls=3, repeats=7),
         "quick": dict(n=512, matmuls=2, repeats=3)}
TARGETS = ()


def run(size):
    matmul, flops = peak_contender(size["n"], size["matmuls"])
    seconds = interleaved({"matmul": matmul}, size["repeats"], size["warmup"])["matmul"]
    return {"config": size, "gflops": gflops_summary(flops, seconds)}


def render(result, meta):
    return ["## Matrix-multiply peak (the yardstick)\n",
            f"fp32 `torch.mm` of {result['config']['n']}² matrices: **{fmt(result['gflops'])}**. Each section "
            "below re-measures it within its own rounds and divides by that.\n"]
