"""benchmarks/gradient_alignment.py: what its cosine predicts, and the script end to end on a tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import REPO
from torch import nn

import tta_cli as tta

sys.path.insert(0, str(REPO / "benchmarks"))
from gradient_alignment import gradients  # noqa: E402

from tta_cli.tasks.views import make_views  # noqa: E402


def test_a_small_ssl_step_changes_the_main_loss_by_minus_lr_times_the_gradients_product(tiny_checkpoint):
    """The first-order reading the script's table rests on, in float64: the sign of <g_main, g_ssl> is whether
    one TTT step helps."""
    checkpoint = tta.load_checkpoint(tiny_checkpoint)
    model = checkpoint.model.double().eval()
    image = torch.rand(3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    label = torch.tensor(3)
    inputs, targets = make_views(checkpoint.task, image[None].float(), 4, torch.Generator().manual_seed(1))
    views = (inputs.double(), targets.double() if targets.is_floating_point() else targets)
    g_ssl, g_main = gradients(model, checkpoint.task, image, label, views)
    lr = 1e-5
    main_loss = lambda: nn.functional.cross_entropy(model(image[None]), label[None]).item()  # noqa: E731
    before = main_loss()
    with torch.no_grad():
        offset = 0
        for param in model.encoder.parameters():
            param -= lr * g_ssl[offset : offset + param.numel()].view_as(param)
            offset += param.numel()
    predicted = -lr * torch.dot(g_main, g_ssl).item()
    assert abs((main_loss() - before) - predicted) <= 1e-3 * abs(predicted) + 1e-14


def test_the_script_prints_a_cosine_per_corruption(tiny_checkpoint, corrupt_folder, tmp_path):
    out = tmp_path / "alignment.json"
    run = subprocess.run([sys.executable, "benchmarks/gradient_alignment.py", str(corrupt_folder), str(tiny_checkpoint),
                          "--n", "3", "--copies", "2", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "gaussian_noise" in run.stdout and "fog" in run.stdout
    table = json.loads(out.read_text())["table"][str(tiny_checkpoint)]
    assert set(table) == {"gaussian_noise", "fog"}
    assert all(-1 <= mean <= 1 and 0 <= positive <= 1 for mean, _, positive in table.values())
