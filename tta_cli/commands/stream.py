"""`tta stream`: make labelled drifting video streams, and classify + adapt on a stream frame by frame, live."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from tta_cli.commands.common import (
    INTERRUPTED_EXIT,
    CkptOpt,
    DataOpt,
    DataRootOpt,
    DeviceOpt,
    ForceOpt,
    OutOpt,
    SeedOpt,
    StreamSetOpt,
    console,
    help_text,
    single_process,
    user_errors,
)
from tta_cli.config import StreamSettings, load_config, merge, parse_overrides
from tta_cli.errors import TTAError

LOG_WIDTH = 120  # columns of the results table when output goes to a file or pipe (rich assumes 80)
ACTIVATION_FACTOR = 64  # bytes of activations and gradients per input byte in an update, a generous bound for small networks

MAKE_EXAMPLES = """
A stream is clips of --clip-length frames, each showing one test image under a smooth pan/zoom; every
--segment-clips clips (40) the corruption changes, its severity rising from ~0 to --max-severity and back.
Writes stream.mp4 (lossless), frames.npy, labels.npy, schedule.csv (frame, clip, label, corruption,
severity) and stream.json; `tta stream run` finds the labels and the schedule beside the video.

Examples:
  tta stream make --out runs/stream
  tta stream make --out runs/long --frames 20000 --corruptions all --seed 1
  tta stream make --data cifar10 --corruptions fog,clean,snow --out runs/fog
  tta stream make --out /tmp/quick --frames 300 --clip-length 10 --no-video
"""

RUN_EXAMPLES = """
Modes (--mode): none (no adaptation), episodic (adapt on the frame, then back to the trained weights),
implicit (weights carried from frame to frame), explicit (default: implicit memory plus each update
trains on --copies frames drawn from the last --window frames, with fresh crops, flips and rotations).

Examples:
  tta stream run runs/stream/stream.mp4 --ckpt runs/quickstart
  tta stream run runs/stream --ckpt runs/sun --compare --out cmp --plot t.png
  tta stream run clip.mp4 --ckpt runs/sun --fps native --labels labels.npy
  tta stream run runs/stream --ckpt runs/sun --mode implicit --reset on-shift
  ffmpeg -i cam.mp4 -f rawvideo -pix_fmt rgb24 - | \\
    tta stream run - --stdin-size 640x480 --ckpt runs/sun --fps 30
"""


def register(app: typer.Typer) -> None:
    stream_app = typer.Typer(
        name="stream",
        help="Online test-time training on video: make labelled drifting streams, run a checkpoint on a stream live.",
        no_args_is_help=True,
        add_completion=False,
        rich_markup_mode="rich",
    )
    stream_app.command("make", help=help_text(make_command, MAKE_EXAMPLES))(user_errors(single_process(make_command)))
    stream_app.command("run", help=help_text(run_command, RUN_EXAMPLES))(user_errors(single_process(run_command)))
    app.add_typer(stream_app, name="stream")


# ---- tta stream make --------------------------------------------------------------------------


def make_command(
    out: OutOpt = None,
    data: DataOpt = None,
    data_root: DataRootOpt = None,
    frames: Annotated[int, typer.Option("--frames", help="Frames in the stream.")] = 3000,
    clip_length: Annotated[int, typer.Option("--clip-length", help="Frames per clip: one image, one label, one smooth pan/zoom.")] = 30,
    segment_clips: Annotated[
        int | None,
        typer.Option("--segment-clips", help="Clips per corruption segment, the severity ramping up and down over it (40: 40 s at 30 fps)."),
    ] = None,
    corruptions: Annotated[
        str,
        typer.Option(
            "--corruptions", help="Comma list in stream order, cycled: names, `all` (the 15), `extra`, or `clean` (no corruption)."
        ),
    ] = "all",
    max_severity: Annotated[int, typer.Option("--max-severity", help="Peak severity of each segment, 0 to 5.")] = 5,
    size: Annotated[int | None, typer.Option("--size", help="Frame side in pixels (default: the images' own, 32 for CIFAR-10).")] = None,
    fps: Annotated[float, typer.Option("--fps", help="Frame rate written into the video.")] = 30.0,
    video: Annotated[bool, typer.Option("--video/--no-video", help="Also write stream.mp4 (lossless H.264 RGB, needs PyAV).")] = True,
    force: ForceOpt = False,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Make a labelled drifting test stream from the test split of --data (default: the embedded cifar10-mini)."""
    from tta_cli.outputs import check_out_folder
    from tta_cli.stream.make import StreamRecipe, make_stream_command

    if out is None:
        raise TTAError("tta stream make needs --out DIR: the folder that receives stream.mp4, frames.npy, labels.npy and schedule.csv")
    check_out_folder(out, force)
    recipe = StreamRecipe(frames=frames, clip_length=clip_length, corruptions=corruptions, max_severity=max_severity,
                          seed=0 if seed is None else seed, size=size, segment_clips=segment_clips, fps=fps, video=video)
    recipe.check()
    source = data or "cifar10-mini"
    console.print(f"[bold]tta stream make[/] {frames:,} frames from {escape(source)} -> {escape(str(out))}", highlight=False, soft_wrap=True)
    with console.status(f"making a {frames}-frame stream from {source} ..."):
        summary = make_stream_command(source, out, recipe, device, data_root)
    print_stream_summary(summary)


