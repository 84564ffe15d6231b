"""`tta adapt`: test-time training (and comparators) on shifted test sets, with a results table."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperCommand

from tta_cli import distributed
from tta_cli.commands.common import AdaptSetOpt, CkptOpt, DataOpt, DeviceOpt, ForceOpt, OutOpt, SeedOpt, console, help_text, user_errors
from tta_cli.config import AdaptSettings, check_range, load_config, merge, parse_overrides, read_yaml
from tta_cli.device import resolve_device
from tta_cli.errors import TTAError

EXAMPLES = """
Methods (--set METHOD.FIELD=VALUE sets a method's own settings):
{methods}

On CUDA the first call compiles (tens of seconds). Examples:
  tta adapt --ckpt runs/quickstart --method source,ttt --out runs/adapt
  tta adapt --ckpt runs/bn --method norm,tent --set tent.lr=0.0005
  tta adapt --ckpt resnet26_gn.rotation_sun2020_cifar10 --data photos
"""


class AdaptCommand(TyperCommand):
    """`tta adapt`, whose help lists the methods registered when it is shown (a test may register one)."""

    @property
    def help(self) -> str:
        from tta_cli.adapt.methods import help_lines

        methods = "\n".join(f"  {line}" for line in help_lines())
        return help_text(adapt_command, EXAMPLES.format(methods=methods))

    @help.setter
    def help(self, value: str | None) -> None:
        """Click sets the help at construction; the property above supersedes it."""


def register(app: typer.Typer) -> None:
    app.command("adapt", cls=AdaptCommand)(user_errors(adapt_command))


def parse_ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TTAError(f"{what} must be comma-separated integers, got {text!r}") from None


def adapt_command(
    ckpt: CkptOpt,
    data: DataOpt = None,
    corruptions: Annotated[str | None, typer.Option("--corruptions", help="Comma list, all (the 15) or extra.")] = None,
    severities: Annotated[str | None, typer.Option("--severities", help="Comma list of 1-5 (5).")] = None,
    n: Annotated[int | None, typer.Option("--n", help="First n images of each set.")] = None,
    method: Annotated[str | None, typer.Option("--method", help="Comma list of the methods above.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="SGD steps (ttt 10, online 1).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="SGD learning rate (0.001).")] = None,
    copies: Annotated[int | None, typer.Option("--copies", help="Augmented views per sample (32).")] = None,
    params: Annotated[str | None, typer.Option("--params", help="encoder|encoder+ssl|norm|adapters.")] = None,
    batch: Annotated[int | None, typer.Option("--batch", help="ttt-online: samples per update (1).")] = None,
    reset: Annotated[str | None, typer.Option("--reset", help="never | every:N | on-shift (online).")] = None,
    rollback: Annotated[bool | None, typer.Option("--rollback", help="ttt-online: undo harmful updates.")] = None,
    skip_above: Annotated[float | None, typer.Option("--skip-above", help="Skip updates above this confidence.")] = None,
    forget: Annotated[float | None, typer.Option("--forget", help="ttt-online: decay to source per step.")] = None,
    views: Annotated[int | None, typer.Option("--views", help="Average predictions over K views.")] = None,
    order: Annotated[str | None, typer.Option("--order", help="per-corruption, continual, gradual, mixed or correlated.")] = None,
    dirichlet: Annotated[float | None, typer.Option("--dirichlet", help="correlated order's Dirichlet D.")] = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="YAML of settings.")] = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    seeds: Annotated[int | None, typer.Option("--seeds", help="K runs, seeds seed..: mean ± std.")] = None,
    out: OutOpt = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG bar chart of the errors.")] = None,
    predictions: Annotated[bool, typer.Option("--predictions", help="Also write per-sample predictions.")] = False,
    save_adapted: Annotated[Path | None, typer.Option("--save-adapted", help="Save online methods' final weights.")] = None,
    force: ForceOpt = False,
    overrides: AdaptSetOpt = None,
) -> None:
    """Adapt a checkpoint (folder or `tta models` name) on shifted sets: error (%), paired 95% intervals to source;
    unlabelled images: predictions per file."""
    from tta_cli.adapt.collapse import check_collapse
    from tta_cli.adapt.methods import split_method_settings
    from tta_cli.data.folder import list_unlabelled
    from tta_cli.data.sources import load_unlabelled
    from tta_cli.outputs import check_out_file, check_out_folder
    from tta_cli.train.checkpoint import load_model
    from tta_cli.validation import check_adapt_flags, check_clean_source, parse_names

    if predictions and out is None:
        raise TTAError("--predictions writes predictions.csv into --out; give --out DIR as well")
    check_out_folder(out, force)
    check_out_file(plot, force, "--plot")
    check_out_folder(save_adapted, force, "--save-adapted")
    flags = {
        "methods": parse_names(method, "--method"),  # "source, ttt" reads as it looks
        "steps": steps, "lr": lr, "copies": copies, "params": params, "batch": batch, "reset": reset,
        "rollback": rollback, "skip_above": skip_above, "order": order, "dirichlet": dirichlet, "seed": seed,
        "forget": forget, "views": views,
    }
    given = merge({k: v for k, v in flags.items() if v is not None}, parse_overrides(overrides or []))
    shared, own = split_method_settings(merge(read_yaml(recipe) if recipe is not None else {}, given))
    settings = load_config(AdaptSettings, None, shared)
    settings.validate()
    seeds = 1 if seeds is None else seeds
    check_range("--seeds", seeds, 1)
    check_shardable(settings.methods)
    torch_device = distributed.init(resolve_device(device or "auto"))  # under torchrun: join the group, cuda:LOCAL_RANK
    model, train_config, meta = load_model(ckpt, torch_device)
    own.setdefault("ttt-nn", {}).setdefault("checkpoint", str(ckpt))  # ttt-nn reads its index and training data
    from tta_cli.tasks import build_task

    task = build_task(train_config.task, train_config.data.pad_mode)
    adapters = build_methods(model, task, settings, own, len(meta["class_names"]), torch_device)  # bad methods fail before any work
    check_adapt_flags({k: v for k, v in flags.items() if v is not None}, settings.methods, settings.order)
    saved = check_saveable(adapters, save_adapted, seeds)
    severity_list = parse_ints(severities, "--severities") or [5]
    unlabelled = None
    if data is not None and list_unlabelled(data) is not None:
        check_unlabelled_flags(data, corruptions, severities, plot, seeds)
        unlabelled = load_unlabelled(data, meta["class_names"], train_config.model.img_size, n)
    else:
        check_clean_source(data or "cifar10-mini", corruptions, severities)
    sets = [unlabelled] if unlabelled is not None else load_sets(
        data or "cifar10-mini", corruptions, severity_list, n, settings.seed, torch_device, train_config.model.img_size)
    check_classes(meta["class_names"], sets, ckpt)
    console.print(f"[bold]tta adapt[/] {', '.join(settings.methods)} on {len(sets)} set(s), {sum(len(s) for s in sets)} images, {torch_device}")
    results = run_seeds(adapters, settings, seeds, lambda seeded: build_methods(model, task, seeded, own, len(meta["class_names"]), torch_device),
                        sets, torch_device, in_order=bool(saved))
    check_collapse(results, sets, model, torch_device)  # (NaN is checked as each method runs)
    if unlabelled is not None:
        report_unlabelled(results, unlabelled, out, {"checkpoint": str(ckpt), "data": data, "device": str(torch_device)})
    else:
        report_errors(results, sets, adapters, out, plot, ckpt, data, {"corruptions": corruptions, "severities": severity_list, "n": n},
                      torch_device, predictions)
    if saved and distributed.is_main():
        write_adapted(save_adapted, saved, model, train_config, meta, settings.order)


def report_errors(results, sets, adapters, out: Path | None, plot: Path | None, ckpt, data, selection: dict, device, predictions: bool) -> None:
    """Labelled sets: the error table (with the paired differences to source), results.json/.csv and the plot."""
    table = print_table(results, sets)
    if out is not None and distributed.is_main():
        from tta_cli.outputs import staged_folder

        with staged_folder(out, "tta adapt") as folder:
            write_outputs(folder, results, sets, adapters, ckpt, data, selection, device, table, predictions)
        console.print(f"wrote {out / 'results.json'} and {out / 'results.csv'}")
    if plot is not None and distributed.is_main():
        write_plot(plot, results, sets)


def check_unlabelled_flags(data: str, corruptions: str | None, severities: str | None, plot: Path | None, seeds: int) -> None:
    """A folder of unlabelled images is adapted on as it is and gives predictions, no errors: flags that need labels
    or corrupt it are refused, naming why."""
    from tta_cli.validation import refuse_together

    where = f"--data {data} (a folder of unlabelled images)"
    if corruptions is not None or severities is not None:
        refuse_together("--corruptions" if corruptions is not None else "--severities", where, "unlabelled images are adapted on as they are")
    if plot is not None:
        refuse_together("--plot", where, "the plot shows errors, which need labels; --out writes the predictions")
    if seeds > 1:
        refuse_together("--seeds", where, "each seed predicts differently; write one run's predictions (--seeds 1)")


def check_shardable(methods: list[str]) -> None:
    """Under torchrun only episodic methods run: each process takes a share of the samples."""
    from tta_cli.adapt.methods import REGISTRY

    world_size = distributed.requested_world_size()
    online = [name for name in methods if name in REGISTRY and not REGISTRY[name].episodic]
    if world_size > 1 and online:
        episodic = [name for name, cls in REGISTRY.items() if cls.episodic]
        raise TTAError(
            f"--method {online[0]} adapts online, so it runs as one process: the weights for sample t+1 depend on the update at "
            f"sample t, and the stream cannot be split over {world_size} torchrun processes; run it without torchrun "
            f"(only {', '.join(episodic)} split their samples over processes)"
        )


def load_sets(data: str, corruptions: str | None, severities: list[int], n: int | None, seed: int, device: torch.device, size: int):
    """The shifted sets to adapt on. A clean source is resized to the checkpoint's input `size` (as `tta train` and
    `tta stream` do) before it is corrupted; a ready-made shifted set must already have that size, since resizing
    it would change what its corruptions measure."""
    from tta_cli.data.imageset import mix_classes
    from tta_cli.data.shifted import is_shifted_root, load_shifted
    from tta_cli.data.sources import load_split

    if is_shifted_root(data):
        sets = load_shifted(data, corruptions, severities, n)
        for image_set in sets:
            height, width = image_set.images.shape[1:3]
            if (height, width) != (size, size):
                raise TTAError(
                    f"the shifted set {image_set.meta.get('corruption', '')} in {data} holds {height}x{width} images but the "
                    f"checkpoint takes {size}x{size}; make the sets from images of that size (tta corrupt keeps the size it is given)"
                )
        return sets
    clean, _ = mix_classes(load_split(data, "test", limit=n, seed=seed, image_size=size), seed)
    if corruptions is None:
        clean.meta.update({"corruption": "clean", "severity": 0})
        return [clean]
    from tta_cli.corrupt import corrupt, resolve_corruptions

    sets = []
    images = clean.images.to(device)
    for name in resolve_corruptions(corruptions):
        for severity in severities:
            shifted = corrupt(images, name, severity, seed=seed).cpu()
            sets.append(type(clean)(shifted, clean.labels, clean.class_names, {"corruption": name, "severity": severity, "source": data}))
    return sets


def check_classes(checkpoint_classes: list[str], sets, ckpt) -> None:
    for image_set in sets:
        if int(image_set.labels.max()) >= len(checkpoint_classes):
            raise TTAError(
                f"the labels of {image_set.meta.get('corruption', 'the data')} go up to {int(image_set.labels.max())}, but checkpoint "
                f"{ckpt} has {len(checkpoint_classes)} classes (labels 0 to {len(checkpoint_classes) - 1})"
            )
        if len(image_set.class_names) != len(checkpoint_classes):
            raise TTAError(
                f"the data has {len(image_set.class_names)} classes but checkpoint {ckpt} was trained on "
                f"{len(checkpoint_classes)} ({', '.join(checkpoint_classes[:4])}, ...): they do not match"
            )
        if image_set.class_names != list(checkpoint_classes):
            raise TTAError(f"class names of the data ({image_set.class_names[:3]}...) differ from the checkpoint's ({checkpoint_classes[:3]}...)")


def build_methods(model, task, settings, own: dict, classes: int, device) -> list:
    """One adapter per --method, each on its own copy of the model; unknown or unsuitable methods raise here."""
    from tta_cli.adapt.methods import build_method

    return [build_method(name, model, task, settings, classes, device, own.get(name)) for name in settings.methods]


def check_saveable(adapters: list, out: Path | None, seeds: int) -> list:
    """The methods whose final weights --save-adapted writes: the online ones (an episodic method ends every sample
    back on the checkpoint's weights); refused with one line when there are none, or with --seeds (which run's?)."""
    if out is None:
        return []
    online = [adapter for adapter in adapters if not adapter.episodic]
    if not online:
        raise TTAError(f"--save-adapted keeps an online method's final weights; {', '.join(a.name for a in adapters)} reset after every sample")
    if seeds > 1:
        raise TTAError("--save-adapted and --seeds together: each seed ends on other weights; save one run (--seeds 1)")
    return online


def write_adapted(out: Path, adapters: list, source_model, train_config, meta: dict, order: str) -> None:
    """Each method's weights at the end of the stream as a checkpoint folder out/<method> (`--ckpt` loads it)."""
    from tta_cli.outputs import staged_folder
    from tta_cli.train.checkpoint import save_adapted

    with staged_folder(out, "tta adapt --save-adapted") as folder:
        for adapter in adapters:
            metrics = {**meta.get("metrics", {}), "adapted_by": adapter.name, "adapted_order": order, "adapted_counters": adapter.counters()}
            save_adapted(folder / adapter.name, adapter.model, source_model, train_config, meta["class_names"], metrics)
    console.print(f"wrote the adapted weights of {', '.join(a.name for a in adapters)} under {out}")


