"""Checks of what a user gives on the command line that no single settings object can make: seeds, sizes against
the machine's memory, and flags that contradict each other. Each failure is a one-line TTAError."""

from __future__ import annotations

import os

from tta_cli.errors import TTAError

MAX_SEED = 2**63 - 1  # torch.manual_seed and numpy take any seed in [0, 2**63)
MEMORY_SHARE = 0.8  # a user-chosen size may take at most this share of the memory available now


def check_seed(seed: int | None, flag: str = "--seed") -> None:
    if seed is not None and not (isinstance(seed, int) and 0 <= seed <= MAX_SEED):
        raise TTAError(f"{flag} must be an integer from 0 to 2**63-1, got {seed}")


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (MemAvailable on Linux, else the physical memory)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(needed_bytes: int, what: str) -> None:
    """Refuse, before any compute, a user-chosen size whose buffers would not fit in memory (instead of an
    out-of-memory crash minutes later). `what` names the flags that set the size."""
    available = available_memory()
    if needed_bytes > MEMORY_SHARE * available:
        raise TTAError(
            f"{what} needs about {_gib(needed_bytes)} of memory but {_gib(available)} is available; choose a smaller size"
        )


def refuse_together(first: str, second: str, why: str) -> None:
    """Two flags that contradict each other: name both and say why."""
    raise TTAError(f"{first} and {second} contradict each other: {why}; drop one of them")


def _gib(count: int) -> str:
    return f"{count / 2**30:,.1f} GiB"


# adapt policies that only some methods follow: given with none of those methods, they would be silently ignored.
# (--steps, --lr, --copies and --params are not here: a shared argument list for several runs may carry them.)
METHOD_FLAGS = {
    "rollback": ("--rollback", ("ttt-online",)),
    "reset": ("--reset", ("ttt-online",)),
    "batch": ("--batch", ("ttt-online",)),
    "skip_above": ("--skip-above", ("ttt-online", "ttt")),
    "forget": ("--forget", ("ttt-online",)),
}


def check_adapt_flags(given: dict, methods: list[str], order: str) -> None:
    """`tta adapt` flags that contradict the chosen methods or order (a flag no chosen method reads, --dirichlet
    without --order correlated) are refused, naming both, instead of being ignored."""
    for key, (flag, readers) in METHOD_FLAGS.items():
        if key in given and given[key] not in (False, None) and not set(readers) & set(methods):
            refuse_together(flag, f"--method {','.join(methods)}", f"only {' and '.join(readers)} read {flag}")
    if given.get("dirichlet") is not None and order != "correlated":
        refuse_together("--dirichlet", f"--order {order}", "--dirichlet sets the concentration of --order correlated only")


def parse_names(text: str | None, flag: str) -> list[str] | None:
    """A comma list of names ("source, ttt" reads as it looks); an empty name (`--method ""`, `a,,b`) is an error."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise TTAError(f"{flag} {text!r} has an empty name; give a comma list such as source,ttt")
    return names


def check_clean_source(data: str, corruptions: str | None, severities: str | None) -> None:
    """`tta adapt`: --severities picks severities of shifted sets; a clean source without --corruptions has none."""
    from tta_cli.data.shifted import is_shifted_root

    if severities is not None and corruptions is None and not is_shifted_root(data):
        refuse_together("--severities", f"--data {data} without --corruptions", "a clean source is adapted on as it is, at no severity")
