"""Helpers shared by every script: L2-normalisation, padding and masks, the
length bucketing of videos, safe loading of annotation pickles, HDF5
features (every HDF5 error one line: open_features) and checkpoints,
atomic writes, the Horovod set-up and the distributed
helpers that fall back to a single process (a rank's share of the work,
gathering rows and objects, on rank 0, agree), and the one-line error
reporting of the command-line tools.

Each idea lives here once; model.py, data.py, train.py, evaluation.py and the
pre-processing scripts import it from here.
"""
import collections
import contextlib
import math
import os
import pickle
import sys
import tempfile

import h5py
import numpy as np

# torch is imported inside the functions that need it: evaluating a
# similarity file needs none of it, and `import torch` is most of that run's
# start-up (bench/NOTES.md).

# Padded frames per forward pass when a list of videos is encoded or
# compared: bounds memory whatever the lengths (model, similarity, evaluation).
FRAMES_PER_BATCH = 16384


class UserError(Exception):
    """A problem with the user's input (a file, a flag, a dataset): reported as
    one line, without a traceback, by `run_main`."""


def run_main(main):
    """Run a script's `main()` and return what it returns; a `UserError`
    becomes `error: <message>` on stderr and exit status 2 instead of a
    traceback."""
    try:
        return main()
    except UserError as e:
        message = str(e)
        if "\nOriginal Traceback" in message:  # re-raised from a DataLoader worker: its last line is ours
            message = message.strip().splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # disk full, permission denied, a directory where a file goes, ...
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def disk_is_full(path):
    """Whether the filesystem that holds (or would hold) `path` has next to no
    space left: how a short write is told apart where the writer's error
    carries no errno (numpy's tofile: "3538944 requested and 2097024
    written"; torch.save: "unexpected pos")."""
    import shutil
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free < (1 << 20)


def os_error_line(error, path=None):
    """`<path>: <reason>` of an OSError, naming `path` if given, else the
    file the error names."""
    path = path or error.filename
    reason = error.strerror or str(error)
    if error.errno is None and path and disk_is_full(path):
        reason = "No space left on device"
    return f"{os.fspath(path)}: {reason}" if path else reason


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
    if not isinstance(x, np.ndarray) and type(x).__module__.startswith("torch"):
        import torch.nn.functional as F
        return F.normalize(x, p=2, dim=dim, eps=eps)
    x = np.asarray(x)
    norm = np.linalg.norm(x, axis=dim, keepdims=True)
    return x / np.maximum(norm, eps).astype(x.dtype, copy=False)


def make_frame_mask(num_frames, max_frames):
    """Boolean mask (N, T) that is True on the valid frames of each video.

    num_frames: (N,) or (N, 1) integer tensor of true lengths.
    """
    import torch
    num_frames = torch.as_tensor(num_frames).reshape(-1, 1)
    steps = torch.arange(max_frames, device=num_frames.device)
    return steps.unsqueeze(0) < num_frames  # (N, T)


def pad_sequences(sequences, max_frames=None, dtype=None, device=None):
    """Stack variable-length frame features into a zero-padded batch.

    sequences: list of (T_i, C) arrays or tensors.
    max_frames: pad (or crop, keeping the first frames) to this length;
        default is the longest sequence.
    Returns (padded (N, T, C), num_frames (N,) int64).
    """
    import torch
    if dtype is None:
        dtype = torch.float32
    tensors = [torch.as_tensor(np.asarray(s) if not isinstance(s, torch.Tensor) else s)
               for s in sequences]
    if max_frames is None:
        max_frames = max(t.shape[0] for t in tensors)
    num_channels = tensors[0].shape[1]
    padded = torch.zeros(len(tensors), max_frames, num_channels, dtype=dtype, device=device)
    num_frames = torch.zeros(len(tensors), dtype=torch.long, device=device)
    for i, t in enumerate(tensors):
        length = min(t.shape[0], max_frames)
        padded[i, :length].copy_(t[:length])  # converts (float16 frames) and moves in one pass
        num_frames[i] = length
    return padded, num_frames


