"""The one worker pool of the pre-processing (extract_features.py's decoders
and CNN lanes, extract_frames.py's decoders): `lanes` forked processes,
each working on one video at a time and passing on its results piece by
piece (a window of frames, say), so that a long video never has to be held
whole. Unlike a DataLoader's workers, one that
dies (a signal, a segfault inside FFmpeg, the out-of-memory killer) costs
only the video it held: that video is reported as failed, with the cause,
and a fresh process takes the dead one's place, so a collection holding a
video that crashes the decoder still finishes. Lanes die with their parent
(Linux's PR_SET_PDEATHSIG), so a killed run leaves no worker running on.
"""
import collections
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal

PR_SET_PDEATHSIG = 1
M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def limit_heap_growth():
    """Have glibc's malloc give every block of 1 MB or more back to the
    system when it is freed. By default the size from which it does rises to
    the largest block freed (up to 32 MB); a lane's per-batch frames and
    activations then come from the heap, where the small feature chunks kept
    between them stop it from shrinking: +0.5 MB resident per frame, 6.9 GB
    for a 12,000-frame video (bench/NOTES.md). No-op without glibc."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


def _die_with_parent(parent):
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: lanes end when they next find the pipe closed
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _lane(connection, function, init, parent):
    _die_with_parent(parent)
    limit_heap_growth()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    if init is not None:
        init()
    while True:
        try:
            index = connection.recv()
        except EOFError:
            return
        if index is None:
            return
        for piece in function(index):
            connection.send((index, piece, False))  # blocks while the main process holds enough of ours
        connection.send((index, None, True))


def death_cause(exitcode):
    """'worker process killed by SIGSEGV' for a process's exit code."""
    if exitcode is not None and exitcode < 0:
        return f"worker process killed by {signal.Signals(-exitcode).name}"
    return f"worker process exited with status {exitcode}"


class _Lane:
    def __init__(self, context, function, init):
        self.connection, theirs = context.Pipe()
        self.process = context.Process(target=_lane, args=(theirs, function, init, os.getpid()), daemon=True)
        self.process.start()
        theirs.close()
        self.index = None  # the item in hand

    def give(self, index):
        self.index = index
        try:
            self.connection.send(index)
        except OSError:  # it just died: reported as it holding `index`
            pass

    def take(self):
        """(index, piece, last) if the lane sent a piece or the end of its
        item (last: True, piece None), else None (nothing sent, or it died)."""
        try:
            if self.connection.poll():
                index, piece, last = self.connection.recv()
                if last:
                    self.index = None
                return index, piece, last
        except (EOFError, OSError, pickle.UnpicklingError):  # died while sending
            pass
        return None

    def stop(self):
        self.connection.close()
        self.process.kill()
        self.process.join()


def run_in_lanes(function, count, lanes, init=None, on_death=None, ahead=2):
    """Yield the pieces of function(i), an iterable, for i in range(count),
    in order, computed in `lanes` forked processes (0: in this one), each of
    which runs init() first. If the process holding item i dies, the pieces
    it passed on are followed by the piece on_death(i, cause), and a fresh
    process carries on. At most `ahead` items per lane are started beyond
    the next one to yield, and at most `ahead` pieces per lane are held here
    for reordering (a lane waits to send more), which bounds the memory
    whatever an item's number of pieces. Pieces must pickle (numpy, not torch)."""
    if lanes == 0:
        for index in range(count):
            yield from function(index)
        return
    context = multiprocessing.get_context("fork")  # function and its data reach the lanes unpickled
    workers = [_Lane(context, function, init) for _ in range(min(lanes, count))]
    held = {}  # item -> [its pieces not yet yielded (deque), whether it is complete, its lane]
    next_item, next_yield = 0, 0

    def holding(lane):
        return sum(len(pieces) for pieces, _, owner in held.values() if owner is lane)

    try:
        while next_yield < count:
            for k, lane in enumerate(workers):
                if lane.index is None and next_item < min(count, next_yield + len(workers) * ahead):
                    if not lane.process.is_alive():  # died between items
                        lane.stop()
                        workers[k] = lane = _Lane(context, function, init)
                    held[next_item] = [collections.deque(), False, lane]
                    lane.give(next_item)
                    next_item += 1
            if held[next_yield][0] or held[next_yield][1]:
                pieces, complete, _ = held[next_yield]
                while pieces:
                    yield pieces.popleft()
                if complete:
                    del held[next_yield]
                    next_yield += 1
                continue
            busy = [lane for lane in workers if lane.index is not None]
            # a lane holding the next item is always read; another only while it has room here
            readable = [lane for lane in busy if lane.index == next_yield or holding(lane) < ahead]
            multiprocessing.connection.wait([lane.connection for lane in readable]
                                            + [lane.process.sentinel for lane in busy])
            for k, lane in enumerate(workers):
                if lane.index is None:
                    continue
                taken = lane.take() if lane in readable else None
                if taken is not None:
                    index, piece, last = taken
                    if last:
                        held[index][1] = True
                    else:
                        held[index][0].append(piece)
                elif not lane.process.is_alive():  # its pieces still in the pipe are dropped: the item failed
                    lane.process.join()
                    held[lane.index][0].append(on_death(lane.index, death_cause(lane.process.exitcode)))
                    held[lane.index][1] = True
                    lane.stop()
                    workers[k] = _Lane(context, function, init)
    finally:
        for lane in workers:
            lane.stop()


def videos_in_lanes(videos, produce, lanes, init=None):
    """run_in_lanes over `videos` [(id, path)]: produce(video_id, path)
    yields a video's items (video_id, path, piece, error), as
    video.video_items makes them, in a lane; they come back in the order of
    `videos`. A lane that dies adds (video_id, path, None, cause) after the
    items it passed on, so its video ends as one that failed."""
    return run_in_lanes(lambda index: produce(*videos[index]), len(videos), lanes, init,
                        lambda index, cause: (*videos[index], None, cause))
