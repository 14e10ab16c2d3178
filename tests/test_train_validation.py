"""Tests of training's validation (--val_dataset, model_best.pth), of
log.jsonl as one run's story, of the TensorBoard files and curves.png, and of
the training folder's safety rules, on the small synthetic task of
train_helpers.
"""
import json
import os

import pytest
import torch

from train_helpers import (PYTHON, assert_same_state, epoch_records, make_dataset, read_log, run, scalars,
                           train_command, write_validation_benchmark)

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("vcdb")))


def test_validation_keeps_the_best_epoch_and_a_resumed_run_keeps_the_best(tmp_path, synthetic):
    annotation_path, feature_path = synthetic
    benchmark_dir = write_validation_benchmark(str(tmp_path))
    model_path = tmp_path / "run"
    command = train_command(tmp_path, annotation_path, feature_path, str(model_path), "--epochs", "3",
                            "--val_dataset", "FIVR-5K", "--val_feature_path", feature_path, "--val_annotation_dir",
                            benchmark_dir, "--val_every", "2", "--val_metric", "cosine,chamfer", "--val_key", "DSVR")
    # killed after epoch 3 is logged and validated, before its checkpoint
    assert run(command, env={"KILL_BEFORE_SAVE_EPOCH": "3"}, check=False).returncode != 0
    records = epoch_records(model_path)
    # validated every 2 epochs and after the last: epochs 2 and 3, both metrics, with their cost
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["epoch"] for r in records if "val" in r] == [2, 3]
    for r in records[1:]:
        assert r["val"].keys() == {"cosine", "chamfer"} and {"DSVR", "CSVR", "ISVR"} <= r["val"]["cosine"].keys()
        assert r["val_seconds"] > 0
    values = {r["epoch"]: r["val"]["cosine"]["DSVR"] for r in records[1:]}
    best_epoch = max(values, key=lambda e: (values[e], -e))  # the first of equal values
    best = torch.load(model_path / "model_best.pth", weights_only=True)
    assert best["epoch"] == best_epoch and best["val"]["cosine"]["DSVR"] == values[best_epoch]
    assert best["model_args"] == torch.load(model_path / "model.pth", weights_only=True)["model_args"]
    checkpoint = torch.load(model_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["best"]["epoch"] == 2
    if best_epoch == 2:  # model.pth is epoch 2's: the same weights
        assert_same_state(best["model"], torch.load(model_path / "model.pth", weights_only=True)["model"])
    # evaluation.py loads it by its path alone and measures what the validation logged
    result = run([PYTHON, "evaluation.py", "--dataset", "FIVR-5K", "--annotation_dir", benchmark_dir,
                  "--feature_path", feature_path, "--model_path", str(model_path / "model_best.pth"),
                  "--padding_size", "300", "--json_out", str(tmp_path / "best.json")])
    with open(tmp_path / "best.json") as f:
        assert json.load(f)["DSVR"] == pytest.approx(values[best_epoch], abs=1e-6), result.stdout

    # the best so far travels in checkpoint.pth: one no later epoch can beat is kept by --resume
    checkpoint["best"] = dict(checkpoint["best"], value=2.0)
    torch.save(checkpoint, model_path / "checkpoint.pth")
    best_bytes = (model_path / "model_best.pth").read_bytes()
    result = run(command + ["--resume"])
    assert "best DSVR 2.0000 (epoch 2)" in result.stdout
    assert (model_path / "model_best.pth").read_bytes() == best_bytes
    assert torch.load(model_path / "checkpoint.pth", weights_only=True)["best"]["value"] == 2.0
    # log.jsonl: each epoch once (epoch 3 dropped, then trained and validated again), one run's start time
    log = read_log(model_path)
    assert [r["epoch"] for r in log if "step" not in r] == [1, 2, 3]
    assert [(r["epoch"], r["step"]) for r in log if "step" in r] == [(e, s) for e in (1, 2, 3) for s in (2, 4, 6, 8)]
    assert len({r["run_start"] for r in log}) == 1
    assert epoch_records(model_path)[2]["val"]["cosine"]["DSVR"] == pytest.approx(values[3], abs=1e-6)

    # TensorBoard holds the log's scalars, once per step or epoch (rewritten on resume)
    tb = scalars(model_path)
    records = epoch_records(model_path)
    assert [step for step, _ in tb["epoch/loss"]] == [1, 2, 3]
    assert [v for _, v in tb["epoch/loss"]] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert [v for _, v in tb["epoch/lr"]] == pytest.approx([r["lr"] for r in records], rel=1e-6)
    assert [v for _, v in tb["epoch/pairs_per_s"]] == pytest.approx([r["pairs_per_s"] for r in records], rel=1e-6)
    assert tb["val/cosine/DSVR"] == [(e, pytest.approx(records[e - 1]["val"]["cosine"]["DSVR"], abs=1e-6))
                                     for e in (2, 3)]
    assert "val/chamfer/ISVR" in tb and [s for s, _ in tb["val/seconds"]] == [2, 3]
    assert [s for s, _ in tb["step/loss"]] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24]  # 8 steps per epoch
    # curves.png decodes
    from PIL import Image
    with Image.open(model_path / "curves.png") as image:
        assert image.format == "PNG" and image.size[0] > 400
        image.load()
    assert "curves.png" in result.stdout and f"tensorboard --logdir {model_path}" in result.stdout


