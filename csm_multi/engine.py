"""Text + context -> watermarked 24 kHz audio: the one place that chains tokenizer, frames, the
frame loop, Mimi and the watermark.

It takes built components (see `loaders.py` for building them) and knows nothing about files,
profiles, scripts or the UI. Waveforms are (S,) float32 tensors at 24 kHz on the CPU.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from numbers import Integral

import torch

from . import omp
from .config import FRAME_MS, SAMPLE_RATE, SamplingConfig, StreamConfig, check_seed
from .errors import BusyError, ContextTooLongError, WatermarkUnavailableError
from .frames import Segment, audio_frames, concat_frames, format_text, text_frames
from .generate import FrameGraph, Sampler, iterate_frames
from .model import CSM
from .prefix import DEFAULT_MAX_MB, PrefixCache
from .scheduler import GenerationRequest, Scheduler, Ticket, as_visitor, current_visitor

# What a call is doing, for progress displays (`on_stage`): frames first, then these two
GENERATING, DECODING, WATERMARKING = "generating", "decoding", "watermarking"
StageCallback = Callable[[str], None]


@dataclass
class Utterance:
    """One generated line: audio (S,), its codes (K, T), and how it was made."""

    audio: torch.Tensor
    codes: torch.Tensor
    seed: int
    watermarked: bool
    prompt_positions: int
    sample_rate: int = SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        return self.audio.numel() / self.sample_rate


@dataclass
class AudioChunk:
    """A piece of a streamed utterance. `frames` counts the frames decoded so far."""

    audio: torch.Tensor
    frames: int
    seed: int
    watermarked: bool
    sample_rate: int = SAMPLE_RATE


@dataclass
class EngineInfo:
    """What is loaded, said plainly (for logs and the UI)."""

    model: str
    device: str
    dtype: str
    tokenizer: str
    codec: str
    watermark: str
    codec_id: str = "mimi"  # names the codec weights: persisted profile codes are keyed by it
    untrained: bool = False
    notes: list[str] = field(default_factory=list)


class Engine:
    MAX_GRAPHS = 4  # captured frame graphs kept (one per batch size / sampling setting)

    def __init__(self, model: CSM, tokenizer, codec, watermarker=None, *, watermark: bool = True,
                 info: EngineInfo | None = None, fast: bool | None = None, prefix_cache_mb: int = DEFAULT_MAX_MB):
        if watermark and watermarker is None:
            raise WatermarkUnavailableError(
                "no watermark model was given: load one, or pass watermark=False explicitly "
                "(output will then be marked as not watermarked)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.codec = codec
        self.watermarker = watermarker if watermark else None
        self.config = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # fast path: one CUDA graph per frame (CUDA only; CPU runs the same code eagerly)
        self.fast = (self.device.type == "cuda") if fast is None else (fast and self.device.type == "cuda")
        self._generator = torch.Generator(device=self.device)
        self._row_generators: list[torch.Generator] = []  # generate_batch: one per row, grown on demand
        self._graphs: dict[tuple, FrameGraph] = {}
        self.scheduler: Scheduler | None = None  # see serve(): then every generation is a request to it
        # The backbone state of finished prompts, reused by prompts that start the same way (prefix.py):
        # a dialogue line prefills only what follows the previous line's state. 0 turns it off.
        if isinstance(prefix_cache_mb, bool) or not isinstance(prefix_cache_mb, int) or prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be a whole number of MB >= 0, got {prefix_cache_mb!r}")
        self.prefix = PrefixCache(model, prefix_cache_mb << 20)
        self.info = info or EngineInfo(model=model.config.name, device=str(p.device), dtype=str(p.dtype),
                                       tokenizer=getattr(tokenizer, "name", "?"), codec="mimi",
                                       watermark="on" if self.watermarker else "OFF")

    @property
    def codec_id(self) -> str:
        return f"{self.info.codec_id}-k{self.config.audio_num_codebooks}"

    def encode_reference(self, audio: torch.Tensor) -> torch.Tensor:
        """(S,) 24 kHz reference audio -> (K, T) Mimi codes (for voice profiles)."""
        with torch.inference_mode():
            return self.codec.encode(audio.to(self.codec.device, torch.float32)).cpu()

    # ---- prompts --------------------------------------------------------------------------
    def text_frames(self, text: str, speaker: int) -> tuple[torch.Tensor, torch.Tensor]:
        bad = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
        if bad is not None:  # no encoding can write them; the tokenizer would fail with a codec error
            raise ValueError(f"text {text[:40]!r}: character {bad} is an unpaired surrogate, which is not text: "
                             "remove it (csm_multi.script.clean_utterance drops them)")
        return text_frames(self.tokenizer.encode(format_text(speaker, text)), self.config.audio_num_codebooks)

    def segment_codes(self, segment: Segment) -> torch.Tensor:
        """(K, T) Mimi codes of a context segment (encoded now unless the segment carries them)."""
        label = f"context segment {str(segment.text)[:40]!r}"
        _check_speaker(segment.speaker)
        if segment.codes is not None:
            codes, k = segment.codes, self.config.audio_num_codebooks
            if (not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.shape[0] != k
                    or codes.dtype.is_floating_point or codes.dtype == torch.bool):
                raise ValueError(f"{label}: codes must be an integer tensor (K={k}, T), got "
                                 f"{_describe(codes)}; use Engine.encode_reference on its audio")
            if codes.numel() and not 0 <= int(codes.min()) <= int(codes.max()) < self.codec.cardinality:
                raise ValueError(f"{label}: codes must lie in 0..{self.codec.cardinality - 1}")
            return codes
        audio = segment.audio
        if audio is None:
            raise ValueError(f"{label} has neither audio nor codes")
        if not isinstance(audio, torch.Tensor) or audio.dim() != 1 or not audio.dtype.is_floating_point:
            raise ValueError(f"{label}: audio must be a mono float tensor (S,) at 24 kHz, got {_describe(audio)}; "
                             "load it with csm_multi.audio.load_audio (it mixes down and resamples)")
        return self.encode_reference(audio)

    def segment_frames(self, segment: Segment) -> tuple[torch.Tensor, torch.Tensor]:
        return concat_frames([self.text_frames(segment.text, segment.speaker),
                              audio_frames(self.segment_codes(segment))])

    def segment_positions(self, segment: Segment) -> int:
        """Window positions a context segment takes: its text tokens + its frames + the EOS frame."""
        n_text = len(self.tokenizer.encode(format_text(segment.speaker, segment.text)))
        return n_text + self.segment_codes(segment).shape[-1] + 1

    def build_prompt(self, text: str, speaker: int, context: Sequence[Segment] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, K+1) tokens and mask: every context segment, then the text to speak."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"nothing to say: the text must be a non-empty string, got {text!r}")
        _check_speaker(speaker)
        parts = [self.segment_frames(seg) for seg in context]
        parts.append(self.text_frames(text, speaker))
        return concat_frames(parts)

    def check_window(self, prompt_positions: int, max_frames: int) -> None:
        window = self.config.max_seq_len
        if prompt_positions + max_frames > window:
            raise ContextTooLongError(
                f"the prompt takes {prompt_positions} of the model's {window} positions and up to "
                f"{max_frames} frames ({max_frames * FRAME_MS / 1000:.1f} s) must still fit: shorten the "
                "context (fewer or shorter reference clips / earlier lines), the text, or the longest audio asked for "
                "(max_audio_length_ms; the command line's --max-ms)"
            )

    # ---- generation -----------------------------------------------------------------------
    def _sampler(self, sampling: SamplingConfig) -> tuple[Sampler, int]:
        seed = _drawn(sampling.seed)
        self._generator.manual_seed(seed)  # one generator, reseeded: captured graphs stay valid
        return Sampler(sampling.temperature, sampling.topk, self._generator, num_codes=self.codec.cardinality), seed

    def _batch_sampler(self, sampling: SamplingConfig, seeds: Sequence[int | None]) -> tuple[Sampler, list[int]]:
        """One generator per row, seeded like `_sampler` seeds the single one (the same objects on
        every call, so a graph captured for this batch size stays valid)."""
        while len(self._row_generators) < len(seeds):
            self._row_generators.append(torch.Generator(device=self.device))
        drawn = [_drawn(seed) for seed in seeds]
        generators = tuple(self._row_generators[: len(seeds)])
        for g, seed in zip(generators, drawn):
            g.manual_seed(seed)
        return Sampler(sampling.temperature, sampling.topk, generators, num_codes=self.codec.cardinality), drawn

    def _graph(self, batch: int, sampler: Sampler, padded: bool) -> FrameGraph | None:
        if not self.fast:
            return None
        key = (batch, sampler.temperature, sampler.topk, sampler.num_codes, padded)
        graph = self._graphs.get(key)
        if graph is None or not graph.valid:
            self._graphs = {k: g for k, g in self._graphs.items() if k[0] == batch}  # others are stale now
            if len(self._graphs) >= self.MAX_GRAPHS:
                self._graphs.pop(next(iter(self._graphs)))
            graph = self._graphs[key] = FrameGraph(self.model, batch, sampler, padded)
        return graph

    @omp.released
    def serve(self, **limits) -> Scheduler:
        """Hand the model to a continuous-batching `Scheduler` (limits: its keyword arguments, e.g.
        max_rows, max_waiting, per_visitor). From now on generate, stream and generate_batch are
        requests to it, so calls from many threads share one batch; codes per seed are unchanged.
        The per-frame CUDA graph is not used meanwhile (its batch changes every frame)."""
        self.stop_serving()
        self._graphs.clear()
        self.scheduler = Scheduler(self.model, num_codes=self.codec.cardinality, prefix=self.prefix, **limits)
        return self.scheduler

    def stop_serving(self) -> None:
        """Stop the scheduler (waiting and running requests get BusyError); generation runs alone again."""
        if self.scheduler is not None:
            self.scheduler.close()
            self.scheduler = None
            self.model.drop_caches()

    def _request(self, tokens, mask, sampling: SamplingConfig, seed: int,
                 on_stage: StageCallback | None = None) -> tuple[Ticket, Iterator[torch.Tensor]]:
        """(its ticket, its frames) for one prompt from the scheduler; `on_stage` hears the wait-queue
        place meanwhile. The ticket is for a caller that may close the frames before it starts them."""
        ticket = self.scheduler.submit(GenerationRequest(
            tokens=tokens, mask=mask, temperature=sampling.temperature, topk=sampling.topk, seed=seed,
            max_frames=sampling.max_frames, visitor=current_visitor()))
        on_wait = None
        if on_stage is not None:
            def on_wait(place: int) -> None:
                on_stage(f"waiting for a free generation row ({place - 1} ahead)" if place > 1
                         else "waiting for a free generation row (next)")
        return ticket, ticket.frames(on_wait)

    def _frames(self, text, speaker, context, sampling,
                on_stage: StageCallback | None = None) -> tuple[Iterator[torch.Tensor], int, int]:
        tokens, mask = self.build_prompt(text, speaker, context)
        self.check_window(tokens.size(0), sampling.max_frames)
        if self.scheduler is not None:
            seed = _drawn(sampling.seed)
            return self._request(tokens, mask, sampling, seed, on_stage)[1], seed, tokens.size(0)
        sampler, seed = self._sampler(sampling)
        graph = self._graph(1, sampler, padded=False)
        it = iterate_frames(self.model, tokens[None].to(self.device), mask[None].to(self.device),
                            sampler, sampling.max_frames, graph=graph, prefix=self.prefix)
        return (codes[0] for codes, _ in it), seed, tokens.size(0)

    def _watermark(self, audio: torch.Tensor) -> torch.Tensor:
        return self.watermarker.apply(audio, SAMPLE_RATE) if self.watermarker else audio

    def _finish(self, codes: Sequence[torch.Tensor], on_stage: StageCallback | None) -> list[torch.Tensor]:
        """(K, T) codes per utterance -> their waveforms, decoded then watermarked, each stage announced."""
        if on_stage:
            on_stage(DECODING)
        audio = [self.decode(c) for c in codes]
        if self.watermarker is None:
            return audio
        if on_stage:
            on_stage(WATERMARKING)
        return [self._watermark(a) for a in audio]

    @omp.released
    @torch.inference_mode()
    def generate_codes(self, text: str, speaker: int, context: Sequence[Segment] = (),
                       sampling: SamplingConfig = SamplingConfig(),
                       on_frame: Callable[[], None] | None = None,
                       on_stage: StageCallback | None = None) -> tuple[torch.Tensor, int, int]:
        """Codes (K, T) of one utterance (T may be 0 when the model ends at once), seed, prompt size.

        `on_frame` is called after every frame (progress, cancellation, memory housekeeping);
        `on_stage` hears the wait-queue place while a request waits for the scheduler.
        """
        frames, seed, n_prompt = self._frames(text, speaker, context, sampling, on_stage)
        codes = []
        with contextlib.closing(frames):  # a scheduler request stops at once when on_frame raises (cancel)
            for frame in frames:
                codes.append(frame)
                if on_frame:
                    on_frame()
        k = self.config.audio_num_codebooks
        stacked = torch.stack(codes, dim=1) if codes else torch.zeros(k, 0, dtype=torch.long, device=self.device)
        return stacked, seed, n_prompt

    @omp.released
    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(K, T) codes -> (T * 1920,) float32 CPU waveform (not watermarked)."""
        if codes.shape[-1] == 0:
            return torch.zeros(0)
        return self.codec.decode(codes.to(self.codec.device)).float().cpu()

    def generate(self, text: str, speaker: int = 0, context: Sequence[Segment] = (),
                 sampling: SamplingConfig = SamplingConfig(), on_frame: Callable[[], None] | None = None,
                 on_stage: StageCallback | None = None) -> Utterance:
        """Speak `text` as `speaker` after `context`; returns watermarked audio unless disabled.

        `on_stage` hears "decoding" before Mimi decodes the frames and "watermarking" before the
        watermark is applied (only when there is a watermarker).
        """
        codes, seed, n_prompt = self.generate_codes(text, speaker, context, sampling, on_frame, on_stage)
        [audio] = self._finish([codes], on_stage)
        return Utterance(audio=audio, codes=codes.cpu(), seed=seed, watermarked=self.watermarker is not None,
                         prompt_positions=n_prompt)

    def stream(self, text: str, speaker: int = 0, context: Sequence[Segment] = (),
               sampling: SamplingConfig = SamplingConfig(), chunks: StreamConfig = StreamConfig(),
               visitor: str | None = None, cancel: Callable[[], bool] | None = None) -> Iterator[AudioChunk]:
        """Yield decoded audio while frames are generated, `chunks` frames at a time.

        `visitor` (default: the caller's `scheduler.as_visitor`, read now, not at the first chunk:
        a web server may pull each chunk on another thread) names whose share of the batch it uses.
        `cancel`, asked after every frame (and every half second while the request waits for a row),
        ends the stream there once it says True (its generation row or its place in the queue is freed
        at once, without waiting for the chunk to fill): closing the iterator can only do that between
        chunks.

        Each chunk is watermarked on its own, so a listener never receives unmarked audio (see
        StreamConfig for the chunk length a verifiable mark needs). Concatenated chunks equal the
        whole-call decode of the same codes up to Mimi's streaming tolerance (tests/test_engine.py).
        """
        return self._stream(text, speaker, context, sampling, chunks, visitor or current_visitor(), cancel)

    def _stream(self, text, speaker, context, sampling, chunks, visitor, cancel=None) -> Iterator[AudioChunk]:
        def check(_stage: str = "") -> None:  # after every frame, and every half second while waiting for a row
            if cancel():
                raise _Cancelled

        with torch.inference_mode():
            with as_visitor(visitor):  # only submitting reads it
                frames, seed, _ = self._frames(text, speaker, context, sampling, check if cancel else None)
            pending: list[torch.Tensor] = []
            done = 0
            with self.codec.stream(batch_size=1) as decoder, contextlib.closing(frames):
                want = chunks.first_chunk_frames
                try:
                    for frame in frames:
                        if cancel is not None:
                            check()
                        pending.append(frame)
                        if len(pending) < want:
                            continue
                        done += len(pending)
                        yield self._chunk(decoder, pending, done, seed)
                        pending, want = [], chunks.chunk_frames
                except _Cancelled:  # its row, or its place in the queue, is given up as `frames` closes
                    return
                if pending:
                    done += len(pending)
                    yield self._chunk(decoder, pending, done, seed)

    def _chunk(self, decoder, frames: list[torch.Tensor], done: int, seed: int) -> AudioChunk:
        codes = torch.stack(frames, dim=1).unsqueeze(0).to(self.codec.device)  # (1, K, t)
        audio = decoder.decode(codes)[0].float().cpu()
        return AudioChunk(audio=self._watermark(audio), frames=done, seed=seed,
                          watermarked=self.watermarker is not None)

    @omp.released
    @torch.inference_mode()
    def generate_batch(self, requests: Sequence[tuple[str, int, Sequence[Segment]]],
                       sampling: SamplingConfig = SamplingConfig(),
                       seeds: Sequence[int | None] | None = None, on_frame: Callable[[], None] | None = None,
                       on_stage: StageCallback | None = None) -> list[Utterance]:
        """Several independent utterances as one batch (left-padded prompts, per-row EOS).

        Row i samples with its own seed: `seeds[i]` (None: random), by default `sampling.seed + i`
        (random per row when `sampling.seed` is None). A row draws what `generate` draws alone with
        its seed, so it can be regenerated alone: the same codes up to the float rounding of
        batched products (identical on the tiny preset: tests/test_engine.py). `on_frame` and
        `on_stage` as in `generate`: once per batch frame, once per stage for the whole batch.
        """
        if seeds is None:
            seeds = [None if sampling.seed is None else sampling.seed + i for i in range(len(requests))]
        if len(seeds) != len(requests):
            raise ValueError(f"{len(seeds)} seeds for {len(requests)} requests")
        for seed in seeds:
            check_seed(seed)
        prompts = [self.build_prompt(text, spk, ctx) for text, spk, ctx in requests]
        longest = max(t.size(0) for t, _ in prompts)
        self.check_window(longest, sampling.max_frames)
        if self.scheduler is not None:
            per_row, row_seeds = self._batch_via_scheduler(prompts, sampling, seeds, on_frame, on_stage)
        else:
            per_row, row_seeds = self._batch_alone(prompts, longest, sampling, seeds, on_frame)
        k = self.config.audio_num_codebooks
        codes = [torch.stack(frames, dim=1) if frames else torch.zeros(k, 0, dtype=torch.long) for frames in per_row]
        audio = self._finish(codes, on_stage)
        return [Utterance(audio=a, codes=c.cpu(), seed=seed, watermarked=self.watermarker is not None,
                          prompt_positions=prompt[0].size(0))
                for a, c, seed, prompt in zip(audio, codes, row_seeds, prompts)]


    def _batch_alone(self, prompts, longest: int, sampling: SamplingConfig, seeds,
                     on_frame) -> tuple[list[list[torch.Tensor]], list[int]]:
        """generate_batch's frames per row, from one padded batch of its own; and the row seeds."""
        tokens = torch.zeros(len(prompts), longest, self.config.frame_width, dtype=torch.long)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        pad = torch.tensor([longest - t.size(0) for t, _ in prompts])
        for row, (t, m) in enumerate(prompts):
            tokens[row, pad[row]:], mask[row, pad[row]:] = t, m
        sampler, row_seeds = self._batch_sampler(sampling, seeds)
        graph = self._graph(len(prompts), sampler, padded=True)
        per_row: list[list[torch.Tensor]] = [[] for _ in prompts]
        for codes, alive in iterate_frames(self.model, tokens.to(self.device), mask.to(self.device), sampler,
                                           sampling.max_frames, pad, graph):
            for row in alive.nonzero().flatten().tolist():
                per_row[row].append(codes[row])
            if on_frame:
                on_frame()
        return per_row, row_seeds

    def _batch_via_scheduler(self, prompts, sampling: SamplingConfig, seeds, on_frame,
                             on_stage) -> tuple[list[list[torch.Tensor]], list[int]]:
        """generate_batch's frames per row as scheduler requests (they join the batch with everyone
        else's); and the row seeds. At most `max_rows` of them are submitted at a time, the next as
        one ends, so a long fast-mode script keeps the rows full without filling the wait queue (a
        visitor's part of it is bounded). If the first can get no place, BusyError and nothing runs;
        a later one that finds the queue full waits for one of this batch's rows to end."""
        drawn = [_drawn(seed) for seed in seeds]
        window = max(1, self.scheduler.max_rows)
        per_row: list[list[torch.Tensor]] = [[] for _ in prompts]
        streams: dict[int, Iterator[torch.Tensor]] = {}
        tickets: list[Ticket] = []
        todo, live = list(range(len(prompts))), []

        def top_up() -> None:
            while todo and len(live) < window:
                row = todo[0]
                try:
                    ticket, streams[row] = self._request(*prompts[row], sampling, drawn[row],
                                                         on_stage if row == 0 else None)
                except BusyError:
                    if not live:  # none of this batch holds a place: nothing will free one for it
                        raise
                    return  # the queue is full for now: try again when one of ours ends
                tickets.append(ticket)
                todo.pop(0)
                live.append(row)

        try:
            top_up()
            while live:  # one frame from every row still going, then on_frame (as per batch frame)
                for row in list(live):
                    frame = next(streams[row], None)
                    if frame is None:
                        live.remove(row)
                    else:
                        per_row[row].append(frame)
                top_up()
                if live and on_frame:
                    on_frame()
        finally:  # also those never iterated: a generator closed before it starts runs no `finally`
            for ticket in tickets:
                ticket.cancel()
            for stream in streams.values():
                stream.close()
        return per_row, drawn


class _Cancelled(Exception):
    """A stream's `cancel` said True (after a frame, or while its request waited for a row)."""


def _drawn(seed: int | None) -> int:
    """`seed`, or a random one when it is None (so the caller can report it)."""
    return seed if seed is not None else secrets.randbits(31)


def _check_speaker(speaker) -> None:
    if isinstance(speaker, bool) or not isinstance(speaker, Integral) or speaker < 0:
        raise ValueError(f"speaker must be a whole number >= 0 (0, 1, ...), got {speaker!r}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"
