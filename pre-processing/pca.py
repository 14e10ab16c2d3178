"""PCA-whitening of frame features, as TCA's pre-processing: learn it from a
few random frames of every video (upstream: 10 per video of VCDB), then
project every frame on the top components, divide by the square root of
their eigenvalues and L2-normalise (3840-d iMAC -> 1024-d).

    python pre-processing/pca.py --learn vcdb_imac.h5 --params pca.npz
    python pre-processing/pca.py --apply fivr_imac.h5 --params pca.npz --output fivr_imac_pca1024.h5 --components 1024

The parameters file holds, as upstream's, U (D, D) eigenvectors in columns,
lams (D,) eigenvalues (largest first) and mu (D,) the mean. --apply is
resumable like extract_features.py: a re-run skips the videos already done.
"""
import argparse
import os
import sys
import time

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import UserError, atomic_path, check_finite, l2_normalize, open_features, read_features, run_main  # noqa: E402
from h5_writer import ResumableH5Writer, dataset_names, file_digest, read_settings  # noqa: E402

MIN_EIGENVALUE = 1e-9  # upstream's floor, so whitening never divides by zero


def learn_pca(sample_batches, num_dims):
    """Eigen-decomposition of the covariance of the rows of `sample_batches`
    (an iterable of (n_i, D) arrays), accumulated in float64 so the sample
    never has to fit in memory at once (1M VCDB frames x 3840 would be 15 GB).
    Same result as scikit-learn's PCA(whiten=True): its explained_variance_
    is `lams`, its components_ the columns of `U` (up to sign).
    Returns dict(U (D, D), lams (D,), mu (D,)), components by decreasing eigenvalue."""
    # sums of (x - shift) with shift = the first batch's mean: features whose
    # mean dwarfs their spread (unit-norm iMAC) would otherwise lose the small
    # eigenvalues to cancellation in E[xx^T] - mu mu^T
    shift, total, outer, count = None, np.zeros(num_dims), np.zeros((num_dims, num_dims)), 0
    for chunk in _chunks(sample_batches, rows=4096):  # a few videos' rows per update keep the GEMM efficient
        chunk = np.asarray(chunk, dtype=np.float64)
        if shift is None:
            shift = chunk.mean(axis=0)
        chunk = chunk - shift
        total += chunk.sum(axis=0)
        outer += chunk.T @ chunk
        count += len(chunk)
    if count < 2:
        raise UserError(f"PCA needs at least 2 sampled frames, got {count}")
    mean = total / count
    covariance = (outer - count * np.outer(mean, mean)) / (count - 1)
    mu = shift + mean
    lams, U = np.linalg.eigh(covariance)  # ascending
    order = np.argsort(lams)[::-1]
    lams, U = np.maximum(lams[order], MIN_EIGENVALUE), U[:, order]
    return {"U": U.astype(np.float32), "lams": lams.astype(np.float32), "mu": mu.astype(np.float32),
            "num_samples": np.int64(count)}


def _chunks(batches, rows):
    """Regroup an iterable of (n_i, D) arrays into arrays of at least `rows` rows (the last may be smaller)."""
    pending, size = [], 0
    for batch in batches:
        pending.append(batch)
        size += len(batch)
        if size >= rows:
            yield np.concatenate(pending)
            pending, size = [], 0
    if pending:
        yield np.concatenate(pending)


def save_params(path, params):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **params)


def load_params(path, components=None):
    """Load a parameters file, keeping the top `components` (default all)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: PCA parameters file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            U, lams, mu = f["U"], f["lams"], f["mu"]
    except Exception as e:  # a truncated or foreign file: zipfile, numpy and OS errors of many kinds
        raise UserError(f"{path}: not a PCA parameters file with U, lams, mu ({type(e).__name__}: {e})") from None
    if U.ndim != 2 or lams.shape != (U.shape[1],) or mu.shape != (U.shape[0],):
        raise UserError(f"{path}: inconsistent shapes U {U.shape}, lams {lams.shape}, mu {mu.shape}")
    if not (np.isfinite(U).all() and np.isfinite(mu).all() and np.isfinite(lams).all()):
        raise UserError(f"{path}: the PCA parameters hold non-finite values")
    if (lams <= 0).any():  # whitening divides by sqrt(lams)
        raise UserError(f"{path}: eigenvalue {int(np.argmax(lams <= 0))} is {lams[lams <= 0][0]:g}; "
                        f"whitening needs positive eigenvalues (learn them with pca.py --learn)")
    components = components or len(lams)
    if not 0 < components <= len(lams):
        raise UserError(f"--components must be in 1..{len(lams)} for {path}")
    return {"U": U[:, :components], "lams": lams[:components], "mu": mu}


def whiten(x, params):
    """(T, D) -> (T, K): centre, project on the top K eigenvectors, scale each
    to unit variance. Upstream's x -> U_K^T diag(lams_K)^-1/2 (x - mu)."""
    projection = params["U"] / np.sqrt(params["lams"])  # (D, K)
    return (np.asarray(x, dtype=np.float32) - params["mu"]) @ projection


