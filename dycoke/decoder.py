"""Long-lived decoder worker processes: a hostile file can hang or crash FFmpeg, never the caller.

A `VideoDecoder` keeps a few worker processes (fresh interpreters, not forks, so they hold none of the server's
threads or locks). Each worker probes, checks the limits and decodes straight to the model's frame size, and
answers through a pipe: a JSON header and the raw uint8 frames, never a pickle, so even a subverted worker
cannot run code in the caller. A worker that runs past the time limit is killed; one that dies is reaped. Either
way a fresh one takes its place, and every worker dies with its parent.
"""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from dycoke.limits import VideoLimits
from dycoke.video import (
    _FIX_ENCODING, MODEL_FRAME_SIZE, DecoderFailure, FrameSize, GridFit, VideoClip, VideoError, check_file,
    display_name, load_video, size_from_json, size_to_json, target_size,
)

# The worker asks the kernel to kill it when its parent exits before it imports anything heavy, then serves.
WORKER_COMMAND = (sys.executable, "-c", "from dycoke.decoder import serve; serve()")
_HEADER = struct.Struct(">QQ")  # lengths of the JSON header and of the payload that follows it
_MAX_HEADER_BYTES = 1 << 20
_MAX_WRITE = 1 << 30  # Linux writes at most 2,147,479,552 bytes per call; ask for less and loop
_START_TIMEOUT_S = 120.0  # an interpreter that imports PyAV, numpy and PIL; generous for a loaded machine


class _Truncated(Exception):
    def __init__(self, got: int, wanted: int) -> None:
        super().__init__(f"{got} of {wanted} bytes")
        self.got, self.wanted = got, wanted


# ---------------------------------------------------------------- framing

def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write every byte: os.write may write fewer than asked (Linux caps one call at about 2 GiB)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view[:_MAX_WRITE])
        view = view[written:]


def read_exact(fd: int, size: int, deadline: float | None = None) -> bytearray:
    """Exactly `size` bytes; TimeoutError past `deadline` (time.monotonic), _Truncated at end of file."""
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError
        count = os.readv(fd, [view[got:]])
        if count == 0:
            raise _Truncated(got, size)
        got += count
    return buffer


def send_message(fd: int, header: dict, payload: bytes | bytearray | memoryview = b"") -> None:
    encoded = json.dumps(header).encode()
    payload = memoryview(payload).cast("B")
    write_all(fd, _HEADER.pack(len(encoded), payload.nbytes) + encoded)
    write_all(fd, payload)


def receive_message(fd: int, deadline: float | None = None, max_payload: int = 1 << 40) -> tuple[dict, bytearray]:
    header_size, payload_size = _HEADER.unpack(read_exact(fd, _HEADER.size, deadline))
    if header_size > _MAX_HEADER_BYTES or payload_size > max_payload:
        raise ValueError(f"message sizes out of range: header {header_size}, payload {payload_size}")
    header = json.loads(read_exact(fd, header_size, deadline))
    if not isinstance(header, dict):
        raise ValueError("message header is not an object")
    return header, read_exact(fd, payload_size, deadline)


# ---------------------------------------------------------------- one worker, seen from the caller

