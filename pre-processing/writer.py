"""Resumable HDF5 output for the pre-processing scripts, extraction and PCA
alike (one protocol, ResumableH5Writer): one dataset per video id, written
so that killing the process at any moment loses at most the last
`checkpoint_every` seconds of work and never leaves a truncated dataset.

HDF5 files are not crash-safe while open for writing, so finished videos are
not appended to OUT.h5 in place. They go into small part files
(OUT.h5.parts/part-<run>-<rank>-<number>.h5: a random run id, so that no two
runs ever write the same name, and the writing rank under horovodrun, 0
otherwise), each written under a temporary name and renamed once complete. A
re-run, with any number of ranks, reads which ids OUT.h5 and the parts already
hold and skips them. At the end, OUT.h5 and the parts are merged into a new
OUT.h5 (again written, then renamed) and the parts are removed.

Every file records, as HDF5 attributes of its root group, the settings that
change its features (fps, weights, PCA, dtype, ...): a re-run with other
settings is refused instead of mixing two kinds of features in one file. One
run at a time writes an output: it holds OUT.h5.lock, which names its PID.
Under horovodrun rank 0 holds the lock, reads what is done and merges; every
rank writes its own parts (sharding.py).
"""
import contextlib
import fcntl
import glob
import hashlib
import io
import os
import re
import shutil
import socket
import sys
import time

import h5py
import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import (Distributed, UserError, atomic_path, gather_objects, hdf5_errors, on_rank0,  # noqa: E402
                   open_features)
import sharding  # noqa: E402

PART_PATTERN = re.compile(r"part-[0-9a-f]{8}-\d{4}-\d{6}\.h5")


def dataset_names(h5file):
    """Names of all datasets in an open HDF5 file, in file order. Video ids
    holding '/' (CC_WEB_VIDEO's '1/1_1_Y') are stored as nested groups.
    One low-level visit that reads each object's type: 11 s for 10^6
    datasets, where h5py's visititems, which makes a Python object of each,
    took 66 s (bench/NOTES.md); a progress bar shows past 2 s."""
    names = []
    with tqdm(desc=f"listing {h5file.filename}", unit=" datasets", delay=2, leave=False) as bar:
        def visit(name, info):
            if info.type == h5py.h5o.TYPE_DATASET:
                names.append(name.decode())
                if len(names) % 4096 == 0:
                    bar.update(4096)
        with hdf5_errors(h5file.filename):  # a damaged index: one line naming the file
            h5py.h5o.visit(h5file.id, visit, info=True)
    return names


def check_video_ids(ids, source):
    """Refuse, up front and in one line, ids HDF5 cannot store as given: an id
    is a path of groups, so `x` cannot sit beside `x/y`, and `.`, `a/./b`,
    `a/`, `a//b`, `./a` are not names (h5py normalises or rejects them, so a
    re-run would never find them); nor are names holding control characters."""
    ids = list(ids)
    # control characters (a tab, a newline) would also break the failures file's `id<TAB>path` lines
    bad = [i for i in ids if any(part in ("", ".", "..") for part in i.split("/")) or any(c < " " for c in i)]
    groups = {i[:k] for i in ids for k in range(len(i)) if i[k] == "/"}
    bad += [i for i in ids if i in groups]
    if bad:
        shown = ", ".join(repr(i) for i in sorted(set(bad))[:10]) + (", ..." if len(set(bad)) > 10 else "")
        raise UserError(f"{source}: video ids HDF5 cannot store: {shown} (an id is a '/'-separated path of "
                        "non-empty names other than '.' and '..', without control characters, and no id may be a "
                        "folder of another)")


# --------------------------------------------------------------------------
# the settings an output was made with

def file_digest(path):
    """'sha256:' and the first 16 hex digits of the file's SHA-256: names a
    weights or PCA file by its content, not its path."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def read_settings(h5file):
    """The settings recorded in an open file's root attributes, as plain Python values."""
    return {key: value.item() if isinstance(value, np.generic) else value for key, value in h5file.attrs.items()}


def check_settings(path, recorded, settings):
    """Refuse a file made with other settings, naming the first difference by
    the flag that sets it: 'OUT.h5: was made with --fps 1, not 2'."""
    def show(value):
        return f"{value:g}" if isinstance(value, float) else str(value)

    for key in sorted(set(recorded) | set(settings)):
        old, new = recorded.get(key), settings.get(key)
        if old == new:
            continue
        if old is None:
            raise UserError(f"{path}: records no --{key} (an older version or another program wrote it); "
                            "write to a new file")
        if isinstance(old, bool) or isinstance(new, bool):
            raise UserError(f"{path}: was made {'with' if old else 'without'} --{key}, "
                            f"not {'with' if new else 'without'}")
        raise UserError(f"{path}: was made with --{key} {show(old)}, not {show(new) if new is not None else 'none'}")


def write_settings(h5file, settings):
    for key, value in settings.items():
        h5file.attrs[key] = value


# --------------------------------------------------------------------------
# the failures file beside an output