def print_stream_summary(summary: dict) -> None:
    table = Table(title="tta stream make", show_header=False, box=box.SIMPLE)
    names = summary["corruptions"]
    shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
    rows = {
        "frames": f"{summary['frames']:,} in {summary['clips']:,} clips",
        "frame size": f"{summary['size']} x {summary['size']}",
        "corruptions": shown,
        "max severity": str(summary["max_severity"]),
        "seed": str(summary["seed"]),
        "video fps": f"{summary['fps']:g}",
        "device": summary["device"],
    }
    rows.update({f"file ({kind})": path for kind, path in summary["files"].items()})
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)
    console.print(f"next: tta stream run {summary['out']} --ckpt CHECKPOINT", highlight=False)


# ---- tta stream run ---------------------------------------------------------------------------


def run_command(
    source: Annotated[
        str,
        typer.Argument(
            help="A video file, a folder of jpg/png frames or from `tta stream make`, a (T, H, W, 3) uint8 .npy, or - (raw RGB on stdin)."
        ),
    ],
    ckpt: CkptOpt,
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="Per-frame labels (-1: unknown): a labels.npy, a schedule.csv or a stream folder. Default: found beside SOURCE.",
        ),
    ] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="none | episodic | implicit | explicit (default explicit).")] = None,
    window: Annotated[int | None, typer.Option("--window", help="Explicit memory: the last W frames updates draw from (16).")] = None,
    copies: Annotated[
        int | None, typer.Option("--copies", help="Images per update: window draws, or copies of the frame (32).")
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Updates per frame (1); 0 = no adaptation.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="SGD learning rate of the updates (0.0001: each scene lasts many frames).")] = None,
    params: Annotated[str | None, typer.Option("--params", help="What adapts: encoder | encoder+ssl | norm (encoder).")] = None,
    reset: Annotated[str | None, typer.Option("--reset", help="never | every:N (frames) | on-shift, as in `tta adapt` (never).")] = None,
    rollback: Annotated[
        bool | None, typer.Option("--rollback/--no-rollback", help="Undo updates that raise the ssl loss; reset on collapse.")
    ] = None,
    pre_update: Annotated[
        bool, typer.Option("--pre-update", help="Predict each frame before its update (lowest latency); default after.")
    ] = False,
    fps: Annotated[
        str | None,
        typer.Option(
            "--fps",
            help="Pace SOURCE like a live camera at F frames/s, or `native` (the video's rate); behind, updates are skipped, never frames.",
        ),
    ] = None,
    max_frames: Annotated[int | None, typer.Option("--max-frames", help="Stop after n frames.")] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Run every mode (and rollback off/on) on SOURCE and print error per run.")
    ] = False,
    stdin_size: Annotated[str | None, typer.Option("--stdin-size", help="Frame size WxH of raw RGB24 frames on stdin (SOURCE -).")] = None,
    out: OutOpt = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG: rolling accuracy and ssl loss over the frames, shift shaded.")
    ] = None,
    save_adapted: Annotated[
        Path | None, typer.Option("--save-adapted", help="Write the final adapted weights as a checkpoint folder (--ckpt loads it).")
    ] = None,
    force: ForceOpt = False,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    overrides: StreamSetOpt = None,
) -> None:
    """Classify every frame of SOURCE with a `tta train` checkpoint while adapting it online, with a live view.

    --out writes frames.csv and frames.jsonl (one row per frame: number, file name for a folder of images, time,
    class, confidence, adapted, rolled back, ssl loss, latency) and summary.json (accuracy, latency p50/p95/max,
    fps, counts). --set takes any StreamSettings key (e.g. --set momentum=0.9 --set amp=false). On CUDA each
    convolution runs on the faster of cuDNN and tta's Triton kernels, timed once per shape, and each GroupNorm +
    ReLU as one Triton kernel (--set conv_kernels=torch for torch's kernels only). Unpaced, each frame's prediction
    runs beside the next frame's update on a second CUDA stream, the same weights and logits (--set overlap=false:
    right after its own update). Ctrl-C stops early, writes the results of the frames seen (marked "interrupted" in
    summary.json and manifest.json; never over an earlier result in --out) and exits 130.
    --save-adapted DIR writes the weights the stream ended on as a checkpoint that `tta adapt --ckpt DIR` loads.
    """
    from tta_cli.device import resolve_device
    from tta_cli.outputs import check_out_file, check_out_folder
    from tta_cli.stream.loop import comparison_settings
    from tta_cli.stream.sources import open_frames
    from tta_cli.tasks import build_task
    from tta_cli.train.checkpoint import load_model

    settings = stream_settings(
        {
            "mode": mode,
            "window": window,
            "copies": copies,
            "steps": steps,
            "lr": lr,
            "params": params,
            "reset": reset,
            "rollback": rollback,
            "pre_update": pre_update or None,
            "max_frames": max_frames,
            "seed": seed,
        },
        overrides,
    )
    if compare and source == "-":
        raise TTAError("--compare reads SOURCE once per run; give a file or folder, not stdin")
    check_out_folder(out, force)
    check_out_file(plot, force, "--plot")
    check_saveable(save_adapted, force, settings, compare)
    torch_device = resolve_device(device or "auto")
    model, train_config, meta = load_model(ckpt, torch_device)
    class_names = list(meta["class_names"])
    check_stream_memory(settings, train_config.model.img_size)
    frames = open_frames(source, size=train_config.model.img_size, stdin_size=stdin_size)
    truth = find_labels(source, labels)
    check_labels(truth, class_names, ckpt, frames.length)
    pace = parse_fps(fps, frames.native_fps)
    console.print(
        f"[bold]tta stream run[/] {escape(frames.description)} ({frames.length or 'unknown number of'} frames"
        f"{f', paced at {pace:g} fps' if pace else ''}) on {torch_device}; labels: {'yes' if truth else 'none'}",
        highlight=False,
    )
    task = build_task(train_config.task, train_config.data.pad_mode)
    runs = comparison_settings(settings) if compare else [settings]
    results = []
    with frames:
        for run_settings in runs:
            result = run_live(model, task, frames, run_settings, truth, class_names, pace, torch_device, transient=compare)
            results.append(result)
            if result.interrupted:
                console.print(f"stopped by Ctrl-C after {len(result):,} frames; the results cover those")
                break
    from tta_cli.stream.report import attach_paired_differences

    interrupted = results[-1].interrupted
    check_frames_seen(results[-1], truth, frames.length, interrupted)
    attach_paired_differences(results, truth)
    print_results(results, compare)
    replacing = out is not None and out.exists() and any(out.iterdir())
    if interrupted and replacing:
        console.print(f"the interrupted run's results were not written: {out} keeps its earlier, complete result")
    elif out is not None:
        context = {"checkpoint": str(ckpt), "source": source, "device": str(torch_device), "interrupted": interrupted}
        write_outputs(out, results, truth, class_names, context, frames.file_names)
    if plot is not None and not (interrupted and plot.exists()):
        from tta_cli.plots import stream_timeline
        from tta_cli.stream.report import timeline

        console.print(f"wrote {stream_timeline(plot, timeline(results, truth))}")
    check_finite(results)
    if save_adapted is not None and interrupted:
        console.print(f"the adapted weights were not written to {save_adapted}: the stream was interrupted")
    elif save_adapted is not None:
        write_adapted(save_adapted, results[-1], model, train_config, meta)
    if interrupted:
        raise typer.Exit(INTERRUPTED_EXIT)