class DecoderWorker:
    """One worker process; not thread-safe (a `VideoDecoder` hands it to one caller at a time)."""

    def __init__(self, command: Sequence[str] = WORKER_COMMAND) -> None:
        self.command = list(command)
        self.process: subprocess.Popen | None = None
        self.ready = False  # the worker said it has imported everything and waits for requests

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.alive:
            return
        root = str(Path(__file__).resolve().parents[1])  # the worker imports this very checkout of dycoke
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
                   DYCOKE_DECODER_PARENT=str(os.getpid()))
        self.ready = False
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, env=env, close_fds=True)

    def stop(self) -> None:
        """Kill the process and reap it (no zombie is left)."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout):
            pipe.close()

    def decode(self, path: str | os.PathLike, num_frames: int, size: FrameSize, limits: VideoLimits) -> VideoClip:
        name = display_name(path)
        self.start()
        if not self.ready:  # its start-up is not part of the decode's time limit
            self._await_ready(name)
        request = {"path": os.fspath(path), "num_frames": num_frames, "size": size_to_json(size),
                   "limits": asdict(limits)}
        deadline = time.monotonic() + limits.decode_timeout_s
        try:
            send_message(self.process.stdin.fileno(), request)
            header, payload = receive_message(self.process.stdout.fileno(), deadline)
        except TimeoutError:
            self.stop()
            raise VideoError(f"decoding {{video}} took over {limits.decode_timeout_s:.0f} s; the file may be "
                             f"damaged: {_FIX_ENCODING}", name) from None
        except (_Truncated, BrokenPipeError, ValueError) as error:
            raise self._failure(name, error) from None
        return _clip_from(header, payload, num_frames, size, name)

    def _await_ready(self, name: str) -> None:
        try:
            header, _ = receive_message(self.process.stdout.fileno(), time.monotonic() + _START_TIMEOUT_S)
        except TimeoutError:
            self.stop()
            raise DecoderFailure(f"the video decoder process did not start within {_START_TIMEOUT_S:.0f} s "
                                 "(the server is overloaded); try again", name) from None
        except (_Truncated, ValueError) as error:
            raise self._failure(name, error) from None
        if header != {"ready": True}:
            self.stop()
            raise DecoderFailure("the video decoder process started wrongly; try again", name)
        self.ready = True

    def _failure(self, name: str, error: Exception) -> DecoderFailure:
        """The worker's answer did not arrive whole: say whether the worker died (on this file) or the transfer
        broke, and never call the file corrupt for it."""
        process = self.process
        if process is not None:
            try:
                process.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                pass
        code = None if process is None else process.poll()
        self.stop()
        if code is not None and code < 0:
            return DecoderFailure(f"the video decoder crashed (signal {signal.Signals(-code).name}) while reading "
                                  f"{{video}}; the file may be damaged: {_FIX_ENCODING}", name)
        detail = f"cut short after {error}" if isinstance(error, _Truncated) else f"unreadable ({error})"
        detail = detail.replace("{", "{{").replace("}", "}}")
        return DecoderFailure(f"the decoder's answer for {{video}} was {detail}: a fault in the server's decoder "
                              "process, not a verdict on the file; try again", name)


def _promised_size(shape: tuple, size: FrameSize, source_size) -> bool:
    """Whether frames of `shape` have the size the request asked for (a GridFit's from the displayed size)."""
    if not isinstance(size, GridFit):
        return size is None or tuple(shape[1:3]) == (size, size)
    valid = isinstance(source_size, list) and len(source_size) == 2 and all(
        isinstance(n, int) and n > 0 for n in source_size)
    return valid and tuple(shape[1:3]) == target_size(size, source_size[1], source_size[0])


def _clip_from(header: dict, payload: bytearray, num_frames: int, size: FrameSize, name: str) -> VideoClip:
    """The worker's reply, checked before use: its error, or frames of exactly the promised shape."""
    if not header.get("ok"):
        template = header.get("template")
        if not isinstance(template, str):
            raise DecoderFailure("the decoder's answer for {video} was malformed; try again", name)
        failure = DecoderFailure if header.get("kind") == "failure" else VideoError
        try:
            error = failure(template, name)
        except (KeyError, IndexError, ValueError, AttributeError):  # a template with other fields than {video}
            raise DecoderFailure("the decoder's answer for {video} was malformed; try again", name) from None
        raise error
    shape = tuple(header.get("shape", ()))
    if (len(shape) != 4 or not all(isinstance(n, int) and n > 0 for n in shape) or shape[0] > num_frames
            or shape[3] != 3 or not _promised_size(shape, size, header.get("source_size"))
            or int(np.prod(shape)) != len(payload) or len(header.get("timestamps", ())) != shape[0]):
        raise DecoderFailure("the decoder's answer for {video} was malformed; try again", name)
    return VideoClip(
        frames=np.frombuffer(payload, dtype=np.uint8).reshape(shape),
        timestamps=tuple(float(t) for t in header["timestamps"]),
        source_frames=int(header["source_frames"]),
        fps=float(header["fps"]),
        source_size=tuple(header["source_size"]),
        decoder_peak_bytes=int(header["peak_bytes"]),
    )


# ---------------------------------------------------------------- the pool

class VideoDecoder:
    """Up to `workers` decodes at once, each in its own long-lived worker process.

    A worker that hangs past the limit is killed, one that crashes is reaped, and a fresh one is started in its
    place; `close()` (or garbage collection, or interpreter exit) stops them all.
    """

    def __init__(self, workers: int = 2, command: Sequence[str] = WORKER_COMMAND) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.command = tuple(command)
        self._slots = threading.BoundedSemaphore(workers)
        self._lock = threading.Lock()
        self._idle: list[DecoderWorker] = []
        self._all: list[DecoderWorker] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._all)

    def start(self) -> None:
        """Start one worker ahead of the first request, so that no request waits for an interpreter."""
        with self._lock:
            if not self._idle:
                self._idle.append(self._new_worker())

    def _new_worker(self) -> DecoderWorker:
        worker = DecoderWorker(self.command)
        worker.start()
        self._all.append(worker)
        return worker

    def pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._all if w.alive]

    def load(self, path: str | os.PathLike, num_frames: int = 32, size: FrameSize = MODEL_FRAME_SIZE,
             limits: VideoLimits = VideoLimits()) -> VideoClip:
        """Decode in a worker: num_frames uniformly sampled frames at size x size, or as a GridFit says (None: as
        decoded)."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        started = time.perf_counter()
        check_file(path)  # cheap, and a FIFO must never be opened at all
        with self._slots:
            with self._lock:
                worker = self._idle.pop() if self._idle else self._new_worker()
            try:
                clip = worker.decode(path, num_frames, size, limits)
            finally:
                with self._lock:
                    if worker.alive:
                        self._idle.append(worker)
                    else:  # killed or crashed: replace it now, so that the next request finds one ready
                        self._all.remove(worker)
                        self._idle.append(self._new_worker())
        return replace(clip, decode_seconds=time.perf_counter() - started)

    def close(self) -> None:
        with self._lock:
            self._finalizer()
            self._idle.clear()

    def __enter__(self) -> "VideoDecoder":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _stop_all(workers: list[DecoderWorker]) -> None:
    for worker in workers:
        worker.stop()
    workers.clear()


def load_video_isolated(path: str | os.PathLike, num_frames: int = 32, limits: VideoLimits = VideoLimits(),
                        size: FrameSize = MODEL_FRAME_SIZE) -> VideoClip:
    """One decode in a worker that is stopped afterwards (the CLI's one request)."""
    with VideoDecoder(workers=1) as decoder:
        return decoder.load(path, num_frames, size, limits)


# ---------------------------------------------------------------- the worker's side

def _reply(request: dict) -> tuple[dict, np.ndarray | bytes]:
    path = request["path"]
    try:
        clip = load_video(path, int(request["num_frames"]), size_from_json(request["size"]),
                          VideoLimits(**request["limits"]))
    except VideoError as error:
        return {"ok": False, "kind": "video", "template": error.template}, b""
    except MemoryError:
        return {"ok": False, "kind": "failure", "template": "the decoder ran out of memory on {video}; use fewer "
                "frames or a smaller video"}, b""
    except Exception as error:  # a decoder bug on this file: say so, with the type only (no data from the file)
        return {"ok": False, "kind": "video", "template": f"decoding {{video}} failed ({type(error).__name__}); "
                f"the file may be damaged: {_FIX_ENCODING}"}, b""
    header = {"ok": True, "shape": list(clip.frames.shape), "timestamps": list(clip.timestamps),
              "source_frames": clip.source_frames, "fps": clip.fps, "source_size": list(clip.source_size),
              "peak_bytes": clip.decoder_peak_bytes}
    return header, clip.frames


def _die_with_parent() -> bool:
    """Linux: the kernel kills this worker when the process that started it exits, however that happens.
    False if that parent is already gone."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    parent = os.environ.get("DYCOKE_DECODER_PARENT")
    return parent is None or str(os.getppid()) == parent


def serve(read_fd: int = 0, write_fd: int = 1) -> None:
    """Answer decode requests until the caller closes the pipe."""
    if not _die_with_parent():
        return
    replies = os.dup(write_fd)
    os.dup2(2, write_fd)  # a stray print from a library goes to stderr, never into a reply
    send_message(replies, {"ready": True})
    while True:
        try:
            request, _ = receive_message(read_fd)
        except _Truncated:
            return
        header, payload = _reply(request)
        send_message(replies, header, payload)


if __name__ == "__main__":
    serve()