def run_seeds(adapters: list, settings, seeds: int, rebuild, sets, device, in_order: bool = False) -> list:
    """`seeds` runs of the table, run k with seed settings.seed + k (the methods' random draws and the order's
    shuffles; the data stay those of the first seed), each method's runs combined as mean and std per set."""
    from tta_cli.adapt.runner import combine_seeds

    runs = [run_all(adapters, settings, sets, device, in_order)]
    for offset in range(1, seeds):
        seeded = dataclasses.replace(settings, seed=settings.seed + offset)
        runs.append(run_all(rebuild(seeded), seeded, sets, device))
    if seeds == 1:
        return runs[0]
    return [combine_seeds([run[index] for run in runs]) for index in range(len(adapters))]


def run_all(adapters: list, settings, sets, device, in_order: bool = False):
    from tta_cli.adapt.orders import build_order
    from tta_cli.adapt.runner import run_method

    segments = build_order(sets, settings.order, settings.seed, settings.dirichlet)
    total = sum(len(s.indices) for s in segments)
    results = []
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        for adapter in adapters:
            bar = progress.add_task(adapter.name, total=total, rate="")
            started = time.perf_counter()

            def on_batch(done: int, bar=bar, started=started) -> None:
                rate = done / max(time.perf_counter() - started, 1e-9)
                progress.update(bar, completed=done, rate=f"{rate:,.0f} samples/s")

            results.append(run_method(adapter, sets, segments, device, on_batch, in_order))
    return results


