"""`python -m dycoke answer VIDEO "Q1" ["Q2" ...]`: one conversation from the command line (DESIGN.md §4).

Several questions are asked in order as one conversation, each turn reusing the video prefix and the turns
before it (`--no-reuse` recomputes every turn from scratch: same prompt, same answers).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from dycoke import OFFLINE_DEFAULT
from dycoke.config import ConfigError, DyCokeConfig
from dycoke.limits import MAX_FRAMES, RequestError, check_frames, check_new_tokens, clean_question
from dycoke.methods import configure, get_method, matchable_names, method_names
from dycoke.decoder import load_video_isolated
from dycoke.video import MODEL_FRAME_SIZE, VideoError

DTYPES = ("float32", "float64", "bfloat16")


# Methods whose knobs become CLI options straight from their knob specs (the older ones have theirs spelled out).
KNOB_FLAG_METHODS = ("holitom", "fastvid", "vidcom2", "flashvid")


def knob_flags() -> list:
    """The knobs that get a CLI option of their own, `--` + the knob name with dashes."""
    return [knob for name in KNOB_FLAG_METHODS for knob in get_method(name).knobs()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dycoke", description="DyCoke token compression for video LLMs")
    commands = parser.add_subparsers(dest="command", required=True)
    answer = commands.add_parser("answer", help="answer questions about a video, as one conversation")
    answer.add_argument("video", help="path to a video file")
    answer.add_argument("questions", nargs="+", metavar="QUESTION",
                        help="the question to ask about the video; more than one are asked in order, as one "
                             "conversation")
    answer.add_argument("--model", default=OFFLINE_DEFAULT,
                        help="tiny (trained on synthetic shapes), a random-weight preset (tiny-random, mini, "
                             "ov-0.5b, ov-7b, qwen2.5-vl-tiny, qwen3-vl-tiny, qwen2.5-vl-7b, qwen3-vl-8b), a Hugging "
                             "Face Hub id of LLaVA-OneVision, Qwen2.5-VL or Qwen3-VL, or a local path "
                             f"(default: {OFFLINE_DEFAULT})")
    answer.add_argument("--method", default="dycoke", choices=method_names(), help="compression method")
    answer.add_argument("--frames", type=int, default=32, help=f"frames sampled uniformly, 1..{MAX_FRAMES}")
    answer.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens")
    answer.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    defaults = DyCokeConfig()
    answer.add_argument("--merge-ratio", type=float, default=defaults.merge_ratio, help="K: TTM merge ratio, [0, 1)")
    answer.add_argument("--window", type=int, default=defaults.window, help="W: TTM window, a power of two")
    answer.add_argument("--prune-layer", type=int, default=defaults.prune_layer, help="L: first pruned layer")
    answer.add_argument("--prune-ratio", type=float, default=defaults.prune_ratio, help="P: DP prune ratio, [0, 1)")
    answer.add_argument("--threshold", type=float, default=defaults.reselect_threshold,
                        help="tau: reselect when attention drifts below this cosine similarity, [-1, 1]")
    peers = ", ".join(matchable_names())
    answer.add_argument("--match", choices=method_names(), default=None, metavar="METHOD",
                        help=f"set the drop ratio of {peers} so that the visual tokens attended per decoding step "
                             "equal METHOD's under the current settings (random and uniform-frames match dycoke "
                             "unless given --drop-ratio)")
    fastv, visionzip, seeded = get_method("fastv"), get_method("visionzip"), get_method("random")
    answer.add_argument("--fastv-layer", type=int, default=None,
                        help=f"K: fastv drops visual tokens from this layer on (default: {fastv.layer})")
    answer.add_argument("--fastv-ratio", type=float, default=None,
                        help=f"R: share of visual tokens fastv drops, [0, 1) (default: {fastv.ratio})")
    answer.add_argument("--visionzip-dominant", type=int, default=None,
                        help=f"dominant tokens visionzip keeps per frame (default: {visionzip.dominant})")
    answer.add_argument("--visionzip-contextual", type=int, default=None,
                        help=f"merged contextual tokens visionzip adds per frame (default: {visionzip.contextual})")
    answer.add_argument("--drop-ratio", type=float, default=None,
                        help="share of visual tokens random and uniform-frames drop, [0, 1) (default: match dycoke)")
    answer.add_argument("--seed", type=int, default=None, help=f"seed of the random method (default: {seeded.seed})")
    for knob in knob_flags():
        answer.add_argument(knob.cli_flag, dest=knob.name, type=float if knob.kind == "float" else int, default=None,
                            help=f"{knob.help} (default: {knob.default})".replace("%", "%%"))
    answer.add_argument("--no-reuse", action="store_true",
                        help="recompute every turn from scratch instead of reusing the video prefix and earlier "
                             "turns (same prompt, same answers; for comparison)")
    answer.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    answer.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weights and activations (default: bfloat16 on cuda, float32 on cpu)")
    answer.add_argument("--json", action="store_true",
                        help="print one JSON object with answer, metrics and trace (a JSON array of them, one per "
                             "turn, for several questions)")
    return parser


def run_answer(args: argparse.Namespace) -> int:
    config = DyCokeConfig(
        merge_ratio=args.merge_ratio,
        window=args.window,
        prune_layer=args.prune_layer,
        prune_ratio=args.prune_ratio,
        reselect_threshold=args.threshold,
    )
    method = configure(args.method, match=args.match, fastv_layer=args.fastv_layer, fastv_ratio=args.fastv_ratio,
                       visionzip_dominant=args.visionzip_dominant, visionzip_contextual=args.visionzip_contextual,
                       drop_ratio=args.drop_ratio, seed=args.seed,
                       **{knob.name: getattr(args, knob.name) for knob in knob_flags()})
    for question in args.questions:
        clean_question(question)
    check_new_tokens(args.max_new_tokens)
    clip = load_video_isolated(args.video, check_frames(args.frames))

    import torch  # heavy imports once the cheap checks have passed

    from dycoke.conversation import Conversation
    from dycoke.models import ModelLoadError, load
    from dycoke.pipeline import Pipeline, Result, TextDelta

    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        with progress_bars_only_on_a_terminal():
            pipeline = Pipeline(load(args.model, device=args.device, dtype=dtype))
    except ModelLoadError as error:
        raise RequestError(str(error)) from error
    if pipeline.frame_size != MODEL_FRAME_SIZE:  # checked above at LLaVA-OneVision's size; Qwen-VL keeps the aspect
        clip = load_video_isolated(args.video, check_frames(args.frames), size=pipeline.frame_size)
    conversation = Conversation(pipeline, clip, method, config, max_new_tokens=args.max_new_tokens,
                                ignore_eos=args.ignore_eos, reuse=not args.no_reuse)
    results = []
    for question in args.questions:
        if not args.json and len(args.questions) > 1:
            print(f"> {question}", flush=True)
        for event in conversation.ask(question):
            if isinstance(event, Result):
                results.append(event.to_dict())
            elif isinstance(event, TextDelta) and not args.json:
                print(event.text, end="", flush=True)
        if not args.json:
            print()
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results))
    elif pipeline.loaded.notice:
        print(f"note: '{pipeline.loaded.name}' is {pipeline.loaded.notice}", file=sys.stderr)
    return 0


@contextmanager
def progress_bars_only_on_a_terminal() -> Iterator[None]:
    """Weight-loading progress bars for a person watching; none in captured stderr, where an error is one line."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return run_answer(args)
    except (ConfigError, RequestError, VideoError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
