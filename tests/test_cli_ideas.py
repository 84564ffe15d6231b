"""Issue 23's methods and options through `tta adapt` end to end on the embedded data (tiny model, few images)."""

from __future__ import annotations

import json
import shutil

from conftest import make_stream_folder, run_cli
from test_cli_train import assert_one_line_error

TINY = ["--data", "cifar10-mini", "--corruptions", "gaussian_noise", "--n", "8", "--steps", "1", "--copies", "2", "--device", "cpu"]


def test_train_writes_the_embedding_index_beside_the_checkpoint(tiny_checkpoint):
    from tta_cli.train.embedding_index import read_index

    index = read_index(tiny_checkpoint)
    assert index is not None and index.embeddings.dtype.is_floating_point and index.embeddings.element_size() == 2
    assert index.embeddings.shape[0] == index.labels.shape[0] == 200


def test_episodic_ideas_with_views_and_the_cache_end_to_end(tiny_checkpoint, tmp_path):
    out = tmp_path / "adapt"
    result = run_cli(["adapt", "--ckpt", tiny_checkpoint, "--method", "source,ttaug,ttt,ttt-nn", *TINY, "--views", "2",
                      "--set", "ttt.cache=-1", "--set", "ttt-nn.neighbours=4", "--out", out])
    assert result.exit_code == 0, result.output
    assert "adapted-weight cache hit rate 93.8% of 16 samples" in " ".join(result.stderr.split())
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["source", "ttaug", "ttt", "ttt-nn"]
    assert results["methods"]["ttt"]["cache_hit_rate"] == 15 / 16  # with --views 2 the 16 views are the samples: the first adapts
    assert results["settings"]["views"] == 2 and results["settings"]["ttt-nn"]["neighbours"] == 4


def test_online_ttt_with_adapters_and_the_forgetting_gate_end_to_end(tiny_checkpoint, tmp_path):
    out = tmp_path / "adapt"
    result = run_cli(["adapt", "--ckpt", tiny_checkpoint, "--method", "ttt-online,ttt", *TINY, "--params", "adapters",
                      "--forget", "0.1", "--out", out])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["params"] == "adapters" and results["settings"]["forget"] == 0.1


def test_ttt_nn_builds_the_index_of_an_older_checkpoint_on_demand(tiny_checkpoint, tmp_path):
    older = tmp_path / "older"
    shutil.copytree(tiny_checkpoint, older)
    (older / "embeddings.safetensors").unlink()
    result = run_cli(["adapt", "--ckpt", older, "--method", "ttt-nn", *TINY, "--set", "ttt-nn.neighbours=2"])
    assert result.exit_code == 0, result.output
    assert not (older / "embeddings.safetensors").exists()  # built in memory: the checkpoint folder is not written


def test_views_with_an_online_method_and_forget_without_one_are_one_line_errors(tiny_checkpoint):
    assert_one_line_error(run_cli(["adapt", "--ckpt", tiny_checkpoint, "--method", "ttt-online", *TINY, "--views", "2"]), "online")
    assert_one_line_error(run_cli(["adapt", "--ckpt", tiny_checkpoint, "--method", "ttt", *TINY, "--forget", "0.1"]), "--forget")
    assert_one_line_error(run_cli(["adapt", "--ckpt", tiny_checkpoint, "--method", "ttt-online", *TINY, "--forget", "2"]), "--forget")


def test_the_cache_on_a_stream_make_stream_hits_on_consecutive_frames(tiny_checkpoint, tmp_path):
    stream = make_stream_folder(tmp_path / "stream", frames=24)  # 4 clips of 6 frames, each clip one image
    out = tmp_path / "adapt"
    result = run_cli(["adapt", "--ckpt", tiny_checkpoint, "--data", stream, "--method", "ttt", "--steps", "1", "--copies", "2",
                      "--device", "cpu", "--set", "ttt.cache=0.9", "--out", out])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert [(row["corruption"], row["n"]) for row in results["rows"]] == [("stream", 24)]
    assert results["methods"]["ttt"]["cache_hit_rate"] >= 0.5  # most frames follow a frame of their own clip