def column_names(results, sets) -> list[tuple[str, int]]:
    severities = sorted({int(s.meta.get("severity", 0)) for s in sets})
    return [(r.method, sev) for r in results for sev in severities]


def error_grid(results, sets, values=lambda result: result.errors) -> tuple[list[str], dict[str, list[float | None]]]:
    """Rows: corruptions in the sets' (canonical) order; columns: method (x severity when several); cells:
    `values(result)[i]` of the set i in that row and column (by default the error)."""
    corruptions = list(dict.fromkeys(s.meta.get("corruption", "clean") for s in sets))
    severities = sorted({int(s.meta.get("severity", 0)) for s in sets})
    grid: dict[str, list[float | None]] = {}
    for result in results:
        for severity in severities:
            key = result.method if len(severities) == 1 else f"{result.method} s{severity}"
            column = []
            for corruption in corruptions:
                match = [
                    error
                    for image_set, error in zip(sets, values(result), strict=True)
                    if image_set.meta.get("corruption", "clean") == corruption and int(image_set.meta.get("severity", 0)) == severity
                ]
                column.append(match[0] if match else None)
            grid[key] = column
    return corruptions, grid


def mean(values) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / max(len(present), 1)


def seed_summary(results, sets) -> dict:
    """Over seeds (combine_seeds): each cell's std, each column mean's std over the seeds' column means, and
    every seed's own grid; empty for one run."""
    if results[0].seed_errors is None:
        return {}
    _, std = error_grid(results, sets, lambda result: result.errors_std)
    per_seed = [error_grid(results, sets, lambda result, k=k: result.seed_errors[k])[1] for k in range(len(results[0].seed_errors))]
    column_means = {key: torch.tensor([mean(grid[key]) for grid in per_seed], dtype=torch.float64) for key in std}
    return {"seeds": len(per_seed), "std": std, "mean_std": {key: float(values.std()) for key, values in column_means.items()},
            "per_seed": per_seed}


