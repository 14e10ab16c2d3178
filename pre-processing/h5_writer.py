"""Resumable HDF5 output for the pre-processing scripts: one dataset per video
id, written so that killing the process at any moment loses at most the last
`checkpoint_every` seconds of work and never leaves a truncated dataset.

HDF5 files are not crash-safe while open for writing, so finished videos are
not appended to OUT.h5 in place. They go into small part files
(OUT.h5.parts/part-000001.h5, ...), each written under a temporary name and
renamed once complete. A re-run reads which ids OUT.h5 and the parts already
hold and skips them. At the end, OUT.h5 and the parts are merged into a new
OUT.h5 (again written, then renamed) and the parts are removed.
"""
import glob
import os
import sys
import time

import h5py

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import UserError, atomic_path, open_features  # noqa: E402


def dataset_names(h5file):
    """Names of all datasets in an open HDF5 file, in file order. Video ids
    holding '/' (CC_WEB_VIDEO's '1/1_1_Y') are stored as nested groups."""
    names = []
    h5file.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


class ResumableH5Writer:
    """Collects (video_id, array) pairs into `output`.

    Use as a context manager: a clean exit merges everything into `output`;
    an exception (including KeyboardInterrupt) only saves the finished videos,
    for the next run to pick up.
    """

    def __init__(self, output, checkpoint_every=60.0):
        self.output = os.fspath(output)
        self.parts_dir = self.output + ".parts"
        self.checkpoint_every = checkpoint_every
        self._remove_stale_temporaries()
        self.done = set()  # ids already on disk or buffered
        if os.path.exists(self.output):
            with open_features(self.output) as f:
                self.done.update(dataset_names(f))
        for part in self._parts():
            with open_features(part) as f:
                self.done.update(dataset_names(f))
        self._buffer = {}
        self._last_write = time.time()

    def __contains__(self, video_id):
        return video_id in self.done

    def add(self, video_id, array):
        self._buffer[video_id] = array
        self.done.add(video_id)
        if time.time() - self._last_write >= self.checkpoint_every:
            self.flush()

    def flush(self):
        """Write the buffered videos as a new part file."""
        if self._buffer:
            os.makedirs(self.parts_dir, exist_ok=True)
            parts = self._parts()
            number = int(os.path.basename(parts[-1])[5:11]) + 1 if parts else 1
            with atomic_path(os.path.join(self.parts_dir, f"part-{number:06d}.h5")) as tmp:
                with h5py.File(tmp, "w") as f:
                    for video_id, array in self._buffer.items():
                        f.create_dataset(video_id, data=array)
            self._buffer = {}
        self._last_write = time.time()

    def close(self):
        """Flush, then merge `output` and the parts into a new `output`."""
        self.flush()
        parts = self._parts()
        if not parts:
            return
        sources = ([self.output] if os.path.exists(self.output) else []) + parts
        with atomic_path(self.output) as tmp, h5py.File(tmp, "w") as merged:
            for source in sources:
                with open_features(source) as f:
                    for name in dataset_names(f):
                        if name not in merged:  # a part already merged before a kill
                            merged.create_dataset(name, data=f[name][()])
        for part in parts:
            os.remove(part)
        os.rmdir(self.parts_dir)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.flush()
        return False

    def _parts(self):
        return sorted(glob.glob(os.path.join(self.parts_dir, "part-[0-9][0-9][0-9][0-9][0-9][0-9].h5")))

    def _remove_stale_temporaries(self):
        # atomic_path names its temporaries '.<name>.<random>.tmp'; a killed
        # run leaves them behind
        directory = os.path.dirname(os.path.abspath(self.output))
        stale = glob.glob(os.path.join(directory, "." + os.path.basename(self.output) + ".*.tmp"))
        stale += glob.glob(os.path.join(self.parts_dir, ".part-*.tmp"))
        for path in stale:
            os.remove(path)
        if os.path.exists(self.output) and not os.path.isfile(self.output):
            raise UserError(f"{self.output}: exists and is not a file")