def test_overwrite_and_a_fresh_run_start_a_new_log_without_tensorboard_files(tmp_path, synthetic):
    model_path = tmp_path / "run"
    run(train_command(tmp_path, *synthetic, str(model_path), "--epochs", "2"))
    assert len(list(model_path.glob("events.out.tfevents.*"))) == 1
    run(train_command(tmp_path, *synthetic, str(model_path), "--epochs", "1", "--overwrite", "--no_tensorboard"))
    assert [r["epoch"] for r in epoch_records(model_path)] == [1]
    assert not list(model_path.glob("events.out.tfevents.*"))  # the replaced run's curves went with it
    # a fresh run into a folder holding only a log
    for name in os.listdir(model_path):
        if name != "log.jsonl":
            os.remove(model_path / name)
    run(train_command(tmp_path, *synthetic, str(model_path), "--epochs", "1"))
    assert [r["epoch"] for r in epoch_records(model_path)] == [1]


def test_a_folder_whose_first_checkpoint_failed_names_the_flag_that_works(tmp_path, synthetic):
    model_path = tmp_path / "run"
    model_path.mkdir()
    torch.save({"model": {}, "model_args": {}}, model_path / "model.pth")  # then the disk filled up
    for extra in ([], ["--resume"]):
        result = run(train_command(tmp_path, *synthetic, str(model_path), *extra), check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "checkpoint.pth" in result.stderr and "pass --overwrite" in result.stderr, result.stderr
    run(train_command(tmp_path, *synthetic, str(model_path), "--epochs", "1", "--overwrite"))
    assert torch.load(model_path / "checkpoint.pth", weights_only=True)["epoch"] == 1


def test_an_output_over_an_input_is_refused(tmp_path, synthetic):
    annotation_path, feature_path = synthetic
    model_path = tmp_path / "run"
    model_path.mkdir()
    os.link(feature_path, model_path / "log.jsonl")  # a hard link to the features
    before = open(feature_path, "rb").read()
    result = run(train_command(tmp_path, annotation_path, feature_path, str(model_path)), check=False)
    assert result.returncode == 2 and "would overwrite the input --feature_path" in result.stderr
    result = run(train_command(tmp_path, annotation_path, feature_path, annotation_path), check=False)
    assert result.returncode == 2 and "--model_path would overwrite the input --annotation_path" in result.stderr
    assert open(feature_path, "rb").read() == before


@pytest.mark.parametrize("flags,message", [
    (["--val_feature_path", "f.h5"], "--val_feature_path is used by validation only: add --val_dataset"),
    (["--val_dataset", "FIVR-5K"], "--val_dataset needs --val_feature_path"),
    (["--val_dataset", "FIVR-5K", "--val_feature_path", "{features}", "--val_key", "mAP"],
     "--val_key mAP: FIVR-5K reports DSVR, CSVR, ISVR"),
    (["--val_dataset", "FIVR-5K", "--val_feature_path", "{features}", "--val_metric", "l2"], "--val_metric l2:"),
])
def test_validation_flags_are_checked_before_training(tmp_path, synthetic, flags, message):
    flags = [f.format(features=synthetic[1]) for f in flags]
    result = run(train_command(tmp_path, *synthetic, str(tmp_path / "run"), *flags), check=False)
    assert result.returncode == 2 and message in result.stderr and "epoch 1" not in result.stdout, result.stderr
