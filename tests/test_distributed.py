"""Several processes on the CPU (gloo), spawned inside the tests: data-parallel training follows the
single-process run, sharded episodic adaptation reproduces its predictions exactly, online methods refuse."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
from conftest import QUICKSTART, run_cli
from safetensors.torch import load_file

from tta_cli import distributed
from tta_cli.adapt.methods import build_method
from tta_cli.adapt.orders import build_order
from tta_cli.adapt.runner import run_method
from tta_cli.config import AdaptSettings, ModelConfig, TaskConfig, TrainConfig, load_config
from tta_cli.data.imageset import ImageSet, to_float_nchw
from tta_cli.data.loader import DeviceLoader
from tta_cli.data.sources import load_split
from tta_cli.models import build_model
from tta_cli.tasks import build_task
from tta_cli.train.loop import train

WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def join_group(rank: int, port: int) -> None:
    """What torchrun does for a worker, then `distributed.init` as the commands call it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init(torch.device("cpu"))


def spawn(worker, *args) -> None:
    """Start WORLD_SIZE workers `worker(rank, port, *args)`. Forked, as PyTorch's own gloo tests do: the
    workers inherit the imported modules instead of importing torch again (seconds each on two cores)."""
    mp.start_processes(worker, args=(free_port(), *args), nprocs=WORLD_SIZE, join=True, start_method="fork")


