"""Per-sample weights without vmap: S copies of the CIFAR pre-activation ResNet folded into one grouped network.

vmap's episodic path spends much of its device time moving data (docs/speed-notes.md): vmap folds the sample
dimension into convolution groups with copies, and cuDNN transposes every NCHW grouped convolution to NHWC and back.
Here the fold is the layout itself: the views of S samples are one batch of (views, S * channels, H, W), sample s
owning channels [s * C, (s + 1) * C) at every layer, so each convolution is one grouped convolution (groups = S, the
weights of the S samples stacked), each GroupNorm one GroupNorm with S times the groups (a group never spans two
samples), and the tensor can stay channels-last from input to loss. The S losses are independent, so the gradient of
their sum is each sample's own gradient: plain autograd, no vmap.

It is faster than vmap on the CPU but slower on CUDA (docs/speed-notes.md): cuDNN runs a grouped convolution of
hundreds of groups as many small kernels, each with its own layout transposes, whatever layout it is handed. So
`per_sample=auto` folds on the CPU only.

Only the modules of the CIFAR pre-activation ResNet with the rotation task are folded (`supports`); anything else
keeps vmap (`PerSampleModel`). tests/test_adapt_grouped.py and test_adapt_episodic.py hold it equal to vmap and to
the sequential loop in float64.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from tta_cli.engine.compiled import maybe_compile
from tta_cli.engine.per_sample import PerSampleModel, check_per_sample
from tta_cli.models.features import GlobalPool
from tta_cli.models.preact_resnet import Downsample, NormReLU, PreActBlock
from tta_cli.tasks.rotation import RotationTask

FOLDABLE = (nn.Sequential, PreActBlock, Downsample, NormReLU, nn.Conv2d, nn.GroupNorm, nn.ReLU, GlobalPool, nn.Linear)


def supports(model: nn.Module, task) -> bool:
    """True when every module of the model is one the fold knows (GroupNorm, not BatchNorm) and the task is rotation."""
    parts = (model.encoder, model.main_head, model.ssl_head)
    foldable = all(isinstance(m, FOLDABLE) for part in parts for m in part.modules())
    maps = all(m.kind == "map" for part in parts for m in part.modules() if isinstance(m, GlobalPool))
    return isinstance(task, RotationTask) and foldable and maps


def per_sample_model(model: nn.Module, task, names: list[str], config) -> PerSampleModel:
    """The per-sample machinery an UpdateConfig's `per_sample` asks for (with its `skip_above`, `compile` and
    `amp`); "grouped" falls back to vmap for models it cannot fold, an unknown value is a user error."""
    check_per_sample(config)
    gate = config.skip_above is not None
    device = next(model.parameters()).device
    wanted = ("grouped" if device.type == "cpu" else "vmap") if config.per_sample == "auto" else config.per_sample
    if wanted == "grouped" and supports(model, task):
        return GroupedPerSampleModel(model, task, names, gate, config.compile, config.amp, channels_last=device.type == "cuda")
    return PerSampleModel(model, task, names, gate, config.compile, config.amp)


class FoldedNetwork:
    """Evaluates a module tree on folded inputs (views, S * C, H, W) with every weight given per sample as
    (S, *shape): `adapted` holds the moving ones, `shared` the frozen ones repeated S times."""

    def __init__(self, adapted: dict[str, torch.Tensor], shared: dict[str, torch.Tensor], samples: int):
        self.weights, self.samples = {**shared, **adapted}, samples

    def run(self, module: nn.Module, x: torch.Tensor, prefix: str) -> torch.Tensor:
        """`module`'s output for all S samples at once; x is folded (views, S * C, H, W), `prefix` the module's name."""
        if isinstance(module, (nn.Sequential, NormReLU)):
            for name, child in module.named_children():
                x = self.run(child, x, f"{prefix}{name}.")
            return x
        if isinstance(module, PreActBlock):
            residual = self.run(module.conv1, torch.relu(self.run(module.norm1, x, f"{prefix}norm1.")), f"{prefix}conv1.")
            residual = self.run(module.conv2, torch.relu(self.run(module.norm2, residual, f"{prefix}norm2.")), f"{prefix}conv2.")
            return (x if module.shortcut is None else self.run(module.shortcut, x, f"{prefix}shortcut.")) + residual
        if isinstance(module, nn.Conv2d):
            weight = self.weights[f"{prefix}weight"]
            weight = weight.reshape(-1, *weight.shape[2:])  # (S * out, in, k, k): sample s's filters are group s
            bias = None if module.bias is None else self.weights[f"{prefix}bias"].reshape(-1)
            return functional.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups * self.samples)
        if isinstance(module, nn.GroupNorm):
            weight, bias = self.weights[f"{prefix}weight"].reshape(-1), self.weights[f"{prefix}bias"].reshape(-1)
            return functional.group_norm(x, module.num_groups * self.samples, weight, bias, module.eps)
        if isinstance(module, nn.ReLU):
            return torch.relu(x)
        if isinstance(module, Downsample):
            if module.stride > 1:
                x = functional.avg_pool2d(x, module.stride)
            views, channels, height, width = x.shape
            per_sample = x.reshape(views, self.samples, channels // self.samples, height, width)
            return functional.pad(per_sample, (0, 0, 0, 0, 0, module.extra)).reshape(views, -1, height, width)
        if isinstance(module, GlobalPool):
            pooled = x.mean(dim=(2, 3))  # (views, S * C)
            return pooled.reshape(pooled.shape[0], self.samples, -1)  # (views, S, C)
        if isinstance(module, nn.Linear):  # after GlobalPool: (views, S, C) -> (views, S, outputs)
            out = torch.einsum("vsc,soc->vso", x, self.weights[f"{prefix}weight"])
            return out if module.bias is None else out + self.weights[f"{prefix}bias"]
        raise TypeError(f"no folded form for {type(module).__name__}")


def fold(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(S, views, C, H, W) -> (views, S * C, H, W), sample-major channels."""
    samples, views, channels, height, width = images.shape
    folded = images.transpose(0, 1).reshape(views, samples * channels, height, width)
    return folded.contiguous(memory_format=torch.channels_last) if channels_last else folded


