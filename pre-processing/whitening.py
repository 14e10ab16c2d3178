"""PCA-whitening of frame features, as TCA's pre-processing: learn it from a
few random frames of every video (upstream: 10 per video of VCDB), then
project every frame on the top components, divide by the square root of
their eigenvalues and L2-normalise (3840-d iMAC -> 1024-d).

The parameters file holds, as upstream's, U (D, D) eigenvectors in columns,
lams (D,) eigenvalues (largest first) and mu (D,) the mean.
"""
import os
import sys

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import UserError, atomic_path, check_finite, check_input_file, l2_normalize  # noqa: E402

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
    check_input_file(path, "PCA parameters file")
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


#


def sample_frames(features, names, path, frames_per_video, num_dims, seed=0):
    """Yield, for each video of `names` in the open HDF5 file `features` (read
    from `path`), `frames_per_video` of its frames drawn at random (all of a
    shorter video), as float32 (n, num_dims): learn_pca's input."""
    rng = np.random.default_rng(seed)
    for name in tqdm(names, unit="video", desc="sampling"):
        frames = features[name]
        if frames.ndim != 2 or frames.shape[1] != num_dims:
            raise UserError(f"{path}: {name} has shape {frames.shape}, expected (T, {num_dims})")
        # sampled without replacement (upstream: with), in file order for h5py
        rows = np.sort(rng.choice(len(frames), min(frames_per_video, len(frames)), replace=False))
        yield check_finite(frames[rows].astype(np.float32), path, name, rows)