def check_saveable(save_adapted: Path | None, force: bool, settings, compare: bool) -> None:
    """--save-adapted needs one run that carries its weights: not --compare (whose run?), not a mode that ends
    every frame on the trained weights."""
    from tta_cli.outputs import check_out_folder
    from tta_cli.validation import refuse_together

    if save_adapted is None:
        return
    if compare:
        refuse_together("--save-adapted", "--compare", "--compare runs every mode and each ends on other weights; save one --mode's run")
    if not settings.adapting or settings.mode == "episodic":
        why = "it goes back to the trained weights after every frame" if settings.mode == "episodic" else "it does not adapt"
        refuse_together("--save-adapted", f"--mode {settings.mode}" + (" --steps 0" if settings.steps == 0 else ""), why)
    check_out_folder(save_adapted, force, "--save-adapted")


def write_adapted(out: Path, result, source_model, train_config, meta: dict) -> None:
    """The run's final weights as a checkpoint folder `out` (model.safetensors + model.yaml, under the source's config)."""
    from tta_cli.outputs import staged_folder
    from tta_cli.train.checkpoint import save_adapted

    metrics = {**meta.get("metrics", {}), "adapted_by": f"tta stream run --mode {result.settings.mode}", "adapted_frames": len(result),
               "adapted_counters": result.counters}
    with staged_folder(out, "tta stream run --save-adapted") as folder:
        save_adapted(folder, result.adapted, source_model, train_config, meta["class_names"], metrics)
    console.print(f"wrote the adapted weights ({result.name}, {len(result):,} frames) to {out}", highlight=False)