FAILURES_HEADER = "# videos that failed (id<TAB>path<TAB>reason), written by TCA's pre-processing"


def _is_failures_file(path):
    try:
        with open(path, errors="replace") as f:
            return f.readline().rstrip("\n") == FAILURES_HEADER
    except (IsADirectoryError, FileNotFoundError):
        return False


def check_failures_path(path):
    """Before any work: refuse a --failures path holding something else (the
    video list, say), which writing or removing the failures would destroy."""
    if os.path.exists(path) and not _is_failures_file(path):
        raise UserError(f"{path}: exists and is not a failures file this program wrote; give another --failures")


def write_failures(path, failures):
    """Write FAILURES_HEADER and `id<TAB>path<TAB>reason` lines atomically,
    and return `path`. With no failures, remove the failures file of an
    earlier run, and only such a file (it carries the header)."""
    if not failures:
        if _is_failures_file(path):
            os.remove(path)
        return None
    check_failures_path(path)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(FAILURES_HEADER + "\n")
        for video_id, video_path, reason in failures:
            f.write(f"{video_id}\t{video_path}\t{reason}\n")
    return path


# --------------------------------------------------------------------------
# one writer per output

class OutputLock:
    """OUT.h5.lock, held by one run: a POSIX lock on the file, which holds
    'PID HOST'. The kernel releases the lock when its process dies, so the
    lock of a killed run is simply taken over; a live holder is named."""

    def __init__(self, output):
        self.path = os.fspath(output) + ".lock"
        self.holder = f"{os.getpid()} {socket.gethostname()}"
        self._fd = None

    def acquire(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise UserError(f"{self.path}: cannot create the lock file ({e.strerror})") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 200).decode(errors="replace").split()
                os.close(fd)
                pid, host = (holder + ["?", "?"])[:2]
                raise UserError(f"{self.path[:-5]}: being written by another run (PID {pid} on {host}, "
                                f"holding {self.path}); wait for it to end or stop it") from None
            # the previous holder may have removed the file between our open and lock: lock the file at the path
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, (self.holder + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self):
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)  # before the unlock, so no one locks a file that is going away
        os.close(self._fd)  # releases the lock
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


# --------------------------------------------------------------------------
# parts, scan and merge

def write_dataset(h5file, name, array):
    """Every dataset of an output or part carries HDF5's Fletcher-32 checksum
    (per chunk), so that damaged data reads as an error, not as features.
    Files written before without it still read."""
    h5file.create_dataset(name, data=array, fletcher32=True)


def _damaged(h5file, names):
    """Why the data of the first of `names` that cannot be read back (a
    Fletcher-32 checksum that fails, a truncated file) cannot, or None."""
    for name in names:
        try:
            h5file[name][()]
        except (OSError, UserError) as e:  # open_features' files say UserError, naming file and video
            return str(e) if isinstance(e, UserError) else f"{h5file.filename}: video {name}: {e}"
    return None


def part_paths(output):
    """The finished part files of `output`, every rank's, in name order."""
    parts_dir = os.fspath(output) + ".parts"
    return sorted(path for path in glob.glob(os.path.join(parts_dir, "part-*.h5"))
                  if PART_PATTERN.fullmatch(os.path.basename(path)))


def scan_output(output, settings):
    """Prepare `output` for a (resumed) run, under its lock: remove the
    temporaries a killed run left, refuse an output or part made with other
    settings, and return the set of ids already done."""
    output = os.fspath(output)
    if os.path.exists(output) and not os.path.isfile(output):
        raise UserError(f"{output}: exists and is not a file")
    # atomic_path names its temporaries '.<name>.<random>.tmp'
    directory = os.path.dirname(os.path.abspath(output))
    stale = glob.glob(os.path.join(directory, "." + os.path.basename(output) + ".*.tmp"))
    stale += glob.glob(os.path.join(output + ".parts", ".part-*.tmp"))
    for path in stale:
        os.remove(path)
    done = set()
    for path in ([output] if os.path.exists(output) else []) + part_paths(output):
        with open_features(path) as f:
            check_settings(path, read_settings(f), settings)
            names = dataset_names(f)
            # a part is read whole here, so that merging never meets a damaged one
            damaged = _damaged(f, names) if path != output else None
        if damaged is not None:
            print(f"{damaged}; the part is removed and its {len(names)} videos are extracted again", file=sys.stderr,
                  flush=True)
            os.remove(path)
            continue
        done.update(names)
    return done


def new_run_id():
    return os.urandom(4).hex()


def recorded_settings(output):
    """The settings `output`, or before its first merge its first part, was made with; {} if neither exists."""
    for path in ([output] if os.path.isfile(output) else []) + part_paths(output)[:1]:
        with open_features(path) as f:
            return read_settings(f)
    return {}


