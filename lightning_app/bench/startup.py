"""``reglab bench startup``: how long ``reglab --help`` takes against ``import lightning.pytorch``.

Lightning's own imports dominate reglab's start-up; what reglab adds on top is its share,
``(reglab --help − import lightning.pytorch) / reglab --help``, from the medians of alternated
fresh processes measured in one run (so both see the same machine load and file cache). The page
also lists what ``import reglab.callbacks`` loads (with lazy exports: the registry, no technique)
and the slowest modules ``reglab --help`` imports that ``import lightning.pytorch`` does not, the
candidates to defer.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_SHARE = 0.10
IMPORTED_BY_CALLBACKS = (
    "import json, sys; before = set(sys.modules); import reglab.callbacks; "
    "print(json.dumps(sorted(set(sys.modules) - before)))"
)


def reglab_command() -> list[str]:
    """The ``reglab`` console script beside this interpreter, else ``python -m reglab``."""
    script = Path(sys.executable).parent / "reglab"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "reglab"]


COMMANDS = {
    "reglab --help": lambda: [*reglab_command(), "--help"],
    'python -c "import lightning.pytorch"': lambda: [sys.executable, "-c", "import lightning.pytorch"],
}


def seconds_of(argv: list[str]) -> tuple[float, float]:
    """(wall-clock, CPU) seconds of one run; CPU time (user + system of the child) is the figure
    that other load on a shared machine disturbs least."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def import_times(argv: list[str]) -> dict[str, tuple[int, int]]:
    """``-X importtime`` of a command: module -> (self µs, cumulative µs)."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
    times = {}
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if match:
            times[match.group(4)] = (int(match.group(1)), int(match.group(2)))
    return times


def measure(repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Alternated runs of both commands (one untimed warm-up each, for the file cache)."""
    for make in COMMANDS.values():
        seconds_of(make())
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in COMMANDS}
    for repeat in range(repeats):
        names = list(COMMANDS) if repeat % 2 == 0 else list(reversed(COMMANDS))
        for name in names:
            seconds[name].append(seconds_of(COMMANDS[name]()))
            print(f"[startup] {name}: {seconds[name][-1][0]:.2f} s wall, {seconds[name][-1][1]:.2f} s CPU", flush=True)
    return seconds


def extra_imports(limit: int = 15) -> list[tuple[str, int, int]]:
    """Top-level packages ``reglab --help`` imports and ``import lightning.pytorch`` does not, by
    the summed self time of their modules: (package, ms, modules)."""
    ours = import_times(COMMANDS["reglab --help"]())
    lightning = import_times(COMMANDS['python -c "import lightning.pytorch"']())
    packages: dict[str, list[int]] = {}
    for module, (self_us, _) in ours.items():
        if module not in lightning:
            top = module.split(".")[0] if not module.startswith("reglab") else ".".join(module.split(".")[:2])
            packages.setdefault(top, []).append(self_us)
    ranked = sorted(((name, sum(us) // 1000, len(us)) for name, us in packages.items()), key=lambda row: -row[1])
    return ranked[:limit]


def run_startup(repeats: int, out: Path, command: str) -> dict[str, object]:
    seconds = measure(repeats)
    wall = {name: statistics.median(w for w, _ in runs) for name, runs in seconds.items()}
    cpu = {name: statistics.median(c for _, c in runs) for name, runs in seconds.items()}
    reglab, lightning = "reglab --help", 'python -c "import lightning.pytorch"'
    share = {"CPU": (cpu[reglab] - cpu[lightning]) / cpu[reglab], "wall-clock": (wall[reglab] - wall[lightning]) / wall[reglab]}
    imported = json.loads(subprocess.run([sys.executable, "-c", IMPORTED_BY_CALLBACKS], capture_output=True, text=True, check=True).stdout)
    loaded = [m for m in imported if m.split(".")[0] not in sys.stdlib_module_names and not m.startswith("_")]
    extras = extra_imports()
    lines = [
        "# Start-up time",
        "",
        f"`{command}` ({datetime.date.today()}, {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}): {repeats} alternated fresh processes per command, "
        "after one untimed warm-up each; seconds of CPU (user + system) and of wall-clock time.",
        "",
        "| command | median CPU | median wall-clock | runs (wall / CPU) |",
        "|---|---|---|---|",
        *(
            f"| `{name}` | {cpu[name]:.2f} s | {wall[name]:.2f} s | {', '.join(f'{w:.2f} / {c:.2f}' for w, c in runs)} |"
            for name, runs in seconds.items()
        ),
        "",
        "reglab's share of `reglab --help`, (median − Lightning's median) / median: "
        + ", ".join(f"**{value:.1%}** of {kind} time" for kind, value in share.items())
        + f" (target ≤ {TARGET_SHARE:.0%}: {'met' if share['CPU'] <= TARGET_SHARE else 'missed'} on CPU time; "
        "wall-clock time also carries the load of other processes on the machine).",
        "",
        f"`import reglab.callbacks` loads {len(imported)} modules, {len(loaded)} outside the standard library: "
        f"{', '.join(f'`{m}`' for m in loaded) or 'none'} (techniques are imported on first access).",
        "",
        "Packages `reglab --help` imports that `import lightning.pytorch` does not (summed self time of their "
        "modules in one `-X importtime` run; a profile, not a timing):",
        "",
        "| package | ms | modules |",
        "|---|---|---|",
        *(f"| `{name}` | {ms} | {count} |" for name, ms, count in extras),
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return {"cpu": cpu, "wall": wall, "share": share, "loaded": imported}

