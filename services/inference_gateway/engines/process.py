"""Continuous batching in a child process, so decoding and serving do not share a GIL.

Why a process: with the decoding loop on a thread of the gateway, every tensor
operation hands the GIL to the event loop and back; under 64 streaming clients
a decoding step took 2.6x as long as it does alone and the gateway process
never used more than one core's worth of CPU. In its own process the loop has
its own interpreter and core; the gateway keeps the tokenizer (prompts are
encoded and refused before they cost the engine anything) and the protocols.

Two pipes connect them. Down: ("add", id, prompt ids, sampling) / ("cancel", id)
/ ("retire",) / ("stop",). Up: one message per decoding step with every
sequence's new text, so a step costs one pickle and one wake-up however large
the batch. If the child dies (OOM killer, a crash in a kernel, kill -9), the
requests it held fail at once with `EngineUnavailable` (UNAVAILABLE / 503 with
Retry-After: the client may retry), and a new child is started for the ones
that follow; until it is ready, new requests get the same answer.

A child that exits because the gateway asked it to (close() at shutdown,
retire() after a newer version) is reaped and never restarted; the child
ignores SIGINT (a Ctrl-C in the terminal reaches the whole process group, and
the gateway decides when its engines stop) and stops when the gateway's end of
the pipe closes. An engine still open when the interpreter exits is closed
first, so multiprocessing's own exit handler cannot make it look crashed.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import signal
import threading
import weakref
from collections.abc import AsyncIterator
from dataclasses import astuple
from multiprocessing.connection import Connection
from pathlib import Path

from prometheus_client import Gauge, Histogram

from lmforge.modeling import load_tokenizer
from services.inference_gateway.engines.base import (
    EncodedPrompt,
    Piece,
    SamplingParams,
    default_threads,
)
from services.inference_gateway.engines.decoding import encode_prompt
from services.inference_gateway.engines.int4_report import Int4Report
from services.inference_gateway.errors import EngineUnavailable, GatewayError, GenerationFailed

log = logging.getLogger("lmforge.gateway.engine_process")

BATCH_SIZE = Histogram("lmforge_gateway_batch_size", "Sequences per decoding step.",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
QUEUE_DEPTH = Gauge("lmforge_gateway_queue_depth", "Requests waiting to join the batch.")
ENGINE_RSS = Gauge("lmforge_gateway_engine_rss_bytes",
                   "Resident memory of an engine process (read from /proc at scrape time).",
                   ["version"])
KV_ROWS = Gauge("lmforge_gateway_kv_cache_rows_used",
                "KV-cache rows (one per running sequence) in use in an engine.", ["version"])
KV_OCCUPANCY = Gauge("lmforge_gateway_kv_cache_occupancy_ratio",
                     "KV-cache rows in use over the rows the engine has (its max batch).",
                     ["version"])
START_TIMEOUT_S = 600
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

Mailbox = asyncio.Queue[Piece | GatewayError]
"""Where one request's pieces (or the error that ends it) wait for its event loop."""


