"""A new video's decode + preprocessing time: a git revision (before) against this checkout (after), interleaved.

    nice -n 15 python scripts/time_preprocessing.py --before 68d83ea --video ../shared/videos/street_720p_3s.mp4

Each measurement runs in its own fresh process (torch already imported), from the video's path to float32 pixel
values on the CPU; it reports wall time and the CPU seconds of the caller and of the processes that decoded.
"Before" is that revision's `load_video_isolated` + `to_pixel_values` (a new interpreter per video, full-size
frames back through a pipe, PIL resize and float passes in the caller). "After" is this checkout's
`VideoDecoder` with a warm worker (warmed on another video, as a server's is) + `to_pixel_values`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each prints "wall_s cpu_s": CPU seconds of the caller and of every process that decoded for it (on a machine
# shared with other work, CPU time is the steadier of the two).
CPU = """
import resource, psutil
import torch  # loaded before the clock starts, as in any process that runs the model
def cpu(worker=None):
    own, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    extra = sum(psutil.Process(worker).cpu_times()[:2]) if worker else 0.0
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + extra
"""

BEFORE = CPU + """
import sys, time
from dycoke.video import load_video_isolated, to_pixel_values
started, cpu_started = time.perf_counter(), cpu()
clip = load_video_isolated(sys.argv[1], int(sys.argv[2]))
pixels = to_pixel_values(clip.frames, 384)
print(time.perf_counter() - started, cpu() - cpu_started)
"""

AFTER = CPU + """
import sys, time
from dycoke.decoder import VideoDecoder
from dycoke.video import to_pixel_values
with VideoDecoder(workers=1) as decoder:
    decoder.load(sys.argv[3], 1)  # warm the worker on another video
    (worker,) = decoder.pids()
    started, cpu_started = time.perf_counter(), cpu(worker)
    clip = decoder.load(sys.argv[1], int(sys.argv[2]))
    pixels = to_pixel_values(clip.frames, 384)
    print(time.perf_counter() - started, cpu(worker) - cpu_started)
"""


def export(revision: str, target: Path) -> None:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "dycoke"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")


def measure(code: str, tree: Path, args: list[str]) -> tuple[float, float]:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=tree, env={"PYTHONPATH": str(tree),
                          "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True)
    wall, cpu = done.stdout.strip().splitlines()[-1].split()
    return float(wall), float(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="68d83ea", help="git revision of the old video path")
    parser.add_argument("--video", default=str(ROOT.parent / "shared" / "videos" / "street_720p_3s.mp4"))
    parser.add_argument("--warm-video", default=str(ROOT.parent / "shared" / "videos" / "edge" / "minimal.mp4"))
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--committed", action="store_true", help="time HEAD's dycoke, not the working tree")
    args = parser.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as old, tempfile.TemporaryDirectory() as new:
        export(args.before, Path(old))
        export("HEAD", Path(new)) if args.committed else None
        after_tree = Path(new) if args.committed else ROOT
        for _ in range(args.repeats):
            runs["before"].append(measure(BEFORE, Path(old), [args.video, str(args.frames)]))
            runs["after"].append(measure(AFTER, after_tree, [args.video, str(args.frames), args.warm_video]))
    for column, label in ((0, "wall"), (1, "cpu")):
        before, after = (statistics.median(r[column] for r in runs[k]) for k in ("before", "after"))
        for key in runs:
            print(f"{label} {key:6s} " + " ".join(f"{r[column]:.3f}" for r in runs[key])
                  + f"  median {statistics.median(r[column] for r in runs[key]):.3f} s")
        print(f"{label}: after / before = {after / before:.2f}")
    print(f"({args.frames} frames of {Path(args.video).name}, medians of {args.repeats}, interleaved)")


if __name__ == "__main__":
    main()