def length_buckets(lengths, budget=FRAMES_PER_BATCH, spread=math.inf, slack=0, rows=None):
    """Split items sorted by length (`lengths` ascending) into consecutive
    buckets that are padded to their longest item together, so little work
    goes to padding. A bucket's padded size (its rows x its longest length)
    stays within `budget` (a bucket holds at least one item) and its longest
    length within spread x its shortest + slack. rows[i]: how many padded
    rows item i takes (default 1; a video cut into chunks takes one per
    chunk). Yields (start, stop) ranges into the sorted order."""
    start = 0
    while start < len(lengths):
        stop, used = start + 1, rows[start] if rows is not None else 1
        while stop < len(lengths):
            more = used + (rows[stop] if rows is not None else 1)
            if more * lengths[stop] > budget or lengths[stop] > spread * lengths[start] + slack:
                break
            stop, used = stop + 1, more
        yield start, stop
        start = stop


def balanced_owners(work, size):
    """Share items of `work` (each item's cost: frames, bytes) among `size`
    workers so that they finish together: largest first, each to the worker
    with the least work so far (ties: the lower worker). Deterministic;
    returns each item's worker (N,) int64."""
    import heapq
    work = np.asarray(work)
    heap = [(0, worker) for worker in range(size)]
    owners = np.empty(len(work), dtype=np.int64)
    for i in np.lexsort((np.arange(len(work)), -work)).tolist():
        load, worker = heapq.heappop(heap)
        owners[i] = worker
        heapq.heappush(heap, (load + int(work[i]), worker))
    return owners


# --------------------------------------------------------------------------
# safe loading

class _RefusedGlobal(pickle.UnpicklingError):
    pass


def _from_container(cls):
    """cls(iterable) for an already built container only: protocol-2 pickles
    rebuild sets as set([...]); anything else (set(10**13), bytes(10**13))
    could allocate without bound."""
    def build(*args):
        if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, set, frozenset, dict))):
            raise _RefusedGlobal(f"refusing {cls.__name__}() of {type(args[-1]).__name__}: only plain data is allowed")
        return cls(*args)
    return build


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler that builds only plain data: dict, list, set, frozenset,
    tuple, str, bytes, numbers, bool and None. Pickle opcodes build all of
    them but sets in protocol 2 (set([...])), so the only globals are the
    container constructors, and they only take a container."""

    _CONTAINERS = {("builtins", name): cls for name, cls in
                   (("set", set), ("frozenset", frozenset), ("list", list), ("tuple", tuple), ("dict", dict))}

    def find_class(self, module, name):
        module = "builtins" if module == "__builtin__" else module  # Python 2 pickles
        if (module, name) in self._CONTAINERS:
            return _from_container(self._CONTAINERS[module, name])
        raise _RefusedGlobal(f"refusing to load {module}.{name}: only plain data is allowed")


def check_input_file(path, what):
    """Refuse, in one line, an input `path` that is not a file: a directory
    says so ("is a directory, not a checkpoint"), a missing path says "not
    found". `what` names the kind of file the flag wants."""
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, not {'an' if what[0] in 'aeiou' else 'a'} {what}")
    if not os.path.isfile(path):
        raise UserError(f"{path}: {what} not found")


