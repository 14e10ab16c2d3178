"""Helpers shared by every script: L2-normalisation, padding and masks, safe
loading of annotation pickles, HDF5 features and checkpoints, atomic writes,
Horovod helpers that fall back to a single process, and the one-line error
reporting of the command-line tools.

Each idea lives here once; model.py, data.py, train.py, evaluation.py and the
pre-processing scripts import it from here.
"""
import contextlib
import os
import pickle
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F


class UserError(Exception):
    """A problem with the user's input (a file, a flag, a dataset): reported as
    one line, without a traceback, by `run_main`."""


def run_main(main):
    """Run a script's `main()`; a `UserError` becomes `error: <message>` on
    stderr and exit status 2 instead of a traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def available_cores():
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# --------------------------------------------------------------------------
# normalisation, padding, masks

def l2_normalize(x, dim=-1, eps=1e-12):
    """L2-normalise along `dim`; accepts a torch tensor or a numpy array and
    returns the same kind. Zero vectors stay zero (norm clamped at `eps`)."""
    if isinstance(x, torch.Tensor):
        return F.normalize(x, p=2, dim=dim, eps=eps)
    x = np.asarray(x)
    norm = np.linalg.norm(x, axis=dim, keepdims=True)
    return x / np.maximum(norm, eps).astype(x.dtype, copy=False)


def make_frame_mask(num_frames, max_frames):
    """Boolean mask (N, T) that is True on the valid frames of each video.

    num_frames: (N,) or (N, 1) integer tensor of true lengths.
    """
    num_frames = torch.as_tensor(num_frames).reshape(-1, 1)
    steps = torch.arange(max_frames, device=num_frames.device)
    return steps.unsqueeze(0) < num_frames  # (N, T)


def pad_sequences(sequences, max_frames=None, dtype=torch.float32, device=None):
    """Stack variable-length frame features into a zero-padded batch.

    sequences: list of (T_i, C) arrays or tensors.
    max_frames: pad (or crop, keeping the first frames) to this length;
        default is the longest sequence.
    Returns (padded (N, T, C), num_frames (N,) int64).
    """
    tensors = [torch.as_tensor(np.asarray(s) if not isinstance(s, torch.Tensor) else s)
               for s in sequences]
    if max_frames is None:
        max_frames = max(t.shape[0] for t in tensors)
    num_channels = tensors[0].shape[1]
    padded = torch.zeros(len(tensors), max_frames, num_channels, dtype=dtype, device=device)
    num_frames = torch.zeros(len(tensors), dtype=torch.long, device=device)
    for i, t in enumerate(tensors):
        length = min(t.shape[0], max_frames)
        padded[i, :length] = t[:length].to(dtype=dtype, device=device)
        num_frames[i] = length
    return padded, num_frames


# --------------------------------------------------------------------------
# safe loading

class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler that builds only plain data: dict, list, set, frozenset,
    tuple, str, bytes, numbers, bool and None. Those are built by pickle
    opcodes without looking up any global, so any global is refused."""

    _ALLOWED = {("builtins", name) for name in
                ("dict", "list", "set", "frozenset", "tuple", "str", "bytes",
                 "int", "float", "complex", "bool")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise _RefusedGlobal(f"refusing to load {module}.{name}: only plain data is allowed")


def load_pickle(path):
    """Load an annotation pickle holding plain data only.

    Python 2 pickles (upstream's vcdb.pickle) are read with latin1 strings.
    Raises UserError naming the file if it is missing, malformed or carries
    anything other than plain data.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: annotation file not found")
    try:
        with open(path, "rb") as f:
            return _PlainDataUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as e:
        raise UserError(f"{path}: not a plain-data annotation pickle ({e})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise UserError(f"{path}: malformed pickle ({type(e).__name__}: {e})") from None


def load_state_dict(path, map_location="cpu"):
    """Load a model state dict with `weights_only=True`. Accepts a bare state
    dict or a training checkpoint holding one under 'model'/'state_dict', and
    strips the 'module.' prefix that DataParallel/DDP checkpoints carry."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many kinds for a bad file
        raise UserError(f"{path}: cannot load checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise UserError(f"{path}: checkpoint holds no state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def open_features(path, mode="r"):
    """Open an HDF5 feature file (one dataset per video id, (T, C) float)."""
    import h5py
    path = os.fspath(path)
    if mode == "r" and not os.path.isfile(path):
        raise UserError(f"{path}: feature file not found")
    try:
        return h5py.File(path, mode)
    except OSError as e:
        raise UserError(f"{path}: cannot open as HDF5 ({e})") from None


# --------------------------------------------------------------------------
# atomic writes: a killed run never leaves a truncated file behind

@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the same directory as `path`; when the block
    ends without an exception it is renamed onto `path` (atomic on POSIX),
    otherwise it is removed."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    # mkstemp creates the file 0600; give it the permissions a plain open() would
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# --------------------------------------------------------------------------
# Horovod, optional: every helper is the single-process identity when Horovod
# is not installed or not initialised, so models and evaluation never need it.

def _hvd():
    try:
        import horovod.torch as hvd
    except ImportError:
        return None
    try:
        hvd.size()
    except ValueError:  # "Horovod has not been initialized"
        return None
    return hvd


def world_size():
    hvd = _hvd()
    return hvd.size() if hvd else 1


def rank():
    hvd = _hvd()
    return hvd.rank() if hvd else 0


def is_main_process():
    return rank() == 0


@torch.no_grad()
def concat_all_gather(tensor):
    """Concatenate `tensor` from every worker along dim 0 (rank order).
    Identity on a single process. No gradient flows through the gather."""
    hvd = _hvd()
    if hvd is None or hvd.size() == 1:
        return tensor
    return hvd.allgather(tensor.contiguous())