def apply_pca(x, params):
    """Whitened and L2-normalised features (T, K), as stored by --apply."""
    return l2_normalize(whiten(x, params), dim=-1)


# --------------------------------------------------------------------------

def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--learn", metavar="IN.h5", help="learn the whitening from the features of this HDF5 file")
    mode.add_argument("--apply", metavar="IN.h5", help="whiten the features of this HDF5 file")
    parser.add_argument("--params", required=True, help=".npz parameters file: written by --learn, read by --apply")
    parser.add_argument("--frames_per_video", type=int, default=10,
                        help="--learn: random frames sampled per video (all frames of shorter videos)")
    parser.add_argument("--seed", type=int, default=0, help="--learn: seed of the frame sampling")
    parser.add_argument("--output", help="--apply: HDF5 file to write, one (T, components) dataset per video id")
    parser.add_argument("--components", type=int, default=1024, help="--apply: output dimensions (--learn reports the share of variance they keep)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="--apply: stored precision; float16 halves the file (every reader computes in float32)")
    parser.add_argument("--checkpoint_every", type=float, default=60.0,
                        help="--apply: seconds between saves of finished videos; a killed run loses at most this")
    return parser


def learn(args):
    if args.frames_per_video <= 0:
        raise UserError("--frames_per_video must be positive")
    rng = np.random.default_rng(args.seed)
    with open_features(args.learn) as f:
        names = dataset_names(f)
        if not names:
            raise UserError(f"{args.learn}: no features")
        if f[names[0]].ndim != 2:
            raise UserError(f"{args.learn}: {names[0]} has shape {f[names[0]].shape}, expected (T, D)")
        num_dims = f[names[0]].shape[1]

        def samples():
            for name in tqdm(names, unit="video", desc="sampling"):
                features = f[name]
                if features.ndim != 2 or features.shape[1] != num_dims:
                    raise UserError(f"{args.learn}: {name} has shape {features.shape}, expected (T, {num_dims})")
                # sampled without replacement (upstream: with), in file order for h5py
                rows = np.sort(rng.choice(len(features), min(args.frames_per_video, len(features)), replace=False))
                yield check_finite(features[rows].astype(np.float32), args.learn, name, rows)

        params = learn_pca(samples(), num_dims)
    if params["num_samples"] <= num_dims:
        print(f"WARNING: only {params['num_samples']} frames for {num_dims} dimensions: the components beyond "
              f"the {params['num_samples'] - 1}th are noise", file=sys.stderr)
    save_params(args.params, params)
    components = min(args.components, num_dims)
    kept = params["lams"][:components].sum() / params["lams"].sum()
    print(f"learned PCA of {num_dims}-d features from {params['num_samples']} frames of {len(names)} videos "
          f"into {args.params}; the top {components} components hold {100 * kept:.1f}% of the variance")


def apply(args):
    if args.output is None:
        raise UserError("--apply needs --output")
    if os.path.exists(args.output) and os.path.exists(args.apply) and os.path.samefile(args.output, args.apply):
        raise UserError(f"--output {args.output} is the --apply input: write the whitened features to another file")
    params = load_params(args.params, args.components)
    start, num_frames = time.time(), 0
    with open_features(args.apply) as f:
        names = dataset_names(f)
        # the input's settings (fps, weights, ...: extract_features.py's) and the whitening's
        settings = dict(read_settings(f), pca_params=file_digest(args.params), components=params["U"].shape[1],
                        dtype=args.dtype)
        with ResumableH5Writer(args.output, args.checkpoint_every, settings) as writer:
            todo = [name for name in names if name not in writer]
            print(f"{len(names)} videos, {len(names) - len(todo)} already done, {len(todo)} to whiten")
            for name in tqdm(todo, unit="video"):
                features = f[name]
                if features.ndim != 2 or features.shape[1] != len(params["mu"]):
                    raise UserError(f"{args.apply}: {name} has shape {features.shape}, "
                                    f"the PCA expects (T, {len(params['mu'])})")
                writer.add(name, apply_pca(read_features(f, name, args.apply), params).astype(args.dtype, copy=False))
                num_frames += len(features)
    print(f"whitened {len(todo)} videos ({num_frames} frames, {time.time() - start:.1f} s) "
          f"to {params['U'].shape[1]} dimensions into {args.output}")


def main():
    args = get_args_parser().parse_args()
    learn(args) if args.learn else apply(args)


if __name__ == "__main__":
    run_main(main)
