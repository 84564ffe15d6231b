"""Typed configuration: nested dataclasses loaded from a YAML recipe, then overridden by flags.

Every hyper-parameter lives here, not as literals in loops. `key=value` overrides use dotted
paths (`optim.lr=0.05`) and values are parsed as YAML, so `optim.milestones=[50,75]` works.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tta_cli.errors import TTAError

T = TypeVar("T")


@dataclass
class DataConfig:
    """Where images come from. `source`: cifar10-mini (embedded), cifar10 (torchvision folder),
    or a path to a class-folder tree / .tar(.gz) archive of one."""

    source: str = "cifar10-mini"
    root: str = "data"  # --data-root for torchvision's cifar-10-batches-py
    limit_train: int | None = None  # first n training images (after a seeded shuffle); None = all
    limit_test: int | None = None
    # training crops pad with zeros (black, torchvision's default) or reflect the image; use reflect for
    # BatchNorm models, whose test-batch statistics (norm, tent) zero padding leaves mismatched (data/augment.py)
    pad_mode: str = "zeros"


@dataclass
class ModelConfig:
    """Backbone and split point. `split` names the last encoder stage (layer1|layer2|layer3 for
    ResNets, `blockN` for ViTs); the self-supervised head is a fresh copy of the rest."""

    backbone: str = "preact_resnet"  # preact_resnet | timm_resnet | torchvision_resnet | vit
    depth: int = 26
    width: int = 1
    norm: str = "gn"  # gn | bn
    groups: int = 8
    split: str = "layer2"
    timm_name: str = "resnet18"  # timm_resnet only
    torchvision_name: str = "resnet18"  # torchvision_resnet only
    img_size: int = 32
    patch_size: int = 4  # vit only
    embed_dim: int = 192  # vit only
    vit_depth: int = 12  # vit only
    vit_heads: int = 3  # vit only
    num_classes: int = 10


@dataclass
class TaskConfig:
    """Self-supervised task. rotation: `rotation_mode` expand (all 4 per image) | random (one each).
    masked: hide `mask_ratio` of `patch_size` patches and reconstruct them, as each patch's pixels normalised by
    its own mean and deviation (`norm_targets`, MAE's norm_pix_loss) or as they are."""

    name: str = "rotation"  # rotation | masked
    rotation_mode: str = "expand"
    mask_ratio: float = 0.75
    patch_size: int = 4
    norm_targets: bool = True


@dataclass
class OptimConfig:
    """Joint training: loss = CE(main) + ssl_weight * L(ssl), SGD + momentum + weight decay, or AdamW (ViTs)."""

    optimizer: str = "sgd"  # sgd | adamw (decoupled weight decay, none on biases and norms: MAE's, for ViTs)
    lr: float = 0.1
    momentum: float = 0.9  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw only
    weight_decay: float = 5e-4
    nesterov: bool = False  # sgd only
    batch_size: int = 128
    epochs: int = 150
    schedule: str = "multistep"  # multistep | cosine | onecycle
    milestones: list[int] = field(default_factory=lambda: [75, 125])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    ssl_weight: float = 1.0
    label_smoothing: float = 0.0
    clip_grad_norm: float | None = None  # clip the global gradient norm (guards large-batch GN runs against spikes)


@dataclass
class InitConfig:
    """`tta train --init FILE`: start from a trained classifier. Its weights become the encoder and main head; the
    ssl head is new. The first `ssl_epochs` of optim.epochs train the ssl head alone (encoder and main head frozen,
    their BatchNorm statistics too) at optim.lr; the rest train all of it jointly at `joint_lr`, low, so the
    classifier's accuracy is kept. optim.schedule (with its warm-up) runs within each phase."""

    weights: str | None = None  # the classifier: a .pth/.pt state dict, a .safetensors, or a `tta train` checkpoint
    mean: list[float] | None = None  # per-channel input mean in [0, 1] it was trained with; None: the training set's
    std: list[float] | None = None  # per-channel input std in [0, 1]; None: the training set's
    ssl_epochs: int = 10  # epochs of the ssl head alone, at the start of optim.epochs (all of them: the classifier stays as given)
    joint_lr: float = 0.001  # peak learning rate of the joint epochs that follow


@dataclass
class ProbeConfig:
    """TTT-MAE's training instead of joint training (train/phases.py): the first `ssl_epochs` of optim.epochs train
    the encoder and ssl head on the ssl loss alone, the rest the main head alone on the frozen encoder. 0: joint."""

    ssl_epochs: int = 0
    main_lr: float | None = None  # peak learning rate of the main head's epochs; None: optim.lr


@dataclass
class TrainConfig:
    """Everything `tta train` needs; saved in full beside every checkpoint."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    init: InitConfig = field(default_factory=InitConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    eval_every: int = 5  # epochs between test evaluations (the last epoch always evaluates)
    device: str = "auto"
    seed: int = 0
    compile: bool = False
    # torch.compile's mode for the step: "reduce-overhead" also replays the forward and backward as CUDA graphs,
    # the lever for small, launch-bound batches such as the paper recipe's 128 (docs/speed-notes.md).
    compile_mode: str = "default"
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    # BatchNorm in joint training: statistics of "all" rows (clean images and their ssl views together) or of the
    # "clean" rows only (models/batchnorm.py). "clean" makes norm/tent work better, but online TTT diverged on both
    # such checkpoints measured (docs/results.md, "BatchNorm models"), so "all" stays the default.
    bn_statistics: str = "all"
    channels_last: bool = True  # on CUDA only
    out: str = "runs/train"


PARAM_GROUPS = ("encoder", "encoder+ssl", "norm", "adapters")
CONV_KERNELS = ("auto", "torch", "triton")
PER_SAMPLE = ("auto", "vmap", "grouped")
RESET_KINDS = ("never", "every:N", "on-shift")


@dataclass
class ExecutionSettings:
    """How adaptation runs on the device: speed, not results (bf16 aside). Shared by `tta adapt` and `tta stream`,
    resolved once per device (engine/execution.py); the measurements behind each default: docs/speed-notes.md."""

    amp: bool | None = None  # bf16 autocast on CUDA; None: each path's faster precision (engine.execution.AMP_DEFAULTS)
    compile: bool = True  # torch.compile the hot paths on CUDA, never on the CPU; a failed compile runs eagerly
    cuda_graph: bool = True  # capture the online steps as CUDA graphs and replay them (CUDA only)
    conv_kernels: str = "auto"  # auto | torch | triton: one online stream's convolutions and norms (auto: triton on CUDA)
    pipeline: bool = True  # `tta adapt`, one online stream: predict each batch inside the next update's first forward pass
    overlap: bool = True  # `tta stream`, unpaced: each frame's prediction on a side stream beside the next frame's update
    per_sample: str = "auto"  # per-sample weights: auto (grouped on the CPU, vmap on CUDA) | vmap | grouped
    chunk: int | None = None  # ttt samples adapted at once; None: 512 clipped to free memory on CUDA, 8 on the CPU
    streams: int | None = None  # ttt-online segments adapted side by side; None: 256 on CUDA, 1 on the CPU

    def validate(self) -> None:
        for name in ("chunk", "streams"):
            check_range(name, getattr(self, name), 1)
        check_choice("conv_kernels", self.conv_kernels, CONV_KERNELS)
        check_choice("per_sample", self.per_sample, PER_SAMPLE)


@dataclass
class OnlineSettings:
    """The online update and its policies, shared by `tta adapt` (ttt-online) and `tta stream`."""

    lr: float = 0.001  # SGD learning rate of the self-supervised updates
    copies: int = 32  # augmented views per update (per sample; for tta stream, window draws or copies of the frame)
    momentum: float = 0.0  # SGD momentum
    params: str = "encoder"  # what adapts: encoder | encoder+ssl | norm | adapters (low-rank, on the encoder's convs)
    adapter_rank: int = 4  # --params adapters: channels of each convolution's low-rank branch
    reset: str = "never"  # never | every:N | on-shift: back to the source weights
    rollback: bool = False  # undo updates that raise the ssl loss on fresh views; reset on collapsed predictions
    rollback_margin: float = 0.2  # relative rise of the ssl loss that counts as harmful
    collapse_entropy: float = 0.5  # nats: predicted-class histogram entropy below which predictions have collapsed
    pre_update: bool = False  # predict before the update (lowest latency) instead of after
    # --forget LAMBDA: after every update the weights decay toward the source, w <- (1 - LAMBDA) w + LAMBDA w_source
    # (None: no decay); with `momentum` it is the "surprise with momentum, adaptive forgetting" gate of long streams
    forget: float | None = None
    seed: int = 0

    def validate(self) -> None:
        check_range("copies", self.copies, 1)
        check_range("adapter_rank", self.adapter_rank, 1)
        if self.forget is not None and not 0 <= self.forget <= 1:
            raise TTAError(f"--forget is a decay per step from 0 (none) to 1 (back to the source), got {self.forget}")
        for name in ("lr", "rollback_margin", "collapse_entropy"):
            check_range(name, getattr(self, name), 0)
        check_range("momentum", self.momentum, 0, 1)
        check_choice("--params", self.params, PARAM_GROUPS)
        parse_reset(self.reset)


@dataclass
class AdaptSettings(OnlineSettings, ExecutionSettings):
    """Every shared knob of `tta adapt`; a method's own ones are its `Settings` (`--set tent.lr=0.0005`)."""

    methods: list[str] = field(default_factory=lambda: ["source", "ttt", "ttt-online"])
    steps: int | None = None  # SGD steps per sample; None: the method's own default
    batch: int = 1  # ttt-online: consecutive samples per update
    skip_above: float | None = None  # skip an update when the rotation head's confidence exceeds this
    order: str = "per-corruption"
    dirichlet: float | None = None
    views: int = 1  # --views K: each episodic method's prediction averaged over K views of the sample (adapt/views.py)

    def validate(self) -> None:
        """One-line errors for values no method can run with (the names as `--set` spells them), before any work."""
        OnlineSettings.validate(self)
        ExecutionSettings.validate(self)
        repeated = sorted({name for name in self.methods if self.methods.count(name) > 1})
        if repeated:  # results are keyed by method: a second run would overwrite the first
            raise TTAError(f"--method lists {', '.join(repeated)} more than once")
        check_range("batch", self.batch, 1)
        check_range("--views", self.views, 1)
        check_range("steps", self.steps, 0)
        if self.skip_above is not None and not 0 <= self.skip_above <= 1:
            raise TTAError(f"--skip-above is a probability (0 to 1), got {self.skip_above}")
        if self.dirichlet is not None and not self.dirichlet > 0:
            raise TTAError(f"--dirichlet must be above 0, got {self.dirichlet}")


STREAM_MODES = ("none", "episodic", "implicit", "explicit")
STREAM_MODE_NAMES = {"none": "none", "episodic": "episodic", "implicit": "implicit", "explicit": "explicit+implicit"}


@dataclass
class StreamSettings(OnlineSettings, ExecutionSettings):
    """Every knob of `tta stream run`."""

    mode: str = "explicit"  # none | episodic | implicit | explicit (= explicit + implicit memory)
    window: int = 16  # frames of explicit memory
    steps: int = 1  # updates per frame; 0 = no adaptation
    # a video shows each scene for many frames, so each image gets ~30 updates in a row: a tenth of the per-sample
    # rate (measured on a drifting stream: docs/results.md)
    lr: float = 0.0001
    max_frames: int | None = None
    block: int = 64  # frames per device-to-host copy of the per-frame log
    view_every: float = 0.5  # seconds between progress reports at most
    max_inflight: int = 2  # paced CUDA runs: frames queued on the GPU before the loop waits

    def validate(self) -> None:
        OnlineSettings.validate(self)
        ExecutionSettings.validate(self)
        check_choice("--mode", self.mode, STREAM_MODES)
        for name in ("window", "block", "max_inflight", "max_frames"):
            check_range(f"--{name.replace('_', '-')}", getattr(self, name), 1)
        check_range("--steps", self.steps, 0)

    @property
    def adapting(self) -> bool:
        return self.mode != "none" and self.steps > 0

    @property
    def name(self) -> str:
        return STREAM_MODE_NAMES[self.mode] + ("+rollback" if self.rollback and self.adapting else "")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """A one-line user error for a value outside `choices`."""
    if value not in choices:
        raise TTAError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def parse_reset(text: str) -> tuple[str, int]:
    """`never` | `on-shift` | `every:N` -> (kind, N) (N 0 unless every)."""
    text = text.strip().lower()
    if text in ("never", "on-shift"):
        return text, 0
    if text.startswith("every:"):
        try:
            every = int(text.split(":", 1)[1])
        except ValueError:
            every = 0
        if every <= 0:
            raise TTAError(f"--reset {text!r}: N must be a positive integer, as in every:100")
        return "every", every
    raise TTAError(f"unknown --reset {text!r}; use never, every:N or on-shift")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type[T], values: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys with the valid ones listed."""
    if not isinstance(values, dict):
        raise TTAError(f"config section {where or 'root'!r} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TTAError(f"unknown config key {where + unknown[0]!r}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = from_dict(kind, value or {}, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, kind, f"{where}{name}")
            if name == "seed":
                from tta_cli.validation import check_seed

                check_seed(kwargs[name], f"{where}{name}")
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check (and gently convert: int -> float, scalar -> list) a value against its annotation."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, args[0], key) for v in items]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if kind in (int, float, str, bool) and not isinstance(value, kind):
        raise TTAError(f"config key {key!r} wants {kind.__name__}, got {value!r}")
    if kind is int and isinstance(value, bool):
        raise TTAError(f"config key {key!r} wants int, got {value!r}")
    return value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["optim.lr=0.05", "model.norm=bn"]` -> nested dict with YAML-parsed values."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise TTAError(f"override {pair!r} is not key=value (example: --set optim.lr=0.05)")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise TTAError(f"--set {pair}: the value is not valid YAML ({yaml_problem(error)}); quote it, e.g. --set 'key=\"text\"'") from None
        set_dotted(nested, key.strip(), value)
    return nested


def check_range(name: str, value: float | None, low: float, high: float | None = None) -> None:
    """A one-line error unless `low <= value < high` (no upper end when `high` is None). None means "not set" and
    passes; NaN fails (every comparison with it is false)."""
    if value is None or (value >= low and (high is None or value < high)):
        return
    bound = f"at least {low:g}" if high is None else f"in [{low:g}, {high:g})"
    raise TTAError(f"{name} must be {bound}, got {value}")


def yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: what went wrong and where."""
    problem = getattr(error, "problem", None) or " ".join(str(error).split())
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def set_dotted(nested: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = nested
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `update` into a copy of `base`."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TTAError(f"recipe {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise TTAError(f"recipe {path} is not valid YAML: {yaml_problem(error)}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise TTAError(f"recipe {path} holds a YAML {type(loaded).__name__}; a recipe is a mapping of settings (key: value)")
    return loaded or {}


def load_config(cls: type[T], recipe: str | Path | None, overrides: dict[str, Any]) -> T:
    """Defaults <- recipe YAML <- overrides (flags and --set), validated into `cls`."""
    values = to_dict(cls())
    if recipe is not None:
        values = merge(values, read_yaml(recipe))
    values = merge(values, overrides)
    return from_dict(cls, values)
