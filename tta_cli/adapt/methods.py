"""One factory for every adaptation method, from one typed settings object.

Each method has the same interface: `adapt(images) -> logits`, `reset()`, `counters()`, `name`,
`episodic`. Adding a method touches its own module and one entry here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from tta_cli.adapt.comparators import NormAdapt, SourceModel, Tent
from tta_cli.adapt.episodic import EpisodicConfig, EpisodicTTT
from tta_cli.adapt.online import OnlineConfig, OnlineTTT, check_conv_kernels
from tta_cli.adapt.params import check_per_sample
from tta_cli.adapt.policies import ResetPolicy, RollbackPolicy
from tta_cli.config import check_range
from tta_cli.errors import TTAError

METHODS = ("source", "norm", "tent", "ttt", "ttt-online")
EPISODIC = ("source", "ttt")  # every sample on its own: these split over torchrun processes, the others are sequential


@dataclass
class AdaptSettings:
    """Every knob of `tta adapt`; `steps` None means the method's default (ttt 10, ttt-online 1)."""

    methods: list[str] = field(default_factory=lambda: ["source", "ttt", "ttt-online"])
    steps: int | None = None
    lr: float = 0.001
    copies: int = 32
    momentum: float = 0.0
    params: str = "encoder"
    batch: int = 1  # ttt-online mini-batch of consecutive samples
    chunk: int | None = None  # ttt samples adapted at once (None: sized to free GPU memory)
    per_sample: str = "auto"  # ttt and parallel ttt-online streams: "auto", "vmap" or "grouped" (UpdateConfig)
    reset: str = "never"
    rollback: bool = False
    rollback_margin: float = 0.2
    collapse_entropy: float = 0.5
    skip_above: float | None = None
    pre_update: bool = False
    tent_lr: float = 1e-3
    comparator_batch: int = 200  # norm and tent batches, as in Tent
    order: str = "per-corruption"
    dirichlet: float | None = None
    # bf16 autocast on CUDA; None picks, per method, what measured fastest for the reference ResNet-26 on the
    # H200 (docs/speed-notes.md): bf16 for ttt (compiled 405 vs 49.8 samples/s fp32), fp32 for one ttt-online
    # stream (compiled 533 vs 494 bf16: the casts cost more than they save on a 0.64M-parameter network), bf16 for
    # ttt-online streams side by side (15 streams: 2,545 vs 1,693 fp32), fp32 for source/norm/tent. Set it
    # (--set amp=true|false) to force one choice everywhere.
    amp: bool | None = None
    cuda_graph: bool = True
    # torch.compile the ttt / ttt-online hot paths on CUDA (never on the CPU, where compiling costs more than
    # short runs gain). The first call compiles (tens of seconds); a failed compile falls back to eager.
    compile: bool = True
    # ttt-online: independent streams (the segments of an order that resets between them, e.g. per-corruption)
    # adapted side by side, each on its own weights, with exactly the updates it would get alone. None: up to
    # 256 at once on CUDA, one at a time on the CPU. Policies that decide per sample (reset every:N/on-shift,
    # rollback, --pre-update, --batch > 1) always run one stream at a time.
    streams: int | None = None
    # ttt-online, one stream: channels_last weights and inputs, and cuDNN's autotuner for the fixed step shapes
    # (torch.backends.cudnn.benchmark, process-wide), the levers the profile of the step pointed at. Measured on
    # the H200 (fp32, compiled, CUDA graph; docs/speed-notes.md): channels_last 476 vs 534 samples/s (slower),
    # cudnn_benchmark 535 (no change). So both stay off.
    channels_last: bool = False
    cudnn_benchmark: bool = False
    # ttt-online, one stream: auto | torch | triton, who runs the convolutions (OnlineConfig). auto = per operation
    # and shape the faster of cuDNN and the Triton kernels, on CUDA: 704 vs 567 samples/s for the pipelined fp32
    # step on the H200 (benchmarks/adapt_speed.py). Streams side by side keep torch's (vmap).
    conv_kernels: str = "auto"
    # ttt-online, one stream: predict each sample inside the next sample's first forward pass (exactly the same
    # result, one forward pass fewer per sample): 570 vs 534 samples/s on the H200, so on. It applies only where
    # nothing acts between a prediction and the next update (no rollback, --pre-update or reset every:N).
    pipeline: bool = True
    seed: int = 0

    def validate(self) -> None:
        """One-line errors for values no method can run with (the names as `--set` spells them), before any work;
        unknown methods, --params, --reset and --order are checked where they are parsed."""
        repeated = sorted({name for name in self.methods if self.methods.count(name) > 1})
        if repeated:  # results are keyed by method: a second run would overwrite the first
            raise TTAError(f"--method lists {', '.join(repeated)} more than once")
        for name in ("copies", "batch", "comparator_batch", "chunk", "streams"):
            check_range(name, getattr(self, name), 1)
        for name in ("steps", "lr", "tent_lr", "rollback_margin", "collapse_entropy"):
            check_range(name, getattr(self, name), 0)
        check_range("momentum", self.momentum, 0, 1)
        if self.skip_above is not None and not 0 <= self.skip_above <= 1:
            raise TTAError(f"--skip-above is a probability (0 to 1), got {self.skip_above}")
        if self.dirichlet is not None and not self.dirichlet > 0:
            raise TTAError(f"--dirichlet must be above 0, got {self.dirichlet}")
        check_per_sample(self)
        check_conv_kernels(self.conv_kernels)


