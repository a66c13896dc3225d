"""What every benchmark shares: a fresh process per measured phase (so that each peak RSS is its own), the machine
and library versions recorded with every number, the common flags and the JSON output.

Each benchmark prints one JSON object and, with ``--json PATH``, also writes it there (atomically; an existing
file is kept unless ``--overwrite``). ``python -m bench.common`` prints the machine block alone.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

GB = 10**9


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    return _rss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _rss_bytes(maxrss: int) -> int:
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # ru_maxrss: bytes on macOS, KiB on Linux


def run_measured(command: Sequence[Any], log: Path, *, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> dict[str, Any]:
    """Run ``command`` in a fresh process, its output appended to ``log``; its wall time, the peak RSS of it and its
    children (``wait4``), and the load average before and after. Raises ``RuntimeError`` with the end of ``log``
    when it fails."""
    load_before = os.getloadavg()
    with log.open("ab") as out:
        out.write(("\n$ " + " ".join(map(str, command)) + "\n").encode())
        out.flush()
        start = time.perf_counter()
        process = subprocess.Popen([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{command[0]} exited with {code}; the end of {log}:\n{tail}")
    return {"seconds": round(seconds, 3), "peak_rss_bytes": _rss_bytes(usage.ru_maxrss),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in a new interpreter (spawned, not forked), so its peak RSS is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def free_port() -> int:
    """A TCP port free on this machine now (for ``accelerate launch --main_process_port``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_threads(threads: int | None) -> int:
    """Use ``threads`` CPU threads (all cores this process may use when None), in torch and in OpenMP children."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = threads or cores
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return threads


def machine() -> dict[str, Any]:
    """The machine and software every number was measured with: CPU, cores, memory, GPU, versions, commit."""
    import torch

    from safetypatch.utils.environment import git_hash, package_versions

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "count": torch.cuda.device_count(), "memory_bytes": props.total_memory,
               "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported()}
    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "gpu": gpu, "python": platform.python_version(), "platform": platform.platform(),
        "versions": package_versions(), "git_hash": git_hash(),
    }


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.machine())


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark takes: ``--json``, ``--overwrite``."""
    out = argparse.ArgumentParser(description=description)
    out.add_argument("--json", type=Path, default=None, help="also write the result to this file")
    out.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    return out


def parse(arguments: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` and refuse an existing ``--json`` file now, not after the run (without ``--overwrite``)."""
    from safetypatch.utils.io import ensure_writable

    args = arguments.parse_args(argv)
    if args.json is not None:
        ensure_writable(args.json, args.overwrite)
    return args


def emit(result: dict[str, Any], args: argparse.Namespace, argv: list[str] | None, module: str) -> dict[str, Any]:
    """Add the command line (``python -m <module> <argv>``) and the machine to ``result``, print it as JSON and
    write it to ``--json``."""
    from safetypatch.utils.io import atomic_write_json

    command = ["python", "-m", module, *(sys.argv[1:] if argv is None else argv)]
    document = {**result, "command": " ".join(command), "machine": machine()}
    if args.json is not None:
        atomic_write_json(args.json, document, overwrite=args.overwrite)
    print(json.dumps(document, indent=2, default=str))
    return document


if __name__ == "__main__":
    print(json.dumps(machine(), indent=2, default=str))


def venv_python(venv: Path) -> Path:
    """The interpreter of the virtual environment ``venv`` (a tool a bench installs apart from safetypatch)."""
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def venv_version(venv: Path, code: str) -> str | None:
    """What ``code`` prints in ``venv``'s interpreter (a tool's version), or None when ``venv`` has no interpreter
    or the code fails there (the tool is missing or does not import)."""
    python = venv_python(venv)
    if not python.is_file():
        return None
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_tool(venv: Path, requirement: str, commands: list[list[str]], version: Callable[[], str | None],
                env: dict[str, str] | None = None) -> str:
    """``requirement``'s version in ``venv``: the one ``version()`` finds there when it is the pinned one, else after
    running ``commands`` (the first makes the environment and is skipped when it exists), printing each.

    Raises:
        SystemExit: the tool is still not found after the install.
    """
    wanted = requirement.split("==", 1)[1] if "==" in requirement else None
    found = version()
    if found is not None and (wanted is None or found == wanted):
        return found
    for command in commands[1 if venv_python(venv).is_file() else 0:]:
        print("+", " ".join(command), file=sys.stderr, flush=True)
        subprocess.run(command, check=True, env=env)
    found = version()
    if found is None:
        raise SystemExit(f"{requirement} was installed into {venv} but does not import there; see the pip output.")
    return found
