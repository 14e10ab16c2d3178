"""FIVR-200K-scale TCA_c retrieval: 100 query embeddings against 225,960,
similarity.cosine_similarity then top-100, against the matrix product alone."""
import torch

from bench.common import Target, fmt, gflops_summary, interleaved, pct, rates_against_peak, summary, table
from similarity import cosine_similarity
from utils import l2_normalize

SIZES = {"full": dict(queries=100, database=225_960, channels=1024, top_k=100, repeats=5),
         "quick": dict(queries=10, database=20_000, channels=256, top_k=100, repeats=2)}
TARGETS = (
    Target("FIVR-200K-scale TCA_c retrieval ({config[queries]} × {config[database]:,}, top-{config[top_k]})",
           ("project", "seconds"), 2.0, "< 2 s", higher_is_better=False),
)


def run(size, peak):
    C, k = size["channels"], size["top_k"]
    generator = torch.Generator().manual_seed(4)
    queries = l2_normalize(torch.randn(size["queries"], C, generator=generator))  # (Q, C)
    database = l2_normalize(torch.randn(size["database"], C, generator=generator))  # (D, C)

    def retrieve():
        return torch.topk(cosine_similarity(queries, database), k, dim=1)

    peak_run, peak_flops = peak
    seconds = interleaved({
        "project": retrieve,
        "matmul_only": lambda: queries @ database.t(),  # the product alone: the floor of this job
        "peak": peak_run,
    }, size["repeats"], size["warmup"])
    flops = 2.0 * size["queries"] * size["database"] * C
    result = {"config": size, "peak_gflops": gflops_summary(peak_flops, seconds["peak"])}
    for name in ("project", "matmul_only"):
        gflops, fraction = rates_against_peak(seconds[name], flops, seconds["peak"], peak_flops)
        result[name] = {"seconds": summary(seconds[name], "s"), "gflops": gflops, "fraction_of_peak": fraction}
    return result


def render(result, meta):
    contenders = (("project", "cosine_similarity + top-k"), ("matmul_only", "`queries @ database.T` alone (floor)"))
    rows = [(label, fmt(result[name]["seconds"]), fmt(result[name]["gflops"]), pct(result[name]["fraction_of_peak"]))
            for name, label in contenders]
    c = result["config"]
    return ["## FIVR-200K-scale retrieval\n",
            f"{c['queries']} query embeddings against {c['database']:,} × {c['channels']} database embeddings "
            f"(float32, {c['database'] * c['channels'] * 4 / 2**20:,.0f} MiB), `similarity.cosine_similarity` "
            f"then `torch.topk(k={c['top_k']})`.\n",
            *table(("", "seconds", "GFLOP/s", "of peak"), rows), ""]
