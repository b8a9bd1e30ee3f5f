"""`python -m dycoke.bench`: the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dycoke.bench.report import decode_table, describe, markdown_table, targets_table, write_chart
from dycoke.bench.runner import BenchSettings, run_bench
from dycoke.bench.specs import parse_methods
from dycoke.bench.summary import targets
from dycoke.caches import CACHE_KINDS
from dycoke.methods import get_method, matchable_names, method_names


# Repeats and warm-up per preset (dycoke.models.PRESETS): the CPU-sized ones (`mini`, the tiny ones) at 8 and 32
# frames stay within a few minutes on two CPU cores; the others have the real models' sizes, for a GPU.
PRESET_DEFAULTS = {
    "tiny-random": dict(repeats=3, warmup=1),
    "mini": dict(repeats=3, warmup=1),
    "ov-0.5b": dict(repeats=5, warmup=1),
    "ov-7b": dict(repeats=5, warmup=1),
    "qwen2.5-vl-tiny": dict(repeats=3, warmup=1),
    "qwen3-vl-tiny": dict(repeats=3, warmup=1),
    "qwen2.5-vl-7b": dict(repeats=5, warmup=1),
    "qwen3-vl-8b": dict(repeats=5, warmup=1),
}
DEFAULT_RUNS = dict(repeats=5, warmup=1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dycoke.bench",
        description="Latency, memory and physical limits of every method, side by side in one process.",
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--preset", choices=list(PRESET_DEFAULTS),
                       help="random-weight model with the compute and geometry of its name (default: mini)")
    model.add_argument("--model", help="real weights: a Hugging Face Hub id or a local path")
    parser.add_argument("--frames", default="8,32", help="comma-separated frame counts (default: 8,32)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods, each optionally with settings, e.g. dycoke:tau=-1 "
                             f"(default: every registered method: {','.join(method_names())})")
    parser.add_argument("--match", default=None, metavar="METHOD",
                        help=f"give every peer with a budget knob ({', '.join(matchable_names())}) the "
                             "attended visual budget of METHOD, e.g. dycoke")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request, EOS ignored")
    parser.add_argument("--repeats", type=int, default=None, help="measured repeats (default depends on the preset)")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured repeats first (default: 1)")
    parser.add_argument("--video", default=None, help="a video file instead of the synthetic clip")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--cache", choices=list(CACHE_KINDS), default="static",
                        help="KV cache of every request: static (preallocated, transformers' StaticCache; DP decides "
                             "on the device) or dynamic (DynamicCache; DP decides on the host), the bench's baseline "
                             "before issue 12 (default: static)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decoding step of every method whose cache allows it (static); a "
                             "failure is noted in the report and the run goes on uncompiled")
    parser.add_argument("--compile-backend", default="inductor", help="with --compile: the torch.compile backend "
                        "(default: inductor, with CUDA graphs on CUDA; 'eager' checks the tracing only)")
    parser.add_argument("--out", default="results.json", help="JSON report (default: results.json)")
    parser.add_argument("--html", default=None, help="Plotly chart (default: the --out path with .html; '' for none)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--gpu-suite", default=None, metavar="OUT",
                        help="instead: the prepared GPU suite (ov-7b and ov-0.5b at 8, 32, 128 frames, baseline, "
                             "dycoke, ttm, dp, bf16, static cache with and without compile, the CUDA tests), "
                             "everything under OUT")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --gpu-suite: the same steps on tiny-random on the CPU (about a minute of CPU time)")
    parser.add_argument("--turns", type=int, default=None, metavar="N",
                        help="instead: conversations of N turns, each follow-up's TTFT with and without reusing the "
                             "video prefix and earlier turns (default methods: baseline,dycoke)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.gpu_suite is not None:
        from dycoke.bench.suite import run_suite

        return run_suite(Path(args.gpu_suite), dry_run=args.dry_run)
    if args.dry_run:
        parser.error("--dry-run goes with --gpu-suite")
    try:
        frames = [int(part) for part in args.frames.split(",") if part.strip()]
        methods = parse_methods(args.methods)
        if args.match is not None:
            get_method(args.match)
    except ValueError as error:  # ConfigError is a ValueError too
        parser.error(str(error))
    if not frames or any(not 1 <= f <= 256 for f in frames):
        parser.error(f"--frames must be comma-separated integers in 1..256, got {args.frames!r}")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2: the decode figures need a second token")
    if args.turns is not None and args.turns < 2:
        parser.error("--turns must be at least 2: a conversation needs a follow-up")
    name = args.model or args.preset or "mini"
    runs = PRESET_DEFAULTS.get(name, DEFAULT_RUNS)
    repeats = runs["repeats"] if args.repeats is None else args.repeats
    warmup = runs["warmup"] if args.warmup is None else args.warmup
    if repeats < 1 or warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")

    from dycoke.models import ModelLoadError, load
    from dycoke.pipeline import Pipeline

    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        loaded = load(name, device=args.device, dtype=dtype)
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    compile_decode = (True if args.compile_backend == "inductor" else args.compile_backend) if args.compile else False
    pipeline = Pipeline(loaded, cache=args.cache, compile_decode=compile_decode)
    if args.compile:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # methods x shapes
    if args.turns is not None:
        from dycoke.bench.turns import TurnSettings, main_turns

        chosen = methods if args.methods else parse_methods("baseline,dycoke")
        return main_turns(pipeline, TurnSettings(frames, chosen, args.turns, args.new_tokens, repeats, warmup),
                          args.out, log)
    settings = BenchSettings(frames=frames, methods=methods, new_tokens=args.new_tokens, repeats=repeats,
                             warmup=warmup, video=args.video, match=args.match)
    log(f"benchmarking {loaded.describe()}: frames {frames}, methods {[m.label for m in methods]}, "
        f"{repeats} repeats + {warmup} warm-up")
    report = run_bench(pipeline, settings, log=log)
    report["targets"] = targets(report)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    html = out.with_suffix(".html") if args.html is None else (Path(args.html) if args.html else None)
    if html is not None:
        html.parent.mkdir(parents=True, exist_ok=True)
        write_chart(report, html)
    print(describe(report))
    print()
    print(markdown_table(report))
    print()
    print(decode_table(report))
    if report["targets"]:
        print()
        print(targets_table(report))
    log(f"wrote {out}" + (f" and {html}" if html else ""))
    return 0