def single_thread(function, *args, **kwargs):
    """The single-process reference, on one thread like each spawned worker (same kernels, same rounding)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


# ---- training -----------------------------------------------------------------------------------

def tiny_train_config(out: Path) -> TrainConfig:
    """The quick-start model (depth-8 pre-activation ResNet, GroupNorm, one random rotation per image), batch 32, one epoch."""
    return load_config(TrainConfig, QUICKSTART, {
        "out": str(out), "device": "cpu", "eval_every": 0, "optim": {"epochs": 1, "batch_size": 32},
    })


def train_and_record(config: TrainConfig, train_set: ImageSet, test_set: ImageSet) -> dict:
    step_losses = []
    result = train(config, train_set, test_set, torch.device("cpu"),
                   on_event=lambda kind, **values: step_losses.append(float(values["loss"])) if kind == "step" else None)
    return {"steps": step_losses, "history": result.history, "metrics": result.metrics}


def train_worker(rank: int, port: int, out: Path, train_set: ImageSet, test_set: ImageSet) -> None:
    join_group(rank, port)
    record = train_and_record(tiny_train_config(out / "ddp"), train_set, test_set)
    torch.save(record, out / f"rank{rank}.pt")
    distributed.shutdown()


def test_data_parallel_training_follows_the_single_process_loss_trajectory(tmp_path):
    train_set = load_split("cifar10-mini", "train", limit=128, seed=0)
    test_set = load_split("cifar10-mini", "test", limit=32, seed=0)
    spawn(train_worker, tmp_path, train_set, test_set)
    single = single_thread(train_and_record, tiny_train_config(tmp_path / "single"), train_set, test_set)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]

    assert len(single["steps"]) == len(ranks[0]["steps"]) == 4  # 128 images in batches of 32
    sharded_steps = torch.tensor([r["steps"] for r in ranks]).mean(0)  # equal shards: the global mean
    assert torch.allclose(sharded_steps, torch.tensor(single["steps"]), rtol=1e-4, atol=1e-5)
    without_time = [[{k: v for k, v in epoch.items() if k != "seconds"} for epoch in r["history"]] for r in ranks]
    assert without_time[0] == without_time[1]  # every rank reports the same summed metrics
    for sharded_epoch, single_epoch in zip(ranks[0]["history"], single["history"], strict=True):
        for key in ("train_loss", "train_main_loss", "train_ssl_loss", "train_acc", "lr"):
            assert abs(sharded_epoch[key] - single_epoch[key]) < 1e-4, key
    assert abs(ranks[0]["metrics"]["test_acc"] - single["metrics"]["test_acc"]) <= 1 / 32
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())
    sharded_weights, single_weights = (load_file(tmp_path / run / "model.safetensors") for run in ("ddp", "single"))
    assert all(torch.allclose(sharded_weights[name], single_weights[name], rtol=1e-3, atol=1e-4) for name in single_weights)


def test_rank_shards_of_each_batch_are_the_single_process_batch_with_the_same_augmentation():
    data = ImageSet(torch.randint(0, 256, (20, 8, 8, 3), dtype=torch.uint8), torch.arange(20), ["x"])
    single = list(DeviceLoader(data, 8, augment=True, seed=3, drop_last=True))
    shards = [list(DeviceLoader(data, 4, augment=True, seed=3, drop_last=True, rank=rank, world_size=2)) for rank in range(2)]
    assert len(single) == len(shards[0]) == len(shards[1]) == 2
    for step, (images, labels) in enumerate(single):
        for rank in range(2):
            assert torch.equal(shards[rank][step][1], labels[rank::2])
            assert torch.equal(shards[rank][step][0], images[rank::2])


def test_task_draws_for_a_shard_are_the_single_process_draws_of_its_rows():
    images = torch.rand(6, 3, 32, 32)
    for task in (build_task(TaskConfig(name="rotation", rotation_mode="random")), build_task(TaskConfig(name="masked"))):
        whole_inputs, whole_targets = task.make_batch(images, generator=torch.Generator().manual_seed(5))
        for rank in range(3):
            inputs, targets = task.make_batch(images[rank::3], generator=torch.Generator().manual_seed(5), shard=(rank, 3))
            assert torch.equal(inputs, whole_inputs[rank::3]) and torch.equal(targets, whole_targets[rank::3])


# ---- episodic adaptation ------------------------------------------------------------------------

def tiny_adaptation():
    """A tiny model, two 10-image sets (two segments) and TTT settings with partial chunks and a skip gate."""
    torch.manual_seed(0)
    task = build_task(TaskConfig(name="rotation", patch_size=4))
    model = build_model(ModelConfig(depth=8, width=1, split="layer2", groups=4), task)
    generator = torch.Generator().manual_seed(1)
    sets = [
        ImageSet(torch.randint(0, 256, (10, 32, 32, 3), dtype=torch.uint8, generator=generator),
                 torch.randint(0, 10, (10,), generator=generator), [str(c) for c in range(10)], {"corruption": name, "severity": 5})
        for name in ("fog", "snow")
    ]
    settings = AdaptSettings(methods=["source", "ttt"], steps=2, copies=4, lr=0.5, chunk=4, skip_above=0.3, seed=2)
    return model, task, sets, settings


def adapt_all(model, task, sets, settings) -> list:
    segments = build_order(sets, settings.order, settings.seed)
    results = []
    for name in settings.methods:
        method = build_method(name, copy.deepcopy(model), task, settings, 10, torch.device("cpu"))
        results.append(run_method(method, sets, segments, torch.device("cpu")))
    return [(r.method, r.predictions, r.errors, r.counters, r.samples) for r in results]


def episodic_logits(model, task, sets, settings) -> torch.Tensor:
    """TTT logits of both sets, handed over as two calls (the chunk count runs on across calls), gathered in order."""
    method = build_method("ttt", copy.deepcopy(model), task, settings, 10, torch.device("cpu"))
    batches = [to_float_nchw(image_set.images) for image_set in sets]
    if distributed.world_size() == 1:
        return torch.cat([method.adapt(images) for images in batches])
    rows, logits, offset = [], [], 0
    for images in batches:
        batch_rows, batch_logits = method.adapt_shard(images, 0, distributed.rank(), distributed.world_size())
        rows.append(batch_rows + offset)
        logits.append(batch_logits.reshape(-1, 10))
        offset += images.shape[0]
    return distributed.gather_in_order(torch.cat(logits), torch.cat(rows), offset)


def adapt_worker(rank: int, port: int, out: Path) -> None:
    join_group(rank, port)
    adaptation = tiny_adaptation()
    torch.save({"runs": adapt_all(*adaptation), "logits": episodic_logits(*adaptation)}, out / f"rank{rank}.pt")
    distributed.shutdown()


def test_sharded_episodic_adaptation_gives_exactly_the_single_process_predictions(tmp_path):
    spawn(adapt_worker, tmp_path)
    adaptation = tiny_adaptation()
    single, single_logits = single_thread(adapt_all, *adaptation), single_thread(episodic_logits, *adaptation)
    for rank in range(WORLD_SIZE):
        sharded = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert torch.equal(sharded["logits"], single_logits)  # bit for bit: each chunk saw the single-process views
        for (method, predictions, errors, counters, samples), expected in zip(sharded["runs"], single, strict=True):
            assert (method, errors, counters, samples) == (expected[0], expected[2], expected[3], expected[4])
            assert torch.equal(predictions, expected[1]), method
    assert single[1][3]["skipped_steps"] > 0  # the skip gate fired, and its count summed over ranks matches
    assert not torch.equal(single[0][1], single[1][1])  # adaptation changed some predictions


def test_gather_in_order_puts_rows_back_at_their_positions_in_one_process():
    values = torch.tensor([30, 10, 20])
    assert distributed.gather_in_order(values, torch.tensor([3, 1, 2]), 5, fill=-1).tolist() == [-1, 10, 20, 30, -1]


def test_sharded_adapt_through_torchrun_writes_one_results_file_equal_to_a_single_process_run(tiny_checkpoint, tmp_path):
    args = ["adapt", "--ckpt", tiny_checkpoint, "--data", "cifar10-mini", "--n", "12", "--corruptions", "fog", "--method", "source,ttt",
            "--steps", "1", "--copies", "4", "--set", "chunk=4", "--device", "cpu", "--predictions"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD_SIZE), "--master-addr", "127.0.0.1",
              "--master-port", str(free_port()), "-m", "tta_cli.cli", "--"]  # past `--` torchrun takes no option (--n would be its own)
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    sharded = subprocess.run([*launch, *args, "--out", tmp_path / "sharded"], capture_output=True, text=True, env=environment, timeout=300)
    assert sharded.returncode == 0, sharded.stderr
    assert sharded.stderr.count("tta adapt: error") == 1  # rank 0 prints, the other rank is quiet
    single = single_thread(run_cli, [*args, "--out", tmp_path / "single"])
    assert single.exit_code == 0, single.output
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["manifest.json", "predictions.csv", "results.csv", "results.json"]
    for name in ("predictions.csv", "results.csv"):
        assert (tmp_path / "sharded" / name).read_text() == (tmp_path / "single" / name).read_text()


# ---- single-process methods ---------------------------------------------------------------------

def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


def torchrun_environment(monkeypatch, rank: int) -> None:
    for name, value in {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29999}.items():
        monkeypatch.setenv(name, str(value))


def test_online_methods_refuse_to_split_over_torchrun_processes(monkeypatch, tmp_path):
    torchrun_environment(monkeypatch, rank=0)
    for method in ("ttt-online", "tent", "norm"):
        result = run_cli(["adapt", "--ckpt", tmp_path / "any", "--method", f"source,{method}", "--device", "cpu"])
        assert_one_line_error(result, f"--method {method} adapts online", "t+1", "2 torchrun processes")


def test_stream_refuses_to_split_over_torchrun_processes_and_other_ranks_stay_quiet(monkeypatch, tmp_path):
    torchrun_environment(monkeypatch, rank=0)
    assert_one_line_error(run_cli(["stream", "run", tmp_path / "clip.mp4", "--ckpt", tmp_path / "any"]), "tta stream adapts online", "t+1")
    torchrun_environment(monkeypatch, rank=1)
    monkeypatch.setattr("tta_cli.commands.common.OTHER_RANK_EXIT_DELAY_S", 0.0)
    quiet = run_cli(["stream", "run", tmp_path / "clip.mp4", "--ckpt", tmp_path / "any"])
    assert quiet.exit_code == 2 and quiet.stderr == ""