def check_stream_memory(settings, size: int) -> None:
    """The window of frames and an update's batch (float32, with the activations of a small network) must fit."""
    from tta_cli.validation import check_memory

    frame_bytes = 3 * size * size * 4
    check_memory(settings.window * frame_bytes + settings.copies * frame_bytes * ACTIVATION_FACTOR, "--window and --copies")


def check_frames_seen(result, truth, expected: int | None, interrupted: bool) -> None:
    """A source of unknown length (stdin) is checked at its end: it gave frames, and as many as there are labels."""
    if interrupted:
        return
    if len(result) == 0:
        raise TTAError("SOURCE gave no frames (empty input); nothing to classify")
    if truth is not None and expected is None and result.settings.max_frames is None and len(truth.labels) != len(result):
        raise TTAError(f"there are {len(truth.labels)} labels for {len(result)} frames; give one label per frame (-1: unknown)")


def check_finite(results) -> None:
    """After the outputs (which show where it happened): NaN or infinite predictions mean the updates diverged,
    and the run's accuracy counts arbitrary classes, so it ends as an error."""
    for result in results:
        nonfinite, frames = result.summary["nonfinite_frames"], result.summary["frames"]
        if nonfinite:
            raise TTAError(
                f"{result.name}: {nonfinite} of {frames} frames had NaN or infinite predictions, so the adaptation diverged; "
                "lower --lr or add --rollback"
            )