class PartWriter:
    """Buffers (video_id, array) pairs and writes them as the next part file
    of (run, rank) every `checkpoint_every` seconds (and on flush)."""

    def __init__(self, output, settings, checkpoint_every=60.0, run=None, rank=0):
        self.parts_dir = os.fspath(output) + ".parts"
        self.settings, self.checkpoint_every = settings, checkpoint_every
        self.name = f"part-{run or new_run_id()}-{rank:04d}"
        self.written = []  # the parts this writer wrote
        self._buffer = {}
        self._last_write = time.monotonic()

    def add(self, video_id, array):
        self._buffer[video_id] = array
        if time.monotonic() - self._last_write >= self.checkpoint_every:
            self.flush()

    def flush(self):
        if self._buffer:
            os.makedirs(self.parts_dir, exist_ok=True)
            path = os.path.join(self.parts_dir, f"{self.name}-{len(self.written) + 1:06d}.h5")
            # the part is built in memory and written by Python: a full disk is then an OSError (one
            # line, no partial file); HDF5 failing to flush its own file segfaults at close instead
            image = io.BytesIO()
            with h5py.File(image, "w") as f:
                write_settings(f, self.settings)
                for video_id, array in self._buffer.items():
                    write_dataset(f, video_id, array)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                f.write(image.getbuffer())
            self.written.append(path)
            self._buffer = {}
        self._last_write = time.monotonic()


def merge_parts(output, settings):
    """Merge `output` and every part into a new `output`, then remove the parts."""
    output = os.fspath(output)
    parts = part_paths(output)
    if not parts:
        return
    sources = ([output] if os.path.exists(output) else []) + parts
    # HDF5 cannot fail cleanly on a full disk: make sure the merged copy fits before writing it
    needed = sum(os.path.getsize(source) for source in sources)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(output))).free
    if free < needed * 1.1 + (64 << 10):  # HDF5's own overhead on top of the data
        raise UserError(f"{output}: merging needs about {needed / 2**20:,.0f} MiB free, "
                        f"{free / 2**20:,.0f} MiB left on its disk (the finished parts are kept)")
    with atomic_path(output) as tmp, h5py.File(tmp, "w") as merged:
        write_settings(merged, settings)
        for source in sources:
            with open_features(source) as f:
                check_settings(source, read_settings(f), settings)
                for name in dataset_names(f):
                    if name in merged:  # a part already merged before a kill
                        continue
                    try:
                        data = f[name][()]
                    except (OSError, UserError) as e:  # the scan read the parts whole: the output itself is damaged
                        reason = str(e) if isinstance(e, UserError) else f"{source}: video {name}: {e}"
                        raise UserError(f"{reason}; move {source} away and run again to extract its videos anew "
                                        "(the parts are kept)") from None
                    write_dataset(merged, name, data)
    for part in parts:
        os.remove(part)
    os.rmdir(output + ".parts")


class ResumableH5Writer:
    """The one way the pre-processing writes an output: collects (video_id,
    array) pairs into `output`. Rank 0 takes the output's lock, lets
    settle(recorded settings) fill in what it decides from them (--bf16
    auto), refuses an output made with other `settings` (a dict of flag name
    -> value, recorded in every file) and reads which ids are done; every
    rank of `dist` (None: this process alone) learns them, and answers
    `video_id in writer`, and writes its own parts.

    Use as a context manager: a clean exit (or finish()) merges everything
    into `output`; an exception (including KeyboardInterrupt) only saves the
    finished videos, for the next run to pick up.
    """

    def __init__(self, output, checkpoint_every=60.0, settings=None, dist=None, settle=None):
        self.output = os.fspath(output)
        self.dist = dist or Distributed(None, 0, 1, 0, 1)
        self.settings = dict(settings or {})
        self._lock, self._finished = OutputLock(self.output), False

        def prepare():  # rank 0
            self._lock.acquire()
            try:
                if settle is not None:
                    self.settings.update(settle(recorded_settings(self.output)))
                return self._lock.holder, scan_output(self.output, self.settings), new_run_id(), self.settings
            except BaseException:
                self._lock.release()
                raise

        holder, self.done, run, self.settings = on_rank0(self.dist, prepare)
        try:
            sharding.check_shared_directory(self.dist, self._lock.path, holder)
        except BaseException:
            self._lock.release()
            raise
        self._parts = PartWriter(self.output, self.settings, checkpoint_every, run, self.dist.rank)

    def __contains__(self, video_id):
        return video_id in self.done

    def add(self, video_id, array):
        self.done.add(video_id)
        self._parts.add(video_id, array)

    def flush(self):
        self._parts.flush()

    def finish(self, report=None):
        """Flush, wait for every rank, and on rank 0 merge `output` and every
        rank's parts into a new `output`. Returns every rank's `report` (a
        picklable value), in rank order, to rank 0, and None to the others."""
        self._finished = True
        self.flush()
        ranks = gather_objects(self.dist, (self._parts.written, report))
        if self.dist.rank != 0:
            return None
        sharding.check_parts_visible([part for parts, _ in ranks for part in parts])
        merge_parts(self.output, self.settings)
        return [report for _, report in ranks]

    def release(self):
        self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None and not self._finished:
                self.finish()
            elif exc_type is not None:
                self.flush()  # the finished videos are kept
        finally:
            self.release()
        return False