def _serve(model_dir: str, dtype: str, device: str, max_batch: int, threads: int,
           requests: Connection, pieces: Connection) -> None:
    """The child: load the model, then decode until told to stop or the parent goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    from services.inference_gateway.engines.batching import BatchingLoop
    from services.inference_gateway.engines.torch import load_serving_model_reporting

    torch.set_num_threads(threads)
    try:
        model, report = load_serving_model_reporting(Path(model_dir), dtype, device)
        tokenizer = load_tokenizer(Path(model_dir))

        def deliver(items: list[tuple[int, Piece | str]], sizes: list[int],
                    waiting: int) -> None:
            pieces.send(([(i, p if isinstance(p, str) else astuple(p)) for i, p in items],
                         sizes, waiting))

        stop, retiring = threading.Event(), threading.Event()

        def receive(timeout: float) -> None:
            """Act on every message that has arrived, waiting up to `timeout` for one."""
            while not stop.is_set() and requests.poll(timeout):
                timeout = 0.0
                try:
                    message = requests.recv()
                except (EOFError, OSError):  # the gateway is gone: so are its clients
                    message = ("stop",)
                kind = message[0]
                if kind == "add":
                    _, seq_id, prompt_ids, params = message
                    loop.submit(seq_id, prompt_ids, SamplingParams(*params))
                elif kind == "cancel":
                    loop.cancel(message[1])
                elif kind == "retire":
                    retiring.set()
                else:
                    stop.set()

        loop = BatchingLoop(model, tokenizer, max_batch=max_batch, deliver=deliver,
                            receive=receive)
    except Exception as exc:
        pieces.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    pieces.send(("ready", None if report is None else (report.layers, report.dequantised)))
    loop.run(stop, retiring)


def _deliver(items: list[tuple[Mailbox, Piece | GatewayError]]) -> None:
    for out, piece in items:
        out.put_nowait(piece)


_OPEN: weakref.WeakSet[EngineProcess] = weakref.WeakSet()


@atexit.register
def _close_open_engines() -> None:
    """At interpreter exit, before multiprocessing terminates its daemonic children (its
    exit handler was registered earlier, so it runs later): a child stopped that way must
    not look like a crash to be restarted."""
    for engine in list(_OPEN):
        engine.close()


class EngineProcess:
    """A batching engine for the PyTorch model in `model_dir`, decoding in a child process."""

    def __init__(self, model_dir: Path, *, version: str, dtype: str = "fp32",
                 device: str = "cpu", max_batch: int = 32, threads: int = 0) -> None:
        self.version = version
        self.model_dir = Path(model_dir)
        self.dtype, self.device, self.max_batch = dtype, device, max_batch
        self.threads = threads or default_threads()
        self.tokenizer = load_tokenizer(self.model_dir)
        config = json.loads((self.model_dir / "config.json").read_text())
        self.context_length: int = config["max_position_embeddings"]
        self._ids = itertools.count(1)
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, Mailbox]] = {}
        self._send_lock = threading.Lock()
        self._closing = self._retiring = False
        self.restarts = 0
        self.int4_report: Int4Report | None = None
        """For a packed int4 model, which layers the child's load served dequantised."""
        self._start()
        _OPEN.add(self)

    # -- the child's lifecycle ----------------------------------------------------------

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that runs gRPC threads
        requests_out, requests_in = ctx.Pipe(duplex=False)
        pieces_out, pieces_in = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_serve, name=f"lmforge-engine-{self.version}", daemon=True,
            args=(str(self.model_dir), self.dtype, self.device, self.max_batch, self.threads,
                  requests_out, pieces_in))
        process.start()
        requests_out.close()
        pieces_in.close()
        if not pieces_out.poll(START_TIMEOUT_S):
            process.kill()
            raise RuntimeError(f"engine process for {self.model_dir} did not start in "
                               f"{START_TIMEOUT_S} s")
        try:
            kind, detail = pieces_out.recv()
        except EOFError:
            process.join(5)
            kind, detail = "failed", f"exit code {process.exitcode}"
        if kind != "ready":
            process.join(5)
            raise RuntimeError(f"engine process could not load {self.model_dir}: {detail}")
        report = None if detail is None else Int4Report(*detail)
        if self.restarts and report != self.int4_report:
            # What /v1/models and model.deployed said was recorded at the first load.
            log.error("engine process for %s restarted with other int4 layers than it "
                      "was deployed with: now %s, was %s", self.model_dir, report,
                      self.int4_report)
        self.int4_report = report
        with self._send_lock:
            self.process, self._requests = process, requests_in
        self._waiting = 0
        ENGINE_RSS.labels(self.version).set_function(self.rss_bytes)
        KV_ROWS.labels(self.version).set_function(self.kv_rows_used)
        KV_OCCUPANCY.labels(self.version).set_function(
            lambda: self.kv_rows_used() / self.max_batch)
        threading.Thread(target=self._read, args=(pieces_out,), name="engine-pieces",
                         daemon=True).start()

    def _read(self, pieces: Connection) -> None:
        """Route each step's pieces to the event loops their requests wait on."""
        while True:
            try:
                items, sizes, waiting = pieces.recv()
            except (EOFError, OSError):
                pieces.close()
                break
            for size in sizes:
                BATCH_SIZE.observe(size)
            QUEUE_DEPTH.set(waiting)
            self._waiting = waiting
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Mailbox, Piece | GatewayError]]]
            by_loop = {}
            for seq_id, item in items:
                target = self._streams.get(seq_id)
                if target is None:
                    continue  # cancelled while the step ran
                loop, out = target
                piece = Piece(*item) if isinstance(item, tuple) else GenerationFailed(item)
                by_loop.setdefault(loop, []).append((out, piece))
            for loop, batch in by_loop.items():
                with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits there
                    loop.call_soon_threadsafe(_deliver, batch)
        self._child_gone()

    def rss_bytes(self) -> float:
        """The engine process's resident set, from /proc (Linux); 0 once it has exited."""
        pid = self.process.pid
        try:
            resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            return 0.0
        return float(resident_pages * PAGE_SIZE)

    def kv_rows_used(self) -> float:
        """Sequences holding a cache row: those streaming, less those queued for one."""
        return float(min(self.max_batch, max(0, len(self._streams) - self._waiting)))

    def _forget_metrics(self) -> None:
        for gauge in (ENGINE_RSS, KV_ROWS, KV_OCCUPANCY):
            with contextlib.suppress(KeyError):
                gauge.remove(self.version)

    def _child_gone(self) -> None:
        self.process.join(5)  # reap it, whyever it went
        if self._closing or self._retiring:
            self._forget_metrics()
            return
        code = self.process.exitcode
        log.error("engine process for %s exited (code %s); failing %d requests, restarting",
                  self.version, code, len(self._streams))
        for loop, out in list(self._streams.values()):
            error = EngineUnavailable(f"the engine process exited (code {code}) during "
                                      "generation; it is being restarted, retry the request")
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(out.put_nowait, error)
        with self._send_lock:
            self._requests.close()
        self.restarts += 1
        try:
            self._start()  # meanwhile _send refuses at once: the old pipe is closed
        except Exception:
            log.exception("engine process for %s could not be restarted", self.version)
            return
        if self._closing:  # close() came while the new child was starting: stop it too
            self._stop_child()

    def _send(self, message: tuple[object, ...]) -> None:
        with self._send_lock:
            try:
                self._requests.send(message)
            except (OSError, ValueError) as exc:  # the child is gone; _read restarts it
                raise EngineUnavailable("the engine process is restarting; retry the "
                                        "request") from exc

    def close(self) -> None:
        """Stop the child now and reap it; nothing restarts it (the gateway is stopping)."""
        self._closing = True
        _OPEN.discard(self)
        self._forget_metrics()
        self._stop_child()

    def _stop_child(self) -> None:
        with contextlib.suppress(EngineUnavailable):
            self._send(("stop",))
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    def retire(self) -> None:
        """Finish what is running and queued, then let the child exit."""
        self._retiring = True
        with contextlib.suppress(EngineUnavailable):
            self._send(("retire",))

    # -- what the frontend calls --------------------------------------------------------

    def encode_prompt(self, prompt: str) -> EncodedPrompt:
        return encode_prompt(self.tokenizer, self.context_length, prompt)

    async def astream(self, prompt: EncodedPrompt, params: SamplingParams,
                      cancelled: threading.Event) -> AsyncIterator[Piece]:
        seq_id = next(self._ids)
        out: Mailbox = asyncio.Queue()
        self._streams[seq_id] = (asyncio.get_running_loop(), out)
        finished = False
        try:
            self._send(("add", seq_id, list(prompt.token_ids), astuple(params)))
            while True:
                item = await out.get()
                # When the client side falls behind, pieces queue up: send them as one
                # (fewer messages is what lets the loop catch up).
                while isinstance(item, Piece) and not item.finish_reason:
                    try:
                        following = out.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                    if isinstance(following, GatewayError):
                        item = following
                        break
                    item = Piece(item.text + following.text, following.completion_tokens,
                                 following.prompt_tokens, following.finish_reason)
                if isinstance(item, GatewayError):
                    finished = True
                    raise item
                if item.finish_reason:
                    finished = True
                yield item
                if finished:
                    return
                if cancelled.is_set():  # e.g. a stop string matched upstream
                    return
        finally:
            self._streams.pop(seq_id, None)
            if not finished:  # the client went away, or a stop string ended it
                with contextlib.suppress(EngineUnavailable):
                    self._send(("cancel", seq_id))