class GroupedPerSampleModel(PerSampleModel):
    """PerSampleModel's interface (gradients, predict, sgd_steps over a leading copy dimension S) computed by one
    folded network instead of vmap. `channels_last`: keep the folded activations NHWC (CUDA)."""

    def __init__(
        self,
        model: nn.Module,
        task,
        names: list[str],
        with_confidence: bool = False,
        compile: bool = False,
        amp: bool = False,
        channels_last: bool = False,
    ):
        self.channels_last = channels_last
        self.shared_names = [name for name, _ in model.named_parameters() if name not in names]
        self._shared: tuple[int, dict[str, torch.Tensor]] | None = None
        super().__init__(model, task, names, with_confidence, compile, amp)

    def shared_stacks(self, samples: int) -> dict[str, torch.Tensor]:
        """The frozen weights repeated for `samples` samples, made once per chunk size rather than at every call
        (the frozen heads are most of the network's weights)."""
        if self._shared is None or self._shared[0] != samples:
            stacks = {name: self.frozen[name].expand(samples, *self.frozen[name].shape).contiguous() for name in self.shared_names}
            self._shared = (samples, stacks)
        return self._shared[1]

    def _build(self, model: nn.Module, task, with_confidence: bool, compile: bool):
        """The folded twin of PerSampleModel._build; the loss and confidence are RotationTask's, per sample."""
        channels_last = self.channels_last

        def ssl_losses(params: dict[str, torch.Tensor], shared: dict[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor):
            """Per-sample ssl loss (S,) and, with the gate, per-sample mean probability of the true rotation (S,)."""
            samples, views = targets.shape
            folded = FoldedNetwork(params, shared, samples)
            features = folded.run(model.encoder, fold(model.normalize(inputs), channels_last), "encoder.")
            outputs = folded.run(model.ssl_head, features, "ssl_head.").float()  # (views, S, 4), as task.loss casts
            flat_outputs = outputs.transpose(0, 1).reshape(samples * views, -1)
            losses = functional.cross_entropy(flat_outputs, targets.reshape(-1), reduction="none").view(samples, views).mean(1)
            if not with_confidence:
                return losses, losses.detach()
            probabilities = flat_outputs.softmax(dim=1).gather(1, targets.reshape(-1, 1)).view(samples, views).mean(1)
            return losses, probabilities.detach()

        compiled_losses = maybe_compile(ssl_losses, compile)  # forward compiled; autograd runs its compiled backward

        def gradients(params: dict[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor):
            leaves = {name: tensor.detach().requires_grad_(True) for name, tensor in params.items()}
            with torch.enable_grad():
                losses, confidence = compiled_losses(leaves, self.shared_stacks(targets.shape[0]), inputs, targets)
                grads = torch.autograd.grad(losses.sum(), list(leaves.values()))  # samples are independent: own grads
            return dict(zip(leaves, grads, strict=True)), confidence

        def predict(params: dict[str, torch.Tensor], shared: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
            folded = FoldedNetwork(params, shared, images.shape[0])
            features = folded.run(model.encoder, fold(model.normalize(images.unsqueeze(1)), channels_last), "encoder.")
            return folded.run(model.main_head, features, "main_head.").squeeze(0)  # (S, classes)

        compiled_predict = maybe_compile(predict, compile)

        def predict_with_shared(params: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
            return compiled_predict(params, self.shared_stacks(images.shape[0]), images)

        return gradients, predict_with_shared