def stream_settings(flags: dict, overrides: list[str] | None):
    """Defaults <- flags <- --set, validated (bad values are TTAErrors, before anything is loaded)."""
    given = merge({key: value for key, value in flags.items() if value is not None}, parse_overrides(overrides or []))
    settings = load_config(StreamSettings, None, given)
    settings.validate()
    return settings


def parse_fps(text: str | None, native_fps: float | None) -> float | None:
    """`--fps 30` or `--fps native`; None (the default) reads as fast as the loop takes frames."""
    if text is None:
        return None
    if text.strip().lower() == "native":
        if native_fps is None:
            raise TTAError("--fps native: SOURCE has no frame rate of its own (only videos do); give a number, e.g. --fps 30")
        return native_fps
    try:
        value = float(text)
    except ValueError:
        raise TTAError(f"--fps takes frames per second (e.g. 30) or `native`, got {text!r}") from None
    if not value > 0:
        raise TTAError(f"--fps must be positive, got {text}")
    return value


def find_labels(source: str, labels: Path | None):
    """--labels when given; else labels saved beside a file or folder source (never for stdin)."""
    from tta_cli.stream.make import load_stream_labels, read_labels

    if labels is not None:
        return read_labels(labels)
    if source == "-":
        return None
    return load_stream_labels(source)


def check_labels(truth, class_names: list[str], ckpt: Path, frame_count: int | None) -> None:
    """Labels must name the checkpoint's classes and cover the stream frame for frame."""
    from tta_cli.data.labels import as_class_indices

    if truth is None:
        return
    if truth.class_names is not None and list(truth.class_names) != class_names:
        raise TTAError(
            f"the stream's classes ({', '.join(truth.class_names[:3])}, ...; {len(truth.class_names)} in all) differ from "
            f"checkpoint {ckpt}'s ({', '.join(class_names[:3])}, ...; {len(class_names)}): they do not match"
        )
    as_class_indices(truth.labels.numpy(), f"the labels (for checkpoint {ckpt})", len(class_names), unknown_allowed=True)
    if frame_count is not None and len(truth.labels) != frame_count:
        raise TTAError(f"there are {len(truth.labels)} labels for {frame_count} frames; give one label per frame (-1: unknown)")


def run_live(model, task, frames, settings, truth, class_names, fps, device, transient: bool):
    """One run of run_stream with the live view redrawn after every block of frames."""
    from tta_cli.stream.loop import run_stream
    from tta_cli.stream.sources import Pacer

    total = frames.length if settings.max_frames is None else min(frames.length or settings.max_frames, settings.max_frames)
    # On CUDA the first frame compiles the step (torch.compile, the Triton convolutions, each timed at its shape) and
    # captures its CUDA graphs: about a minute on a machine's first run (benchmarks/stream_speed.py's warm-up), less
    # once the kernels are in the disk caches; say so, or the view looks stuck
    slow_start = device.type == "cuda" and settings.compile
    view = LiveView(settings.name, total, class_names, "compiling kernels (about a minute on a machine's first run)" if slow_start else "")
    try:
        with Live(view.render(None), console=console, refresh_per_second=8, transient=transient) as live:
            return run_stream(
                model,
                task,
                frames,
                settings,
                len(class_names),
                device,
                labels=truth.labels if truth is not None else None,
                pacer=Pacer(fps, clock=time.perf_counter),
                on_progress=lambda progress: live.update(view.render(progress)),
            )
    finally:
        if not console.is_terminal and not transient:  # rich ends the last view without a newline off a terminal
            console.line()