def differences_to_source(results, sets) -> dict[str, list]:
    """Each method's (not source's) error difference to source per set, paired per sample (adapt/paired.py); empty
    without a source run."""
    from tta_cli.adapt.orders import set_offsets
    from tta_cli.adapt.paired import paired_difference

    source = next((result for result in results if result.method == "source"), None)
    if source is None:
        return {}
    parts = [slice(offset, offset + len(image_set)) for offset, image_set in zip(set_offsets(sets), sets, strict=True)]
    return {result.method: [paired_difference(result.sample_wrong[part], source.sample_wrong[part]) for part in parts]
            for result in results if result is not source}


def paired_grid(results, sets) -> tuple[dict, dict]:
    """The error grid's columns (methods other than source) of paired differences to source, and each column's mean."""
    from tta_cli.adapt.paired import mean_over_sets

    differences = differences_to_source(results, sets)
    _, grid = error_grid([result for result in results if result.method in differences], sets, lambda result: differences[result.method])
    return grid, {key: mean_over_sets([part for part in column if part is not None]) for key, column in grid.items()}


def print_table(results, sets) -> dict:
    corruptions, grid = error_grid(results, sets)
    spread = seed_summary(results, sets)
    paired, paired_mean = paired_grid(results, sets)

    def cell(value: float | None, std: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:.1f}" if std is None else f"{value:.1f} ± {std:.1f}"

    def difference(part) -> str:
        return "-" if part is None else f"{part.points:+.1f} ± {part.half_width:.1f}"

    title = f"tta adapt: error (%), mean ± std over {spread['seeds']} seeds" if spread else "tta adapt: error (%)"
    caption = "vs source: error difference in points, paired per sample, ± its 95% interval" if paired else None
    table = Table(title=title, caption=caption)
    table.add_column("corruption")
    columns = [entry for key in grid for entry in ([(key, False), (key, True)] if key in paired else [(key, False)])]
    for key, is_difference in columns:
        table.add_column(f"{key} vs source" if is_difference else key, justify="right")
    for row, corruption in enumerate(corruptions):
        table.add_row(corruption, *[difference(paired[k][row]) if d else cell(grid[k][row], spread["std"][k][row] if spread else None)
                                    for k, d in columns])
    if len(corruptions) > 1:
        table.add_row("[bold]mean", *[f"[bold]{difference(paired_mean[k]) if d else cell(mean(grid[k]), spread['mean_std'][k] if spread else None)}"
                                      for k, d in columns])
    console.print(table)
    speed = Table(title="throughput")
    for column in ("method", "samples", "seconds", "samples/s", "after 1st batch", "counters"):
        speed.add_column(column, justify="right" if column != "counters" else "left")
    for result in results:
        counters = ", ".join(f"{k} {v}" for k, v in result.counters.items() if v)
        steady = result.steady_samples_per_s
        speed.add_row(result.method, str(result.samples), f"{result.seconds:.1f}", f"{result.samples / max(result.seconds, 1e-9):,.1f}",
                      "" if steady is None else f"{steady:,.1f}", counters)
    console.print(speed)
    for result in results:
        if result.counters.get("cache_lookups"):
            lookups = result.counters["cache_lookups"]
            console.print(f"{result.method}: adapted-weight cache hit rate {cache_hit_rate(result):.1%} of {lookups} samples")
    vs_source = {"vs_source": {k: [None if part is None else part.record() for part in column] for k, column in paired.items()},
                 "vs_source_mean": {k: part.record() for k, part in paired_mean.items()},
                 "vs_source_semantics": "error difference to source in points (negative: fewer errors), paired per sample, 95% interval "
                                        "by the normal approximation (tta_cli/adapt/paired.py)"} if paired else {}
    return {"corruptions": corruptions, "errors": grid, "mean": {k: mean(v) for k, v in grid.items()}, **spread, **vs_source}


