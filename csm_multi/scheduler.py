"""Continuous batching: one frame loop over a dynamic batch of independent generation requests.

The scheduler owns the model while it runs: every generation is a `GenerationRequest` (a prompt's
frames, sampling settings, a seed, a frame limit; plain tensors and numbers, so it can cross a
process boundary) and comes back as a `Ticket` that yields the request's frames as they are made.
A new request is prefilled into a free row of the KV cache (its own positions 0..S-1) and joins the
batch at the next frame boundary; a row that emits the end frame, reaches its frame limit or is
cancelled leaves, and the last row moves into its slot so the active rows stay 0..n-1.

Each row samples with its own generator seeded with the request's seed and writes its own cache
row at its own positions, so a request's codes are those it gets alone with that seed (exactly on
CPU float32 for the tiny preset, tests/test_scheduler.py; within float rounding of batched
products elsewhere). Decoding and watermarking are not done here: the caller's thread does them
while the frame loop goes on with the other rows.

Admission: at most `max_rows` rows (`row_budget`, when given, may lower it at run time, e.g. from
free GPU memory), a bounded FIFO wait queue (`max_waiting`, and `waiting_per_visitor` for one
visitor), and a per-visitor share (`per_visitor` rows) that applies while other visitors wait: a
visitor's extra requests are admitted only into rows nobody else is waiting for. Beyond the bounds,
`submit` raises `BusyError`. A joining request's prompt goes through the backbone in the same steps
as the running rows' next frames (its own calls, at most `prefill_chunk` positions a step), and its
first frame shares that step's depth-decoder pass with them, so a join delays the others by one
chunk of prefill per step. With a `prefix.PrefixCache`, the longest run of frames the prompt shares
with a kept state is copied into its row instead, and only the rest is prefilled. The lookup is made
when the prompt's prefill begins, and a prompt's state is kept as soon as its prefill is done, so
prompts queued together share it: the takes of a line (the same prompt: prefilled once), the lines
of a fast-mode script and visitors using the same voices. A row that ends leaves its state (prompt
+ fed frames) to the cache too, for the next line of a dialogue.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import queue
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from . import omp
from .errors import BusyError
from .frames import is_eos
from .fused import large_products
from .generate import Sampler, depth_frame, next_frame_input
from .model import CSM
from .prefix import PrefixCache, fed_frames
from .sampling import sample_topk

log = logging.getLogger(__name__)

_VISITOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("csm_multi_visitor", default=None)


@contextlib.contextmanager
def as_visitor(visitor: str | None) -> Iterator[None]:
    """Generations started in this block (this thread) count against `visitor`'s share of the batch."""
    token = _VISITOR.set(visitor)
    try:
        yield
    finally:
        _VISITOR.reset(token)


def current_visitor() -> str | None:
    return _VISITOR.get()


@dataclass(frozen=True)
class GenerationRequest:
    """One utterance to generate: prompt frames (S, K+1) and mask, sampling, seed and frame limit."""

    tokens: torch.Tensor
    mask: torch.Tensor
    temperature: float
    topk: int
    seed: int
    max_frames: int
    visitor: str | None = None


_END = object()


class Ticket:
    """A submitted request. Iterate it for its frames ((K,) int64 tensors) until the end frame or
    the frame limit; `cancel()` stops it (its row leaves at the next frame boundary)."""

    def __init__(self, request: GenerationRequest, scheduler: Scheduler):
        self.request = request
        self._scheduler = scheduler
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._scheduler._wake()

    @property
    def waiting(self) -> int:
        """1-based place in the wait queue; 0 once it runs (or has ended)."""
        return self._scheduler._place(self)

    def frames(self, on_wait: Callable[[int], None] | None = None, poll_s: float = 0.5) -> Iterator[torch.Tensor]:
        """The request's frames as they are made. `on_wait(place)` hears the wait-queue place every
        `poll_s` while the request waits. Leaving the loop early (break, an exception) cancels it."""
        omp.release()  # this thread waits while another generates: its idle OpenMP pool would slow that one (omp.py)
        try:
            while True:
                try:
                    item = self._items.get(timeout=poll_s)
                except queue.Empty:
                    place = self.waiting
                    if on_wait is not None and place:
                        on_wait(place)
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()

    __iter__ = frames

    def _put(self, item) -> None:
        self._items.put(item)


@dataclass
class _Row:
    ticket: Ticket
    generator: torch.Generator
    pos: int  # cache slots filled = the next frame's position
    last: torch.Tensor  # (K,) the frame it made last (the next step's input)
    frames: int = 0
    made: list[torch.Tensor] = field(default_factory=list)  # frames delivered (kept for the prefix cache only)
    done: int = 0  # prompt positions in its cache row (while prefilling: < the prompt's length)


