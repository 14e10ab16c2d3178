"""The worker processes of extract_features.py: `lanes` forked processes,
each working on one video at a time. Unlike a DataLoader's workers, one that
dies (a signal, a segfault inside FFmpeg, the out-of-memory killer) costs
only the video it held: that video is reported as failed, with the cause,
and a fresh process takes the dead one's place, so a collection holding a
video that crashes the decoder still finishes. Lanes die with their parent
(Linux's PR_SET_PDEATHSIG), so a killed run leaves no worker running on.
"""
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent):
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: lanes end when they next find the pipe closed
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _lane(connection, function, init, parent):
    _die_with_parent(parent)
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
        connection.send((index, function(index)))


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
        """(index, result) if the lane sent its result, else None (it died)."""
        try:
            if self.connection.poll():
                index, result = self.connection.recv()
                self.index = None
                return index, result
        except (EOFError, OSError, pickle.UnpicklingError):  # died while sending
            pass
        return None

    def stop(self):
        self.connection.close()
        self.process.kill()
        self.process.join()


def run_in_lanes(function, count, lanes, init=None, on_death=None, ahead=2):
    """Yield function(i) for i in range(count), in order, computed in
    `lanes` forked processes (0: in this one), each of which runs init()
    first. If the process holding item i dies, on_death(i, cause) is yielded
    for it instead and a fresh process carries on. At most `ahead` items per
    lane are computed beyond the next one to yield, which bounds the results
    held for reordering. function's results must pickle (numpy, not torch)."""
    if lanes == 0:
        yield from map(function, range(count))
        return
    context = multiprocessing.get_context("fork")  # function and its data reach the lanes unpickled
    workers = [_Lane(context, function, init) for _ in range(min(lanes, count))]
    results, next_item, next_yield = {}, 0, 0
    try:
        while next_yield < count:
            for k, lane in enumerate(workers):
                if lane.index is None and next_item < min(count, next_yield + len(workers) * ahead):
                    if not lane.process.is_alive():  # died between items
                        lane.stop()
                        workers[k] = lane = _Lane(context, function, init)
                    lane.give(next_item)
                    next_item += 1
            busy = [lane for lane in workers if lane.index is not None]
            multiprocessing.connection.wait([lane.connection for lane in busy] + [lane.process.sentinel for lane in busy])
            for k, lane in enumerate(workers):
                if lane.index is None:
                    continue
                taken = lane.take()
                if taken is not None:
                    results[taken[0]] = taken[1]
                elif not lane.process.is_alive():
                    lane.process.join()
                    results[lane.index] = on_death(lane.index, death_cause(lane.process.exitcode))
                    lane.stop()
                    workers[k] = _Lane(context, function, init)
            while next_yield in results:
                yield results.pop(next_yield)
                next_yield += 1
    finally:
        for lane in workers:
            lane.stop()
