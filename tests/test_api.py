"""The Python API (tta_cli/api.py): the README's example as it is, inputs in both layouts, saved weights."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

import tta_cli as tta
from tta_cli.errors import TTAError

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_block() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readmes_python_example_runs_as_it_is(tmp_path):
    """The block as printed: the packaged checkpoint on the quick start's corrupted set (only the set it reads)."""
    result = run_cli(["corrupt", "--corruptions", "gaussian_noise", "--n", "100", "--device", "cpu", "--out", tmp_path / "runs" / "cifar10-c"])
    assert result.exit_code == 0, result.output
    done = subprocess.run([sys.executable, "-c", readme_python_block()], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert re.search(r"source: \d+\.\d% error", done.stdout) and re.search(r"ttt-online: \d+\.\d% error", done.stdout)
    adapted = tta.load_checkpoint(tmp_path / "runs" / "resnet26-adapted")
    source = tta.load_checkpoint("resnet26_gn.rotation_sun2020_cifar10")
    assert adapted.class_names == source.class_names
    adapted_weights, source_weights = adapted.model.state_dict(), source.model.state_dict()
    assert any(not torch.equal(adapted_weights[key], source_weights[key]) for key in source_weights if key.startswith("encoder."))


def test_uint8_nhwc_and_float_nchw_images_give_the_same_logits(tiny_checkpoint):
    checkpoint = tta.load_checkpoint(tiny_checkpoint)
    method = tta.build_method("source", checkpoint)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(method.adapt(images), method.adapt(as_float))


def test_episodic_ttt_leaves_the_checkpoint_and_resets(tiny_checkpoint):
    checkpoint = tta.load_checkpoint(tiny_checkpoint)
    before = {k: v.clone() for k, v in checkpoint.model.state_dict().items()}
    method = tta.build_method("ttt-online", checkpoint, steps=1, copies=4)
    method.adapt(torch.rand(3, 3, 32, 32))
    assert any(not torch.equal(before[k], v) for k, v in method.state_dict().items())
    method.reset()
    assert all(torch.equal(before[k], v) for k, v in method.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in checkpoint.model.state_dict().items())


@pytest.mark.parametrize(("images", "fragment"), [
    (np.zeros((2, 32, 32, 4), dtype=np.uint8), "(N, H, W, 3)"),
    (torch.zeros(2, 3, 16, 16), "takes 32x32"),
    (np.zeros((2, 3, 32, 32), dtype=np.int64), "uint8 (N, H, W, 3) or float"),
])
def test_images_in_a_wrong_layout_are_one_line_errors(tiny_checkpoint, images, fragment):
    method = tta.build_method("source", tta.load_checkpoint(tiny_checkpoint))
    with pytest.raises(TTAError, match=re.escape(fragment)):
        method.adapt(images)


def test_bad_settings_are_the_clis_errors(tiny_checkpoint):
    checkpoint = tta.load_checkpoint(tiny_checkpoint)
    with pytest.raises(TTAError, match="unknown method"):
        tta.build_method("nope", checkpoint)
    with pytest.raises(TTAError):
        tta.build_method("tent", checkpoint, own={"no_such_setting": 1})
