"""extract_features.py under `horovodrun`: which rank extracts which video,
and the few points where the ranks wait for each other (start, end).

    horovodrun -np 4 -H host1:2,host2:2 python pre-processing/extract_features.py --video_list l.tsv --output o.h5

Rank 0 takes the output's lock and reads what is already done; the remaining
videos are shared out by file size, largest first, each to the rank with the
least work so far, so the ranks finish together. Each rank writes its own
part files next to the output, and rank 0 merges them when every rank is
done: the output's directory must be one filesystem that every host sees.
A plain `python extract_features.py` is a world of one and starts no Horovod.
"""
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import UserError, agree, balanced_owners, init_distributed  # noqa: E402


def start():
    """Horovod's world under horovodrun, a world of one otherwise."""
    # ranks meet only at the start and the end, possibly minutes apart: that is no stall, and
    # Horovod's background thread need not wake every few ms meanwhile (it cost the lanes ~13%
    # of a 2-core machine, bench/NOTES.md)
    os.environ.setdefault("HOROVOD_STALL_CHECK_DISABLE", "1")
    os.environ.setdefault("HOROVOD_CYCLE_TIME", "100")  # milliseconds
    return init_distributed()


def check_shared_directory(dist, lock_path, holder):
    """Every rank must see the lock file rank 0 holds (its content:
    `holder`), or rank 0 could not merge the parts they write."""
    if dist.size == 1:
        return
    error = None
    if dist.rank != 0:
        try:
            with open(lock_path) as f:
                seen = f.read().strip()
        except OSError:
            seen = None
        if seen != holder:
            error = (f"rank {dist.rank} on {socket.gethostname()} cannot see {lock_path}, which rank 0 holds: "
                     "every rank must write the output's directory on one shared filesystem")
    agree(dist, error)


def check_parts_visible(parts):
    """Rank 0, before merging: the part files every rank wrote are there."""
    missing = [path for path in parts if not os.path.exists(path)]
    if missing:
        raise UserError(f"rank 0 on {socket.gethostname()} cannot see {missing[0]} (and {len(missing) - 1} other "
                        "parts) that another rank wrote: every rank must write the output's directory on one "
                        "shared filesystem; the parts are kept where they were written")


def share(videos, dist):
    """This rank's part of `videos` [(id, path)], balanced by file size
    (largest first, to the least loaded rank), in list order."""
    if dist.size == 1:
        return list(videos)
    sizes = [os.path.getsize(path) if os.path.isfile(path) else 0 for _, path in videos]
    owners = balanced_owners(sizes, dist.size)
    return [video for video, owner in zip(videos, owners) if owner == dist.rank]