def cache_hit_rate(result) -> float:
    """The share of samples that reused cached adapted weights (ttt with --set ttt.cache=TAU)."""
    return result.counters["cache_hits"] / result.counters["cache_lookups"]


def write_outputs(out: Path, results, sets, adapters, ckpt, data, selection: dict, device, table, predictions: bool) -> None:
    from tta_cli.adapt.orders import ORDER_SEMANTICS
    from tta_cli.files import write_csv, write_json

    settings = {**dataclasses.asdict(adapters[0].common), **{a.name: dataclasses.asdict(a.settings) for a in adapters}}
    semantics = {a.name: {"computes": a.semantics, "updates": a.updates} for a in adapters}

    differences = differences_to_source(results, sets)
    rows = []
    for result in results:
        for index, (image_set, error) in enumerate(zip(sets, result.errors, strict=True)):
            row = {
                "method": result.method,
                "corruption": image_set.meta.get("corruption", "clean"),
                "severity": image_set.meta.get("severity", 0),
                "n": len(image_set),
                "error": round(error, 4),
            }
            if result.errors_std is not None:  # --seeds K: error is the mean over the K runs
                row.update(error_std=round(result.errors_std[index], 4), seeds=len(result.seed_errors))
            if result.method in differences:  # paired per sample, 95% interval (adapt/paired.py)
                part = differences[result.method][index]
                row.update(vs_source=round(part.points, 4), vs_source_low=round(part.low, 4), vs_source_high=round(part.high, 4))
            rows.append(row)
    write_csv(out / "results.csv", rows)
    write_json(out / "results.json", {
        "checkpoint": str(ckpt),
        "data": data,
        "selection": selection,
        "device": str(device),
        "settings": settings,
        "semantics": {**semantics, "orders": ORDER_SEMANTICS},
        "table": table,
        "rows": rows,
        "methods": {
            r.method: {
                "seconds": r.seconds, "samples": r.samples, "samples_per_s": r.samples / max(r.seconds, 1e-9),
                "steady_samples_per_s": r.steady_samples_per_s,
                "first_batch": None if r.first_batch is None else {"seconds": r.first_batch[0], "samples": r.first_batch[1]},
                "counters": r.counters,
                "precision": r.precision, "convolutions": r.convolutions,
                **({"cache_hit_rate": cache_hit_rate(r)} if r.counters.get("cache_lookups") else {}),
            }
            for r in results
        },
    })
    if predictions:
        labels = torch.cat([s.labels for s in sets]).tolist()
        names = [(s.meta.get("corruption", "clean"), s.meta.get("severity", 0), i) for s in sets for i in range(len(s))]
        prediction_rows = []
        for index, (corruption, severity, sample) in enumerate(names):
            row = {"corruption": corruption, "severity": severity, "index": sample, "label": labels[index]}
            row.update({r.method: int(r.predictions[index]) for r in results})
            prediction_rows.append(row)
        write_csv(out / "predictions.csv", prediction_rows)