def load_pickle(path):
    """Load an annotation pickle holding plain data only.

    Python 2 pickles (upstream's vcdb.pickle) are read with latin1 strings.
    Raises UserError naming the file if it is missing, malformed or carries
    anything other than plain data.
    """
    path = os.fspath(path)
    check_input_file(path, "annotation file")
    try:
        with open(path, "rb") as f:
            return _PlainDataUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as e:
        raise UserError(f"{path}: not a plain-data annotation pickle ({e})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise UserError(f"{path}: malformed pickle ({type(e).__name__}: {e})") from None


def load_torch_file(path, map_location="cpu"):
    """torch.load with `weights_only=True` (no code runs); a missing, empty,
    truncated or foreign file is one UserError naming it. A file the safe
    loader refuses gets a line of our own: PyTorch's message advises turning
    the safe loader off, the one thing to never do with a file that asks to
    run code."""
    import warnings

    import torch
    path = os.fspath(path)
    check_input_file(path, "checkpoint")
    try:
        with warnings.catch_warnings():  # a plain pickle's protocol warning, which repeats that advice
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # keep only PyTorch's diagnosis ("Unsupported operand 199", "unsupported GLOBAL posix.system ...")
        detail = [line.strip() for line in str(e).splitlines() if line.strip() and not any(
            word in line for word in ("weights_only", "Weights only", "torch.load", "Please file an issue"))]
        reason = detail[0] if detail else "not plain tensors and data"
        raise UserError(f"{path}: cannot load checkpoint: the safe loader refused it ({reason}); a damaged file, "
                        "or one that asks to run code") from None
    except Exception as e:  # torch raises many kinds for a bad file
        reason = str(e).splitlines()[0] if str(e).strip() else "empty or truncated"
        raise UserError(f"{path}: cannot load checkpoint ({type(e).__name__}: {reason})") from None


def load_checkpoint(path, map_location="cpu"):
    """Load a model checkpoint with `weights_only=True`, its floating-point
    tensors checked finite: returns (state_dict, model_args). model_args is the dict of build_model arguments a
    self-describing checkpoint carries (train.py's {"model", "model_args"}),
    None for a bare state dict (upstream's) or one under 'state_dict' /
    'model_state_dict'. The 'module.' prefix of DataParallel/DDP
    checkpoints is stripped."""
    import torch
    obj = load_torch_file(path, map_location)
    model_args = None
    if isinstance(obj, dict):
        if isinstance(obj.get("model_args"), dict):
            model_args = obj["model_args"]
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: checkpoint holds no state dict")
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    # one NaN weight (or a damaged byte that makes one 1e29) turns every embedding into NaN
    bad = next((k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UserError(f"{path}: tensor {bad} holds non-finite weights (NaN or infinity): a damaged checkpoint "
                        "or a diverged training run")
    return state_dict, model_args


def load_state_dict(path, map_location="cpu"):
    """The state dict of a checkpoint (see load_checkpoint)."""
    return load_checkpoint(path, map_location)[0]


def open_features(path, mode="r"):
    """Open an HDF5 feature file (one dataset per video id, (T, C) float) as
    a FeatureFile: every error of HDF5 on opening it, finding a video in it
    or reading one is one UserError naming the file (and the video)."""
    path = os.fspath(path)
    if mode == "r":
        check_input_file(path, "feature file")
    try:
        return FeatureFile(path, mode)
    except OSError as e:
        raise UserError(f"{path}: cannot open as HDF5 ({e})") from None


@contextlib.contextmanager
def hdf5_errors(path, video=None, lookup=False, checksummed=False):
    """HDF5's errors inside the block (a damaged file: a broken symbol
    table or object header, a Fletcher-32 checksum that does not match) as
    one UserError naming the file, and the video being read (or looked up:
    the damage is then the file's index, not that video's data). KeyError
    stays KeyError where the object is simply absent."""
    try:
        yield
    except (KeyError, OSError, RuntimeError) as e:
        if isinstance(e, KeyError) and "doesn't exist" in str(e):
            raise
        reason = str(e).strip("'\"").splitlines()[0] if str(e) else type(e).__name__
        if checksummed and "filter returned failure" in reason:
            reason = "its Fletcher-32 checksum does not match: the data were damaged after writing"
        if video is None:
            raise UserError(f"{path}: damaged HDF5 file ({reason})") from None
        if lookup:
            raise UserError(f"{path}: damaged HDF5 file (looking up video {video}: {reason})") from None
        raise UserError(f"{path}: video {video}: damaged HDF5 file ({reason})") from None


class FeatureFile(h5py.File):
    """h5py.File whose lookups (`in`, `[]`, visititems) and dataset reads go
    through hdf5_errors: h5py reports a damaged file as a RuntimeError,
    KeyError or OSError with no file name, deep inside whoever reads it."""

    def __contains__(self, name):
        with hdf5_errors(self.filename, name, lookup=True):
            return super().__contains__(name)

    def __getitem__(self, name):
        with hdf5_errors(self.filename, name, lookup=True):
            obj = super().__getitem__(name)
        if isinstance(obj, h5py.Dataset):
            return FeatureDataset(obj.id, self.filename, name, readonly=self.mode == "r")
        return obj

    def visititems(self, func):
        with hdf5_errors(self.filename):
            return super().visititems(func)


class FeatureDataset(h5py.Dataset):
    """An h5py.Dataset of a FeatureFile: its reads name the file and the video."""

    def __init__(self, bind, path, video, readonly=False):
        super().__init__(bind, readonly=readonly)
        self._path, self._video = path, video

    def __getitem__(self, *args, **kwargs):
        with hdf5_errors(self._path, self._video, checksummed=self.fletcher32):
            return super().__getitem__(*args, **kwargs)


def read_features(features, key, path=None):
    """The (T, C) features of video `key` of an open HDF5 feature file as
    float32 (files may store float16). Refuses non-finite values with one
    line naming the file, the video and the frame: one NaN frame would
    otherwise turn every similarity of that video into NaN."""
    video = np.asarray(features[key][()], dtype=np.float32)
    return check_finite(video, path or getattr(features, "filename", ""), key)


def check_finite(frames, path, key, frame_numbers=None):
    """frames (T, C) itself, or a UserError naming the file, the video and the
    first frame (frame_numbers[t] when the rows are a sample) holding a NaN
    or an infinity."""
    finite = np.isfinite(frames)
    if not finite.all():
        row = int(np.argwhere(~finite)[0][0])
        frame = row if frame_numbers is None else int(frame_numbers[row])
        raise UserError(f"{path}: video {key}: non-finite feature value at frame {frame}")
    return frames


# --------------------------------------------------------------------------
# atomic writes: a killed run never leaves a truncated file behind

def check_writable(path):
    """Fail now, in one line, if `path` cannot be written later (a directory
    is in the way, the folder is read-only or not ours): scripts check their
    outputs before the work, not after it. Writes and removes a probe file
    in the nearest existing folder (access() says yes to root on files a
    read-only mount refuses)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory")
    folder = os.path.dirname(path)
    while not os.path.isdir(folder):
        if os.path.exists(folder):
            raise UserError(f"{path}: {folder} is not a directory")
        folder = os.path.dirname(folder)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{path}: cannot write in {folder} ({e.strerror or e})") from None


def check_outputs_apart(outputs, inputs):
    """Refuse, in one line and before any work, an output that would replace
    an input: the same file by path, through a symlink, './' or a hard link.
    `outputs` and `inputs` map a flag name to a path (None: not given); an
    output folder (`--plot DIR`) is refused when it is an input file."""
    def identity(path):
        try:
            stat = os.stat(path)
        except OSError:
            return None  # not there yet: it cannot be an input
        return stat.st_dev, stat.st_ino
    given = {identity(path): (flag, path) for flag, path in inputs.items() if path is not None}
    given.pop(None, None)
    for flag, path in outputs.items():
        if path is None:
            continue
        hit = given.get(identity(path))
        if hit is not None:
            raise UserError(f"{path}: {flag} would overwrite the input {hit[0]} ({hit[1]}); "
                            "choose another output path")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the same directory as `path`; when the block
    ends without an exception it is renamed onto `path` (atomic on POSIX),
    otherwise it is removed. An OSError of the temporary file (disk full,
    permission denied, a directory at `path`) is a UserError naming `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        os.close(fd)
        # mkstemp creates the file 0600; give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.filename not in (None, tmp, path, directory):
            raise  # about another file: let it name itself
        raise UserError(os_error_line(e, path)) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def save_figure(figure, path):
    """Write a matplotlib figure as a PNG through atomic_path, then close it
    (a figure left open keeps its memory for the process's lifetime)."""
    import matplotlib.pyplot as plt
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            figure.savefig(f, format="png")
    finally:
        plt.close(figure)


def atomic_torch_save(obj, path):
    """torch.save through atomic_path; torch's own write errors (a full disk
    reads "enforce fail at inline_container.cc ... unexpected pos") become
    one line naming `path`."""
    import torch
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            reason = "No space left on device" if disk_is_full(tmp) else str(e).splitlines()[0]
            raise UserError(f"{path}: cannot write ({reason})") from None


# --------------------------------------------------------------------------
# Horovod, optional: started only under a launcher, and handed on as a
# Distributed, so models and evaluation never probe for it.

Distributed = collections.namedtuple("Distributed", "hvd rank size local_rank local_size")


# set by horovodrun's Gloo launcher, by mpirun (Open MPI) and by MPICH / Intel MPI
LAUNCHER_RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def init_distributed():
    """Start Horovod when the script runs under a launcher (`horovodrun`,
    `mpirun`) and return Distributed(hvd, rank, size, local_rank,
    local_size); a plain `python script.py` is a world of one that starts no
    Horovod (hvd None), as is a machine without Horovod. Every entry point
    that runs under horovodrun starts this way."""
    if not any(name in os.environ for name in LAUNCHER_RANK_VARIABLES):
        return Distributed(None, 0, 1, 0, 1)
    try:
        import horovod.torch as hvd
    except ImportError:
        raise UserError("launched by horovodrun/mpirun, but Horovod is not installed (make install)") from None
    hvd.init()
    return Distributed(hvd, hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())


def local_device(dist, requested=None):
    """The torch device of this rank: `requested` if given, else its local GPU
    (local rank) when there is one, else the CPU, whose cores the ranks of
    one host then share (threads = cores / local ranks, unless
    OMP_NUM_THREADS says otherwise: more threads than cores only contend)."""
    import torch
    if requested is not None:
        try:
            device = torch.device(requested)
        except RuntimeError as e:
            raise UserError(f"--device {requested}: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {requested}: CUDA is not available on this machine")
    elif torch.cuda.is_available():
        device = torch.device("cuda", dist.local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, available_cores() // dist.local_size))
    return device


def all_gatherer(dist, name):
    """A function concatenating a tensor from every rank along dim 0 (rank
    order, no gradient through it), or None in a world of one. The fixed
    `name` lets Horovod's response cache reuse one entry: unnamed calls get a
    new name each step, which fills the cache and makes every later step log
    "A response has been evicted from cache"."""
    if dist.hvd is None or dist.size == 1:
        return None
    hvd = dist.hvd
    return lambda tensor: hvd.allgather(tensor.detach().contiguous(), name=name)


def rank_share(work, rank, size):
    """The positions (ascending) of the items of `work` (each item's cost:
    frames, bytes) that rank `rank` of `size` takes: balanced_owners's share,
    so the ranks finish together. Deterministic; every rank computes it alone."""
    if size == 1:
        return np.arange(len(work))
    return np.flatnonzero(balanced_owners(work, size) == rank)


def gather_rows(dist, positions, rows):
    """Every rank's (positions (n_r,), {name: (n_r, ...) numpy rows})
    concatenated in rank order, on every rank (Horovod allgather)."""
    import torch
    positions = dist.hvd.allgather(torch.from_numpy(positions.astype(np.int64)), name="positions").numpy()
    gathered = {name: dist.hvd.allgather(torch.from_numpy(r), name=f"rows.{name}").numpy()
                for name, r in rows.items()}
    return positions, gathered


def gather_objects(dist, value):
    """[value of rank 0, value of rank 1, ...] (any picklable value) on every
    rank; waits for all of them."""
    return [value] if dist.size == 1 else dist.hvd.allgather_object(value)


def _stop_every_rank(dist, message):
    # rank 0 says it once; the others leave quietly with the same status
    if dist.rank == 0:
        raise UserError(message)
    raise SystemExit(2)


def on_rank0(dist, function):
    """function() run on rank 0 only; its result, or its UserError, reaches
    every rank (the others then exit 2 without a word)."""
    if dist.size == 1:
        return function()
    result, error = None, None
    if dist.rank == 0:
        try:
            result = function()
        except UserError as e:
            error = str(e)
    result, error = dist.hvd.broadcast_object((result, error), root_rank=0)
    if error is not None:
        _stop_every_rank(dist, error)
    return result


def agree(dist, error):
    """Every rank stops if any rank met an error (a message; None: none did):
    rank 0 reports the first one."""
    errors = [e for e in gather_objects(dist, error) if e is not None]
    if errors:
        _stop_every_rank(dist, errors[0])
