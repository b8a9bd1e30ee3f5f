"""`python -m dycoke.bench --gpu-suite OUT` (or `bench/gpu.sh OUT`): the prepared GPU run, every result under OUT.

The steps, in the order that keeps the most when time runs out: the machine, the CUDA-only tests, then each preset
(ov-0.5b, ov-7b) at 8, 32 and 128 frames for baseline, dycoke, ttm and dp in bfloat16 on the static cache, without
and then with a compiled decoding step. Each bench step is a separate process with its own time limit, so that a
step that runs out of time or memory loses only itself. `--dry-run` runs the same steps on `tiny-random` on the
CPU, in process and with the smallest settings (the compiled steps through torch.compile's eager backend), to
check the suite itself in about a minute of CPU time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

METHODS = "baseline,dycoke,ttm,dp"
CUDA_TESTS = ["tests/test_static_cache.py", "tests/test_video.py"]


@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]  # `python -m dycoke.bench` arguments, or a whole command when `command` is set
    limit_s: int
    command: bool = False


def suite_steps(out: Path, dry_run: bool) -> list[Step]:
    """What the suite runs; the dry run has the same steps, on tiny-random with the smallest settings."""
    python = sys.executable
    tests = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS, "-k", "cuda"]
    steps = [Step("cuda-tests", tests, 600 if dry_run else 120, command=True)]
    presets = ["tiny-random"] if dry_run else ["ov-0.5b", "ov-7b"]
    common = (["--frames", "2", "--device", "cpu", "--dtype", "float32", "--repeats", "1", "--warmup", "0",
               "--new-tokens", "3"] if dry_run else
              ["--frames", "8,32,128", "--dtype", "bfloat16", "--repeats", "3", "--warmup", "1",
               "--new-tokens", "32"])
    for compiled in (False, True):
        for preset in presets:
            name = f"{preset}-static" + ("-compile" if compiled else "")
            argv = ["--preset", preset, "--methods", METHODS, "--cache", "static", *common, "--quiet",
                    "--out", str(out / f"{name}.json"), "--html", ""]
            if compiled:
                argv += ["--compile"] + (["--compile-backend", "eager"] if dry_run else [])
            steps.append(Step(name, argv, 60 if dry_run else (150 if compiled else 120)))
    return steps


def run_step(step: Step, out: Path, in_process: bool) -> dict:
    """Run one step, its output in OUT/<name>.log; what happened, for the suite's summary."""
    log = out / f"{step.name}.log"
    started = time.perf_counter()
    if in_process and not step.command:
        from contextlib import redirect_stderr, redirect_stdout

        from dycoke.bench.cli import main

        with log.open("w") as stream, redirect_stdout(stream), redirect_stderr(stream):
            try:
                code = main(step.argv)
            except SystemExit as exit_:  # argparse errors
                code = exit_.code if isinstance(exit_.code, int) else 1
    else:
        command = step.argv if step.command else [sys.executable, "-m", "dycoke.bench", *step.argv]
        with log.open("w") as stream:
            try:
                code = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, timeout=step.limit_s,
                                      cwd=Path(__file__).resolve().parents[2], check=False).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
    return {"step": step.name, "exit": code, "seconds": round(time.perf_counter() - started, 1),
            "log": log.name}


def run_suite(out: Path, dry_run: bool = False) -> int:
    """Every step, whatever the earlier ones did; 0 when all passed. OUT/suite.json lists them, OUT/README.md
    gathers the tables."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "machine.json").write_text(json.dumps(_machine(), indent=1) + "\n")
    results = []
    for step in suite_steps(out, dry_run):
        results.append(run_step(step, out, in_process=dry_run))
        print(f"{step.name}: exit {results[-1]['exit']} in {results[-1]['seconds']} s", file=sys.stderr, flush=True)
    (out / "suite.json").write_text(json.dumps({"dry_run": dry_run, "steps": results}, indent=1) + "\n")
    (out / "README.md").write_text(_readme(out, results))
    return 0 if all(result["exit"] == 0 for result in results) else 1


def _machine() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu"}


def _readme(out: Path, results: list[dict]) -> str:
    """The steps and, for each bench step, the tables it printed."""
    lines = ["# GPU suite", "", "| step | exit | seconds |", "|---|---|---|"]
    lines += [f"| {r['step']} | {r['exit']} | {r['seconds']} |" for r in results]
    for result in results:
        log = (out / result["log"]).read_text(errors="replace")
        tables = [line for line in log.splitlines() if line.startswith("|") or "on a static" in line]
        if tables:
            lines += ["", f"## {result['step']}", "", *tables]
    return "\n".join(lines) + "\n"