class LiveView:
    """The status line the live display redraws: throughput, latency, the current prediction, accuracy over the
    last 100 labelled frames, and counts of adapted frames, rollbacks and resets. A line of text (not a table)
    so that it wraps instead of truncating numbers on a narrow terminal."""

    def __init__(self, name: str, total: int | None, class_names: list[str], starting: str = ""):
        self.name = name
        self.total = total
        self.class_names = class_names
        self.starting = starting  # what the first frame waits for, when that takes long

    def render(self, progress) -> Text:
        if progress is None:
            return Text.assemble((self.name, "bold"), f"  frame {self.frames_text(0)}  starting{f': {self.starting}' if self.starting else ''} ...")
        accuracy = "-" if progress.rolling_accuracy is None else f"{100 * progress.rolling_accuracy:.1f}%"
        fields = [
            ("frame", self.frames_text(progress.frames)),
            ("fps", f"{progress.fps:,.1f}"),
            ("latency", f"{progress.latency_ms:.1f} ms"),
            ("now", f"{self.class_name(progress.predicted)} ({100 * progress.confidence:.0f}%)"),
            ("acc (last 100)", accuracy),
            ("adapted", f"{progress.adapted:,}"),
            ("rollbacks", f"{progress.rollbacks:,}"),
            ("resets", f"{progress.resets:,}"),
        ]
        line = Text.assemble((self.name, "bold"))
        for name, value in fields:
            line.append(f"  {name} ", style="dim")
            line.append(value, style="bold cyan" if name in ("now", "acc (last 100)") else "")
        return line

    def frames_text(self, done: int) -> str:
        return f"{done:,}/{self.total:,}" if self.total else f"{done:,}"

    def class_name(self, index: int) -> str:
        return self.class_names[index] if 0 <= index < len(self.class_names) else str(index)


def print_results(results, compare: bool) -> None:
    """Error (when labelled), throughput, latency and event counts per run; with several runs and known clips, each
    run's error difference to the first, paired per clip (mean +- standard error, in points)."""
    differences = [result.summary.get("vs_first") for result in results]
    paired = any(difference is not None for difference in differences)
    caption = f"vs {results[0].name}: error difference in points, per clip, mean +- standard error" if paired else None
    table = Table(title="tta stream: error per run" if compare else "tta stream run", caption=caption)
    columns = ["run", "frames", "error %"] + ([f"vs {results[0].name}"] if paired else [])
    for column in columns + ["fps", "p50 ms", "p95 ms", "adapted", "rollbacks", "resets"]:
        table.add_column(column, justify="left" if column == "run" else "right", no_wrap=True)
    for result, difference in zip(results, differences, strict=True):
        summary = result.summary
        latency = summary["latency_ms"]
        vs_first = [] if not paired else ["-" if difference is None else f"{difference['points']:+.2f} +- {difference['standard_error']:.2f}"]
        table.add_row(
            result.name,
            f"{summary['frames']:,}",
            "-" if summary["error"] is None else f"{summary['error']:.1f}",
            *vs_first,
            f"{summary['fps']:,.1f}",
            *[("-" if latency[key] is None else f"{latency[key]:.1f}") for key in ("p50", "p95")],
            f"{summary['adapted']:,}",
            f"{summary['rollbacks']:,}",
            f"{summary['resets']:,}",
        )
    log_console().print(table)


def log_console() -> Console:
    """The shared console on a terminal; for a file or pipe (no width to fit), one LOG_WIDTH columns wide, so a
    captured log keeps every number of the table instead of rich's 80-column ellipses."""
    if console.is_terminal:
        return console
    return Console(file=console.file, width=LOG_WIDTH, no_color=console.no_color, highlight=False)


def write_outputs(out: Path, results, truth, class_names: list[str], context: dict, file_names: list[str] | None = None) -> None:
    """Per-frame CSV + JSONL per run (with each frame's image file, for a folder of images) and one summary.json,
    appearing together in `out` (tta_cli/outputs.py)."""
    from tta_cli.outputs import staged_folder
    from tta_cli.stream.report import frame_rows, frames_stem, write_frames, write_summary

    several = len(results) > 1
    written = []
    with staged_folder(out, "tta stream run", {"interrupted": context["interrupted"]}) as folder:
        for result in results:
            written += write_frames(folder, frames_stem(result, several), frame_rows(result, class_names, truth, file_names))
        written.append(write_summary(folder / "summary.json", results, {"tool": "tta stream run", **context, "class_names": class_names}))
    console.print(f"wrote {', '.join(path.name for path in written)} to {out}", highlight=False)
