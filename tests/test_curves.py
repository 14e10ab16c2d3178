"""curves.py: log.jsonl tells one run's story, TensorBoard mirrors it, curves.png decodes."""
import json

from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from curves import TrainingLog, plot_curves, read_log


def write_log(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_resume_keeps_this_runs_records_up_to_the_checkpoint(tmp_path):
    run, other = "2026-01-01T00:00:00+00:00", "2025-12-31T00:00:00+00:00"
    records = [{"epoch": 1, "step": 2, "global_step": 2, "loss": 3.0, "lr": 0.1, "pairs_per_s": 5.0, "run_start": run},
               {"epoch": 1, "loss": 2.0, "lr": 0.1, "pairs_per_s": 5.0, "seconds": 1.0, "run_start": run,
                "val": {"cosine": {"DSVR": 0.5, "CSVR": 0.4}}, "val_seconds": 0.2},
               {"epoch": 2, "loss": 1.5, "lr": 0.05, "pairs_per_s": 6.0, "seconds": 1.0, "run_start": run},
               {"epoch": 1, "loss": 9.0, "lr": 0.1, "pairs_per_s": 1.0, "seconds": 1.0, "run_start": other}]
    # a kill cut the last line short
    write_log(tmp_path / "log.jsonl", records, tail='{"epoch": 3, "lo')
    assert read_log(tmp_path / "log.jsonl") == records
    log = TrainingLog(str(tmp_path), run, resume_epoch=1)
    log.log({"epoch": 2, "loss": 1.0, "lr": 0.05, "pairs_per_s": 7.0, "seconds": 1.0})
    log.end_epoch()
    log.close()
    kept = read_log(tmp_path / "log.jsonl")
    assert kept == records[:2] + [{"epoch": 2, "loss": 1.0, "lr": 0.05, "pairs_per_s": 7.0, "seconds": 1.0,
                                   "run_start": run}]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("epoch/loss")] == [(1, 2.0), (2, 1.0)]
    assert [(e.step, e.value) for e in events.Scalars("step/loss")] == [(2, 3.0)]
    assert [(e.step, e.value) for e in events.Scalars("val/cosine/DSVR")] == [(1, 0.5)]
    with Image.open(tmp_path / "curves.png") as image:
        image.load()


def test_a_fresh_log_replaces_the_old_one_and_its_curves(tmp_path):
    write_log(tmp_path / "log.jsonl", [{"epoch": 1, "loss": 2.0, "lr": 0.1, "pairs_per_s": 5.0}])
    (tmp_path / "curves.png").write_bytes(b"old")
    log = TrainingLog(str(tmp_path), "2026-01-01T00:00:00+00:00", tensorboard=False)
    log.close()
    assert read_log(tmp_path / "log.jsonl") == [] and not (tmp_path / "curves.png").exists()
    assert not list(tmp_path.glob("events.out.tfevents.*"))


def test_plot_curves_without_validation_or_steps(tmp_path):
    plot_curves([{"epoch": 1, "loss": 2.0, "lr": 0.1, "pairs_per_s": 5.0}], tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG"
        image.load()
