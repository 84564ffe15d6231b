"""A method is one module behind one interface: registering it is all `tta adapt` and results.json need."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from conftest import run_cli
from test_cli_adapt import TINY_ADAPT_ARGS

from tta_cli.adapt.methods import REGISTRY, register
from tta_cli.adapt.methods.base import Method


@dataclass
class ToySettings:
    scale: float = 1.0  # multiplies the source model's logits


@pytest.fixture
def toy_method():
    """A test-only method, registered for the test and removed after it."""

    @register
    class Toy(Method):
        name = "toy"
        episodic = True
        semantics = "Scaled logits: the source model's logits times `scale`. Nothing adapts."
        updates = "nothing"
        default_batch = 7
        Settings = ToySettings

        def __init__(self, model, task, settings, common, classes, device):
            super().__init__(model.eval(), task, settings, common, classes, device)
            self.calls = 0

        @torch.no_grad()
        def adapt(self, images: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.model(images) * self.settings.scale

        def counters(self) -> dict[str, int]:
            return {"calls": self.calls}

    yield Toy
    del REGISTRY["toy"]


def test_a_registered_method_appears_in_the_help_and_runs_with_its_own_settings(toy_method, tiny_checkpoint, tmp_path):
    assert "toy" in run_cli(["adapt", "--help"]).stdout
    out = tmp_path / "adapt"
    result = run_cli(["adapt", "--ckpt", tiny_checkpoint, "--method", "source,toy", *TINY_ADAPT_ARGS, "--set", "toy.scale=2", "--out", out])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["toy"] == {"scale": 2.0}
    assert results["semantics"]["toy"]["computes"].startswith("Scaled logits")
    assert results["methods"]["toy"]["counters"] == {"calls": 3}  # 20 samples in batches of default_batch 7
    assert results["table"]["mean"]["toy"] == results["table"]["mean"]["source"]  # scaling keeps the argmax


def test_a_method_setting_of_the_wrong_type_is_a_one_line_error(toy_method, tiny_checkpoint):
    result = run_cli(["adapt", "--ckpt", tiny_checkpoint, "--method", "toy", *TINY_ADAPT_ARGS, "--set", "toy.scale=[1]"])
    assert result.exit_code == 2 and "toy.scale" in result.stderr


def test_builtin_methods_describe_themselves():
    for name, cls in REGISTRY.items():
        assert cls.name == name and cls.semantics and cls.updates and cls.default_batch >= 1