class Scheduler:
    """The frame loop over a dynamic batch (see the module doc). Thread-safe `submit`; one worker
    thread runs the model. Use `close()` (or `with`) to stop it."""

    def __init__(self, model: CSM, *, num_codes: int | None = None, max_rows: int = 8, max_waiting: int = 64,
                 per_visitor: int = 2, waiting_per_visitor: int = 16,
                 row_budget: Callable[[int], int] | None = None, on_step: Callable[[], object] | None = None,
                 threads: int | None = None, prefix: PrefixCache | None = None, prefill_chunk: int = 256):
        for name, value, least in (("max_rows", max_rows, 1), ("max_waiting", max_waiting, 0),
                                   ("per_visitor", per_visitor, 1), ("waiting_per_visitor", waiting_per_visitor, 0),
                                   ("prefill_chunk", prefill_chunk, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be a whole number >= {least}, got {value!r}")
        self.model = model
        self.num_codes = num_codes
        self.max_rows, self.max_waiting = max_rows, max_waiting
        self.per_visitor, self.waiting_per_visitor = per_visitor, waiting_per_visitor
        self.row_budget = row_budget  # (active rows) -> rows allowed now, e.g. from free GPU memory
        self.on_step = on_step  # after every frame step (memory housekeeping)
        # A joining prompt's longest cached start is copied into its row instead of prefilled, and a
        # row that ends leaves its state (prompt + fed frames) there for later prompts (prefix.py).
        self.prefix = prefix if prefix is not None and prefix.enabled else None
        # At most this many prompt positions are prefilled per step, so a long prompt joins over several
        # steps while the running rows keep getting a frame each step (chunked prefill).
        self.prefill_chunk = prefill_chunk
        self.device = next(model.parameters()).device
        # Intra-op threads while it runs. A thread other than the main one paid 35-50% more per frame of
        # the tiny preset with 2 threads than with 1 (measured on the 2-core CPU: every small op's parallel
        # region costs more there), while big products need all cores: 1 thread when no matrix reaches
        # fused.MIN_PACKED weights, else the process's setting. torch keeps the setting per thread, but a
        # thread that has not run a parallel op yet starts from the last value set anywhere: close() sets
        # the previous one again.
        self.threads = threads or (torch.get_num_threads() if large_products(model) else 1)
        self._threads_before = torch.get_num_threads()
        self._cond = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._rows: list[_Row] = []  # generating, in cache rows 0..n-1
        self._pending: list[_Row] = []  # prefilling in chunks, in cache rows n, n+1, ... (FIFO)
        self._closed = False
        self.steps = 0  # batched frame steps run
        self.frames = 0  # frames made (all rows)
        self.prefilled = 0  # prompt positions run through the backbone (those copied from the prefix cache are not)
        self.batch_sizes: Counter[int] = Counter()
        self.peak_rows = 0
        model.setup_caches(max_rows)
        self._thread = threading.Thread(target=self._run, name="csm-scheduler", daemon=True)
        self._thread.start()

    # ---- the callers' side ----------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Ticket:
        """Queue `request`; raises BusyError when the wait queue (or this visitor's part of it) is full."""
        ticket = Ticket(request, self)
        with self._cond:
            if self._closed:
                raise BusyError("the generation scheduler has stopped (the server is shutting down)")
            self._drop_cancelled()
            # Requests that arrived since the loop last admitted any are still in the queue, however many
            # rows are free: only those beyond the free rows will wait. (Counting the free rows as "not
            # busy" let a burst of 100 API calls from one key all queue, each holding a thread.)
            free = self._free_rows()
            if len(self._waiting) >= self.max_waiting + free:
                raise BusyError(f"the server is busy: {len(self._waiting) - free} requests are already waiting "
                                f"for the {self.max_rows} generation rows; try again shortly")
            mine = sum(t.request.visitor == request.visitor for t in self._waiting)
            if request.visitor is not None and mine >= max(self.waiting_per_visitor, 1) + free:
                raise BusyError(f"you already have {mine - free} requests waiting; wait for them to finish, "
                                "then try again")
            self._waiting.append(ticket)
            self._cond.notify_all()
        return ticket

    def stats(self) -> dict:
        with self._cond:
            return {"active": len(self._rows), "prefilling": len(self._pending), "waiting": len(self._waiting),
                    "max_rows": self.max_rows,
                    "limit": self._limit(), "steps": self.steps, "frames": self.frames, "peak_rows": self.peak_rows,
                    "prefilled_positions": self.prefilled,
                    "batch_sizes": dict(sorted(self.batch_sizes.items()))}

    def close(self, timeout: float = 30) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self.device.type == "cpu":
            torch.set_num_threads(self._threads_before)

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _place(self, ticket: Ticket) -> int:
        with self._cond:
            for i, t in enumerate(self._waiting):
                if t is ticket:
                    return i + 1
        return 0

    # ---- admission --------------------------------------------------------------------------
    def _limit(self) -> int:
        limit = self.max_rows
        if self.row_budget is not None:
            limit = max(1, min(limit, int(self.row_budget(len(self._rows) + len(self._pending)))))
        return limit

    def _free_rows(self) -> int:
        return max(self._limit() - len(self._rows) - len(self._pending), 0)

    def _drop_cancelled(self) -> None:
        for t in [t for t in self._waiting if t.cancelled]:
            self._waiting.remove(t)
            t._put(_END)

    def _admit(self) -> list[Ticket]:
        """Tickets to prefill now (called holding the lock): FIFO within each visitor's share first,
        then FIFO into rows nobody else waits for."""
        self._drop_cancelled()
        free = self._free_rows()
        if not free or not self._waiting:
            return []
        running = Counter(r.ticket.request.visitor for r in [*self._rows, *self._pending])
        chosen: list[Ticket] = []
        for t in list(self._waiting):
            if len(chosen) == free:
                break
            v = t.request.visitor
            if v is None or running[v] < self.per_visitor:
                chosen.append(t)
                running[v] += 1
        for t in list(self._waiting):
            if len(chosen) == free:
                break
            if t not in chosen:
                chosen.append(t)
        for t in chosen:
            self._waiting.remove(t)
        return chosen

    # ---- the frame loop -----------------------------------------------------------------------
    def _run(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                with self._cond:
                    self._drop_cancelled()
                    while not (self._closed or self._rows or self._pending or self._waiting):
                        omp.release()  # idle: its OpenMP pool goes, so other threads keep their fast hand-off (omp.py)
                        self._cond.wait()
                        self._drop_cancelled()
                    if self._closed:
                        break
                    joining = self._admit()
                try:
                    with omp.holding():  # the frame loop keeps its pool
                        self._step([t for t in joining if not self._skip(t)])
                except Exception as e:  # e.g. out of memory: every running request hears it, the loop goes on
                    log.exception("generation step failed")
                    for t in joining:
                        t._put(e)
                    for row in [*self._rows, *self._pending]:
                        if row.ticket not in joining:
                            row.ticket._put(e)
                    with self._cond:
                        self._rows.clear()
                        self._pending.clear()
                if self.on_step is not None:
                    self.on_step()
        with self._cond:  # closed: nobody gets more frames
            for t in [*self._waiting, *(r.ticket for r in [*self._rows, *self._pending])]:
                t._put(BusyError("the generation scheduler has stopped (the server is shutting down)"))
            self._waiting.clear()
            self._rows.clear()
            self._pending.clear()

    def _sampler(self, rows: list[_Row]) -> Callable[[torch.Tensor], torch.Tensor]:
        settings = {(r.ticket.request.temperature, r.ticket.request.topk) for r in rows}
        if len(settings) == 1:
            [(temperature, topk)] = settings
            generators = rows[0].generator if len(rows) == 1 else tuple(r.generator for r in rows)
            return Sampler(temperature, topk, generators, num_codes=self.num_codes)
        num_codes = self.num_codes

        def per_row(logits: torch.Tensor) -> torch.Tensor:  # rows with different settings: one at a time
            if num_codes is not None:
                logits = logits[..., :num_codes]
            return torch.cat([sample_topk(logits[b: b + 1], r.ticket.request.topk, r.ticket.request.temperature,
                                          r.generator) for b, r in enumerate(rows)])

        return per_row

    @staticmethod
    def _skip(ticket: Ticket) -> bool:
        if ticket.cancelled:
            ticket._put(_END)
        return ticket.cancelled

    def _step(self, joining: list[Ticket]) -> None:
        """One frame for every active row, and up to `prefill_chunk` prompt positions of the rows that
        are joining: the running rows' backbone step (one batch); each new request takes the next free
        cache row (after the rows still prefilling), with its prompt's longest cached start copied in;
        prompts are prefilled in order, and a row whose prompt is done this step makes its first frame
        in this step's depth-decoder pass, with all the others. Then the rows that ended leave."""
        rows, n = self._rows, len(self._rows)
        self._drop_cancelled_pending(n)
        hidden = []
        if rows:
            tokens, mask = next_frame_input(torch.stack([r.last for r in rows]))
            input_pos = torch.tensor([[r.pos] for r in rows], device=self.device)
            self.model.use_rows(slice(0, n), input_pos, visible=max(r.pos for r in rows) + 1)
            hidden.append(self.model.backbone_step(tokens, mask, input_pos))
        for ticket in joining:
            request = ticket.request
            generator = torch.Generator(device=self.device)
            generator.manual_seed(request.seed)
            self._pending.append(_Row(ticket, generator, pos=request.tokens.size(0) - 1, last=torch.empty(0)))
        new: list[_Row] = []
        budget = self.prefill_chunk
        while self._pending and budget > 0:  # FIFO: only the first prompt advances until it is done
            row, slot = self._pending[0], n + len(new)
            request, size = row.ticket.request, row.ticket.request.tokens.size(0)
            if row.done == 0 and self.prefix is not None:
                # Looked up now, not when it joined: the prompts prefilled just before it are kept by
                # then, so the takes of a line, or lines and visitors sharing voices, prefill once.
                row.done = self.prefix.load(request.tokens, request.mask, slot)
            end = min(size, row.done + budget)
            tokens = request.tokens[None, row.done:end].to(self.device)
            mask = request.mask[None, row.done:end].to(self.device)
            input_pos = torch.arange(row.done, end, device=self.device).unsqueeze(0)
            self.model.use_rows(slice(slot, slot + 1), input_pos, visible=end)
            h = self.model.backbone_step(tokens, mask, input_pos)
            budget -= end - row.done
            self.prefilled += end - row.done
            row.done = end
            if end < size:
                break
            if self.prefix is not None:  # its prompt's state, for the prompts queued behind it
                self.prefix.store(request.tokens, request.mask, slot)
            hidden.append(h)
            new.append(self._pending.pop(0))
        everyone = [*rows, *new]
        if not everyone:
            self.model.use_rows(None)
            return
        try:
            self.model.use_rows(slice(0, len(everyone)))
            codes = depth_frame(self.model, torch.cat(hidden), self._sampler(everyone))
        finally:
            self.model.use_rows(None)
        self.steps += 1
        self.batch_sizes[len(everyone)] += 1
        ended = []
        for b, row in enumerate(everyone):
            row.pos += 1
            if not self._deliver(row, codes[b]):
                ended.append(b)
        if self.prefix is not None:
            for b in ended:
                self._keep_state(b, everyone[b])
        with self._cond:
            self._rows.extend(new)
            self.peak_rows = max(self.peak_rows, len(self._rows))
            for b in reversed(ended):  # the last row moves into the freed slot: rows stay 0..n-1
                last = len(self._rows) - 1
                if b != last:
                    self.model.move_row(last, b, self._rows[last].pos)
                    self._rows[b] = self._rows[last]
                self._rows.pop()
            self._shift_pending(len(everyone), len(self._rows))

    def _drop_cancelled_pending(self, n: int) -> None:
        """Cancelled prefilling rows leave; the others move down to stay right after the n active rows."""
        if not any(r.ticket.cancelled for r in self._pending):
            return
        slots = {id(r): n + i for i, r in enumerate(self._pending)}
        for r in self._pending:
            if r.ticket.cancelled:
                r.ticket._put(_END)
        with self._cond:
            self._pending = [r for r in self._pending if not r.ticket.cancelled]
        for i, r in enumerate(self._pending):
            if slots[id(r)] != n + i:
                self.model.move_row(slots[id(r)], n + i, r.done)

    def _shift_pending(self, was: int, now: int) -> None:
        """The prefilling rows sat from cache row `was` on; the active rows now end at `now`: move them."""
        if was != now:
            for i, r in enumerate(self._pending):
                self.model.move_row(was + i, now + i, r.done)

    def _keep_state(self, slot: int, row: _Row) -> None:
        """Leave an ended row's cache state (its prompt and the frames fed after it) to the prefix cache."""
        request = row.ticket.request
        fed = row.made[: row.pos - request.tokens.size(0)]
        self.prefix.store(*fed_frames(request.tokens, request.mask, fed), slot)

    def _deliver(self, row: _Row, codes: torch.Tensor) -> bool:
        """Hand a new frame to its ticket; False when the row has ended (end frame, limit, cancel)."""
        ticket = row.ticket
        if ticket.cancelled or bool(is_eos(codes)):
            ticket._put(_END)
            return False
        row.last = codes
        row.frames += 1
        self.frames += 1
        frame = codes.cpu()
        if self.prefix is not None:
            row.made.append(frame)
        ticket._put(frame)
        if row.frames >= ticket.request.max_frames:
            ticket._put(_END)
            return False
        return True


