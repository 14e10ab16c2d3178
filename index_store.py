"""The on-disk index that index.py writes and search.py reads.

    IDX/manifest.json     how it was made: checkpoint SHA-256 and model
                          arguments, the extraction settings the features
                          record (PCA hash included), padding_size, frame
                          dtype, index_factory, counts
    IDX/model.pth         a copy of the checkpoint   } a video-file query needs
    IDX/pca_params.npz    a copy of the PCA params   } nothing but the index
    IDX/parts/part-RRRRRR-KKKK-NNNNNN.h5   one per checkpoint of run R, rank K: `ids` (n,), `embeddings`
                          (n, C) float32 TCA_c, `frames` (F, C) float16 (or
                          float32) TCA frame embeddings of the n videos end to
                          end, `offsets` (n + 1,) into frames
    IDX/index.faiss       the TCA_c embeddings of the parts, in part order
                          (FAISS id = position in that order)
    IDX/index.lock        held by the one run writing IDX

A sharded index (index.py --shards under horovodrun -np N) keeps, instead of
IDX/parts and IDX/index.faiss, one folder per rank, IDX/shard-KKKK/ with that
rank's parts/ and index.faiss (FAISS id = position in the shard), and
IDX/quantizer.faiss, the trained empty index every shard starts from (one
coarse quantizer, so the shards' stage-1 scores compare); the manifest says
how many shards ("shards") and the videos of each ("shard_videos").

Every file is written under a temporary name and renamed, so a killed run
leaves finished parts and the previous index.faiss, never half a file; the
frame store is read a shortlist at a time (one slice per video), never whole.
"""
import glob
import hashlib
import io
import json
import os
import re
import shutil

import h5py
import numpy as np

from utils import UserError, atomic_path, hdf5_errors

MANIFEST, FAISS_FILE, MODEL_FILE, PCA_FILE = "manifest.json", "index.faiss", "model.pth", "pca_params.npz"
QUANTIZER_FILE = "quantizer.faiss"
# part-<round>-<rank>-<number>.h5: a round per index.py run, so that the parts
# of a later run (an --add, a resumed build) sort after every earlier one and
# the FAISS ids of the videos already indexed never move
PART_PATTERN = re.compile(r"part-(\d{6})-(\d{4})-(\d{6})\.h5")
FORMAT = 1  # of this layout, in the manifest

# The first-stage index by collection size (bench/NOTES.md, "Choosing the
# index"; bench/index.py measures it at 10^6): exact inner product up to
# EXACT_UP_TO videos (<= 0.1 s/query, small next to re-ranking a shortlist),
# then an inverted file of 4096 lists with FAISS's fast-scan PQ: 4-bit codes of
# 4-d sub-vectors (C / 8 bytes, 128 B for 1024-d), scanned with SIMD, searched
# at DEFAULT_NPROBE lists. At 10^6 (161 B/video) nprobe 64, 256 and 1024 all kept
# every planted copy of the clustered set at 224x, 146x and 67x exact's speed;
# on the isotropic worst case 1024 kept 96% of the copies at cosine 0.71 (256:
# 90%, 64: 70%) for ~1.4-2 ms a query, nothing next to stage 2's seconds. 16384
# lists beyond 4x10^6 videos is FAISS's guideline (4..16 sqrt(N)), unmeasured.
EXACT_UP_TO = 200_000
DEFAULT_NPROBE = 1024
TRAIN_SIZE = 160_000  # embeddings an IVF/PQ index trains on: 39 per list of 4096 (FAISS's minimum)


def default_factory(count, channels=1024):
    """The FAISS index_factory string for a collection of `count` videos of
    `channels`-d embeddings (exact where `channels` has no 4-d sub-vectors)."""
    if count <= EXACT_UP_TO or channels % 4:
        return "Flat"
    nlist = 4096 if count <= 4_000_000 else 16384
    return f"IVF{nlist},PQ{channels // 4}x4fs"


