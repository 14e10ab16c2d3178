"""What a training run leaves to look at while it goes, in --model_path:

- log.jsonl: one JSON object per logged step ({"epoch", "step",
  "global_step", "loss", "lr", "pairs_per_s"}) and per epoch ({"epoch",
  "loss", "lr", "pairs_per_s", "seconds"}, plus "val" {metric: {key: mAP}}
  and "val_seconds" after a validation), each with the run's "run_start"
  (ISO time of the run's first start, kept across --resume). It tells one
  run's story: a fresh run starts a new log, a resumed one first drops the
  records after its checkpoint's epoch (the epochs it trains again);
- TensorBoard event files of the same scalars (`tensorboard --logdir
  --model_path`), rewritten from the log on --resume so they agree with it;
- curves.png, drawn from log.jsonl after every epoch (matplotlib, Agg), for
  those without TensorBoard.
"""
import datetime
import glob
import json
import math
import os

from utils import UserError, atomic_path, save_figure

LOG_NAME, PLOT_NAME = "log.jsonl", "curves.png"
EVENT_FILES = "events.out.tfevents.*"  # SummaryWriter's file names


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_log(path):
    """The records of a log.jsonl ([] if there is none). A line a kill cut
    short is dropped: every whole record was written with its newline."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return [r for r in records if isinstance(r, dict)]


def validation_scalars(record, keys_per_metric=None):
    """{"metric/key": value} of an epoch record's validation (nested values
    such as EVVE's per-event mAPs left out); keys_per_metric: only the first
    so many keys of each metric (the benchmark's main ones come first)."""
    return {f"{metric}/{key}": value for metric, values in record.get("val", {}).items()
            for key, value in [(k, v) for k, v in values.items() if isinstance(v, (int, float))][:keys_per_metric]}


class TrainingLog:
    """log.jsonl, the TensorBoard event files and curves.png of one run, on
    rank 0. resume_epoch None: a fresh run (a new log, old event files and
    curves removed); else the checkpoint's epoch, after which the records
    are dropped (the log rewritten atomically, the event files replayed)."""

    def __init__(self, model_path, run_start, resume_epoch=None, tensorboard=True):
        self.model_path, self.run_start = model_path, run_start
        self.log_path, self.plot_path = os.path.join(model_path, LOG_NAME), os.path.join(model_path, PLOT_NAME)
        kept = []
        if resume_epoch is not None:
            kept = [r for r in read_log(self.log_path)
                    if r.get("epoch", math.inf) <= resume_epoch and r.get("run_start", run_start) == run_start]
        with atomic_path(self.log_path) as tmp, open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self.records = kept
        self.file = open(self.log_path, "a")
        for stale in glob.glob(os.path.join(glob.escape(model_path), EVENT_FILES)):
            os.remove(stale)
        if resume_epoch is None and os.path.exists(self.plot_path):
            os.remove(self.plot_path)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise UserError(f"TensorBoard curves need the tensorboard package ({e}): make install, or "
                                "pass --no_tensorboard") from None
            self.writer = SummaryWriter(model_path)
            for record in kept:
                self._to_tensorboard(record)
            self.writer.flush()

    def log(self, record):
        """Append one record (the run's start added) to log.jsonl and TensorBoard."""
        record = dict(record, run_start=self.run_start)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.records.append(record)
        if self.writer is not None:
            self._to_tensorboard(record)

    def _to_tensorboard(self, record):
        if "step" in record:  # every --print_freq steps, against the step count
            for name in ("loss", "lr", "pairs_per_s"):
                self.writer.add_scalar(f"step/{name}", record[name], record["global_step"])
            return
        for name in ("loss", "lr", "pairs_per_s"):  # per epoch, against the epoch
            if name in record:
                self.writer.add_scalar(f"epoch/{name}", record[name], record["epoch"])
        for tag, value in validation_scalars(record).items():
            self.writer.add_scalar(f"val/{tag}", value, record["epoch"])
        if "val_seconds" in record:
            self.writer.add_scalar("val/seconds", record["val_seconds"], record["epoch"])

    def end_epoch(self):
        """After an epoch's record: flush the event files, redraw curves.png."""
        if self.writer is not None:
            self.writer.flush()
        plot_curves(self.records, self.plot_path)

    def close(self):
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def plot_curves(records, path):
    """curves.png from log records: loss (steps and epochs), learning rate,
    pairs/s and the validation keys, against the epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r for r in records if "step" not in r and "loss" in r]
    steps = [r for r in records if "step" in r]
    steps_per_epoch = {}  # the last step logged in each epoch, to place the steps within it
    for r in steps:
        steps_per_epoch[r["epoch"]] = max(steps_per_epoch.get(r["epoch"], 0), r["step"])
    step_x = [r["epoch"] - 1 + r["step"] / steps_per_epoch[r["epoch"]] for r in steps]
    figure, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, name, label in ((axes[0, 0], "loss", "loss"), (axes[0, 1], "lr", "learning rate"),
                            (axes[1, 0], "pairs_per_s", "pairs/s")):
        if steps:
            ax.plot(step_x, [r[name] for r in steps], linewidth=0.8, alpha=0.5, label="every --print_freq steps")
        ax.plot([r["epoch"] for r in epochs], [r[name] for r in epochs], marker="o", markersize=3, label="epoch")
        ax.set(xlabel="epoch", ylabel=label)
        ax.grid(True, linestyle="dotted")
    axes[0, 0].legend(fontsize="small")
    validated = [r for r in epochs if "val" in r]
    ax = axes[1, 1]
    # a legend of 3 metrics x 6 FIVR keys would cover the plot: the first 3 keys (DSVR, CSVR, ISVR; TensorBoard has all)
    for tag in dict.fromkeys(tag for r in validated for tag in validation_scalars(r, 3)):
        points = [(r["epoch"], validation_scalars(r)[tag]) for r in validated if tag in validation_scalars(r)]
        ax.plot(*zip(*points), marker="o", markersize=3, label=tag)
    ax.set(xlabel="epoch", ylabel="validation mAP")
    ax.grid(True, linestyle="dotted")
    if validated:
        ax.legend(fontsize="small", ncol=2)
    else:
        ax.text(0.5, 0.5, "no validation (--val_dataset)", ha="center", va="center", transform=ax.transAxes)
    figure.tight_layout()
    save_figure(figure, path)