def prediction_rows(results, image_set) -> list[dict]:
    """One row per image and method: file name, predicted class index and name, its softmax probability."""
    files, names = image_set.meta["files"], image_set.class_names
    return [
        {"file": file, "method": result.method, "class": int(result.predictions[index]), "class_name": names[int(result.predictions[index])],
         "confidence": round(float(result.confidences[index]), 6)}
        for index, file in enumerate(files) for result in results
    ]


def report_unlabelled(results, image_set, out: Path | None, context: dict, shown: int = 20) -> None:
    """Unlabelled images: a table of the first `shown` files' predictions per method, and with --out all of them as
    predictions.csv and predictions.json (no errors: there are no labels)."""
    from tta_cli.files import write_csv, write_json
    from tta_cli.outputs import staged_folder

    rows = prediction_rows(results, image_set)
    table = Table(title=f"tta adapt: predictions on {len(image_set)} unlabelled images (class, confidence)")
    table.add_column("file")
    for result in results:
        table.add_column(result.method, justify="right")
    methods = len(results)
    for start in range(0, min(len(rows), shown * methods), methods):
        table.add_row(rows[start]["file"], *[f"{row['class_name']} ({row['confidence']:.2f})" for row in rows[start : start + methods]])
    console.print(table)
    if len(image_set) > shown:
        console.print(f"(the first {shown} of {len(image_set)} images{'' if out else '; --out DIR writes them all'})")
    if out is not None and distributed.is_main():
        with staged_folder(out, "tta adapt") as folder:
            write_csv(folder / "predictions.csv", rows)
            write_json(folder / "predictions.json", {**context, "class_names": image_set.class_names, "predictions": rows})
        console.print(f"wrote {out / 'predictions.csv'} and {out / 'predictions.json'}")


def write_plot(path: Path, results, sets) -> None:
    from tta_cli.plots import grouped_bars

    corruptions, grid = error_grid(results, sets)
    series = {k: [v if v is not None else 0.0 for v in values] for k, values in grid.items()}
    groups = corruptions + (["mean"] if len(corruptions) > 1 else [])
    if len(corruptions) > 1:
        series = {k: v + [mean(grid[k])] for k, v in series.items()}
    grouped_bars(path, groups, series, "error (%)", "test-time adaptation: error per corruption")
    console.print(f"wrote {path}")