def shard_dir(index_dir, shard):
    """The folder of shard `shard` (a rank) of a sharded index."""
    return os.path.join(index_dir, f"shard-{shard:04d}")


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def jsonable(value):
    """HDF5 attributes (numpy scalars and arrays) as JSON values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode()
    return value


def first_difference(recorded, given):
    """The first key (sorted) whose value differs, with both values, or None."""
    for key in sorted(set(recorded) | set(given)):
        if recorded.get(key) != given.get(key):
            return key, recorded.get(key), given.get(key)
    return None


def check_same(path, recorded, given, what=""):
    """One UserError naming the first setting in which `given` (what: whose
    settings, e.g. a query file's) differs from what `path` records."""
    difference = first_difference(recorded, given)
    if difference is not None:
        key, old, new = difference
        raise UserError(f"{path}: made with {key}={old!r}, not {new!r}" + (f" as {what}" if what else ""))


# --------------------------------------------------------------------------
# manifest

def read_manifest(index_dir):
    path = os.path.join(index_dir, MANIFEST)
    if not os.path.isfile(path):
        raise UserError(f"{index_dir}: not an index (no {MANIFEST}; index.py makes one)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not an index manifest of format {FORMAT}")
    return manifest


def write_manifest(index_dir, manifest):
    path = os.path.join(index_dir, MANIFEST)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)


def copy_file(source, destination):
    with atomic_path(destination) as tmp:
        shutil.copyfile(source, tmp)


# --------------------------------------------------------------------------
# parts: the embeddings and the frame store

def part_paths(index_dir):
    return sorted(p for p in glob.glob(os.path.join(index_dir, "parts", "part-*.h5"))
                  if PART_PATTERN.fullmatch(os.path.basename(p)))


def next_round(index_dir):
    """The round number of a new index.py run: after every part there is."""
    paths = part_paths(index_dir)
    return int(PART_PATTERN.fullmatch(os.path.basename(paths[-1])).group(1)) + 1 if paths else 1


def write_part(index_dir, ids, embeddings, frames, frame_dtype, round_number, rank, number):
    """Part `number` of (round, rank): `ids` (n,), `embeddings` (n, C), frames [(T_i, C)]."""
    path = os.path.join(index_dir, "parts", f"part-{round_number:06d}-{rank:04d}-{number:06d}.h5")
    offsets = np.cumsum([0] + [len(f) for f in frames]).astype(np.int64)
    # built in memory and written by Python: a full disk is one OSError, no partial file. The numbers carry
    # HDF5's Fletcher-32 checksum, as extraction's outputs do: a damaged byte reads as an error naming the video
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        f["ids"] = np.array(ids, dtype=object)
        f.create_dataset("embeddings", data=np.asarray(embeddings, dtype=np.float32), fletcher32=True)
        f.create_dataset("offsets", data=offsets, fletcher32=True)
        # chunks of 64 frames: a shortlist reads a video's slice, not the part
        f.create_dataset("frames", data=np.concatenate(frames).astype(frame_dtype), fletcher32=True,
                         chunks=(min(64, int(offsets[-1])), frames[0].shape[1]))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(image.getbuffer())
    return path