def build_method(name: str, model: torch.nn.Module, task, settings: AdaptSettings, classes: int, device: torch.device):
    """A fresh copy of the model per method, so methods never see each other's changes."""
    if name not in METHODS:
        raise TTAError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}")
    if settings.skip_above is not None and not hasattr(task, "confidence"):
        raise TTAError(f"--skip-above needs the rotation task; this checkpoint's task is {task.name}")
    model = copy.deepcopy(model).to(device)
    if name == "source":
        return SourceModel(model, bool(settings.amp))
    if name == "norm":
        return NormAdapt(model, bool(settings.amp))
    if name == "tent":
        return Tent(model, settings.tent_lr, bool(settings.amp))
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    update = {
        "lr": settings.lr, "copies": settings.copies, "momentum": settings.momentum, "params": settings.params, "per_sample": settings.per_sample,
    }
    if name == "ttt":
        config = EpisodicConfig(
            steps=10 if settings.steps is None else settings.steps,
            **update,
            skip_above=settings.skip_above,
            chunk=settings.chunk,
            amp=True if settings.amp is None else settings.amp,
            compile=settings.compile and device.type == "cuda",
        )
        return EpisodicTTT(model, task, config, generator)
    use_graph = settings.cuda_graph and device.type == "cuda"
    if use_graph:  # graph capture draws from the default CUDA generator, seeded here
        torch.cuda.manual_seed(settings.seed)
        generator = None
    config = OnlineConfig(
        steps=1 if settings.steps is None else settings.steps,
        **update,
        batch=settings.batch,
        skip_above=settings.skip_above,
        reset=ResetPolicy.parse(settings.reset),
        rollback=RollbackPolicy(enabled=settings.rollback, margin=settings.rollback_margin, min_entropy=settings.collapse_entropy),
        pre_update=settings.pre_update,
        amp=bool(settings.amp),
        parallel_amp=True if settings.amp is None else settings.amp,
        cuda_graph=use_graph,
        compile=settings.compile and device.type == "cuda",
        channels_last=settings.channels_last,
        cudnn_benchmark=settings.cudnn_benchmark,
        conv_kernels=settings.conv_kernels,
        pipeline=settings.pipeline,
    )
    streams = settings.streams if settings.streams is not None else (256 if device.type == "cuda" else 1)
    return OnlineTTT(model, task, config, classes, generator, streams=streams)


def batch_size_for(method, settings: AdaptSettings, total: int) -> int:
    """How many samples the runner hands the method at once."""
    if method.name == "ttt-online":
        return settings.batch
    if method.name in ("norm", "tent"):
        return settings.comparator_batch
    return 2048 if method.name == "ttt" else 1000  # ttt's under torchrun; in one process it sizes its own (EpisodicTTT.batch_size)
