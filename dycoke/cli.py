"""`python -m dycoke answer VIDEO "QUESTION" ...`: one request from the command line (DESIGN.md §4)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from dycoke.config import ConfigError, DyCokeConfig
from dycoke.limits import MAX_FRAMES, RequestError, check_frames, check_new_tokens, clean_question
from dycoke.methods import configure, get_method, matchable_names, method_names
from dycoke.video import VideoError, load_video_isolated

RANDOM_NOTICE = ("note: the '{name}' model has random weights; its answers are meaningless "
                 "(token counts and timings are real)")


# Methods whose knobs become CLI options straight from their knob specs (the older ones have theirs spelled out).
KNOB_FLAG_METHODS = ("holitom", "fastvid", "vidcom2", "flashvid")


def knob_flags() -> list:
    """The knobs that get a CLI option of their own, `--` + the knob name with dashes."""
    return [knob for name in KNOB_FLAG_METHODS for knob in get_method(name).knobs()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dycoke", description="DyCoke token compression for video LLMs")
    commands = parser.add_subparsers(dest="command", required=True)
    answer = commands.add_parser("answer", help="answer a question about a video")
    answer.add_argument("video", help="path to a video file")
    answer.add_argument("question", help="the question to ask about the video")
    answer.add_argument("--model", default="tiny-random",
                        help="a random-weight preset (tiny-random, mini, ov-0.5b, ov-7b, qwen2.5-vl-tiny, "
                             "qwen3-vl-tiny, qwen2.5-vl-7b, qwen3-vl-8b), tiny (the trained checkpoint), a Hugging "
                             "Face Hub id of LLaVA-OneVision, Qwen2.5-VL or Qwen3-VL, or a local directory "
                             "(default: tiny-random)")
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
    answer.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    answer.add_argument("--json", action="store_true", help="print one JSON object with answer, metrics and trace")
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
    clean_question(args.question)
    check_new_tokens(args.max_new_tokens)
    clip = load_video_isolated(args.video, check_frames(args.frames))

    from dycoke.models import ModelLoadError, load  # heavy imports once the cheap checks have passed
    from dycoke.pipeline import Pipeline, TextDelta

    try:
        pipeline = Pipeline(load(args.model, device=args.device))
    except ModelLoadError as error:
        raise RequestError(str(error)) from error
    options = dict(method=method, config=config, max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos)
    if args.json:
        print(json.dumps(pipeline.answer(clip, args.question, **options).to_dict()))
        return 0
    for event in pipeline.stream(clip, args.question, **options):
        if isinstance(event, TextDelta):
            print(event.text, end="", flush=True)
    print()
    if pipeline.loaded.is_random:
        print(RANDOM_NOTICE.format(name=pipeline.loaded.name), file=sys.stderr)
    return 0


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