class FrameStore:
    """The parts of an index, read lazily: ids in FAISS order, each video's
    TCA_c embedding and its frame embeddings, by position."""

    def __init__(self, index_dir):
        self.paths = part_paths(index_dir)
        self._files, self._parts = {}, {}
        ids, sizes = [], []
        for path in self.paths:
            with hdf5_errors(path):
                part_ids = self._file(path)["ids"].asstr()[:].tolist()
            ids += part_ids
            sizes.append(len(part_ids))
        self.ids = ids
        self.part_starts = np.cumsum([0] + sizes)  # (P + 1,)
        self.position = {v: i for i, v in enumerate(ids)}

    def _file(self, path):
        if path not in self._files:
            try:
                self._files[path] = h5py.File(path, "r")
            except OSError as e:
                raise UserError(f"{path}: cannot read the frame store ({e})") from None
        return self._files[path]

    def _locate(self, position):
        part = int(np.searchsorted(self.part_starts, position, side="right")) - 1
        return self.paths[part], position - int(self.part_starts[part])

    def embeddings(self, positions):
        """(n, C) float32 TCA_c embeddings of these positions."""
        rows = []
        for position in positions:
            path, row = self._locate(position)
            with hdf5_errors(path, self.ids[position]):
                rows.append(self._file(path)["embeddings"][row])
        return np.stack(rows).astype(np.float32)

    def frames(self, position, dtype=np.float32):
        """(T, C) frame embeddings of the video at `position`, as `dtype`
        (None: as stored, float16 by default; frame_scores converts them as
        it pads them, one pass instead of two)."""
        path, row = self._locate(position)
        with hdf5_errors(path, self.ids[position]):
            if path not in self._parts:  # a part's offsets are read once (8 bytes a video)
                part = self._file(path)
                self._parts[path] = (part["offsets"][()], part["frames"])
            offsets, frames = self._parts[path]
            stored = frames[offsets[row]:offsets[row + 1]]
            return stored if dtype is None else np.asarray(stored, dtype=dtype)

    def shortlist_frames(self, positions, dtype=None):
        """frames() of each of `positions`, read in storage order (neighbours
        share HDF5 chunks), returned in the order given."""
        videos = [None] * len(positions)
        for i in np.argsort(positions, kind="stable"):
            videos[i] = self.frames(positions[i], dtype)
        return videos

    def part_embeddings(self, number):
        """(n, C) float32 embeddings of part `number` (0-based)."""
        path = self.paths[number]
        with hdf5_errors(path):
            return np.asarray(self._file(path)["embeddings"][()], dtype=np.float32)

    def frames_count(self, number):
        """Frames stored in part `number` (0-based)."""
        path = self.paths[number]
        with hdf5_errors(path):
            return int(self._file(path)["offsets"][-1])

    def close(self):
        for f in self._files.values():
            f.close()
        self._files, self._parts = {}, {}


# --------------------------------------------------------------------------
# the FAISS index

def new_faiss_index(factory, channels):
    """An empty inner-product index of `factory` for `channels`-d embeddings."""
    import faiss
    try:
        index = faiss.index_factory(channels, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise UserError(f"--index_factory {factory}: FAISS cannot build it ({str(e).splitlines()[0]})") from None
    ivf = faiss.try_extract_index_ivf(index)
    pq = getattr(faiss.downcast_index(ivf), "pq", None) if ivf is not None else None
    if pq is not None and pq.nbits == 8:
        # 64 training points per code (FAISS's default: 256): training 128
        # 8-bit sub-quantizers took 475 s at 256 on 2 cores (bench/NOTES.md);
        # 4-bit ones (16 codes each) train in seconds at the default
        pq.cp.max_points_per_centroid = 64
    return index


def set_search_parameter(index, nprobe=None, ef_search=None):
    """nprobe of an inverted file, efSearch of an HNSW graph; exact indexes have neither."""
    import faiss
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and nprobe is not None:
        ivf.nprobe = nprobe
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None and ef_search is not None:
        hnsw.efSearch = ef_search


def write_faiss(index, index_dir, name=FAISS_FILE):
    import faiss
    with atomic_path(os.path.join(index_dir, name)) as tmp:
        faiss.write_index(index, tmp)


def read_faiss(index_dir, name=FAISS_FILE):
    import faiss
    path = os.path.join(index_dir, name)
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing (index.py was stopped before it wrote the index: run it again)")
    try:
        return faiss.read_index(path)
    except RuntimeError as e:
        raise UserError(f"{path}: cannot read the FAISS index ({str(e).splitlines()[0]})") from None
