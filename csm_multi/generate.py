"""The hot loop: one CSM frame (backbone step + K-1 depth-decoder steps) and the frame iterator.

No I/O, no logging, no tokenizer, no host syncs inside a frame. Shapes: B batch, S positions,
K codebooks. A frame's codes come out as (B, K) int64.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .frames import is_eos
from .model import CSM
from .prefix import PrefixCache, fed_frames
from .sampling import Generators, sample_topk


@dataclass(frozen=True)
class Sampler:
    """Top-k / temperature sampling of one codebook. `num_codes` limits ids to [0, num_codes).

    Departure from the reference: CSM's audio vocabulary has 2051 ids but Mimi decodes only 2048;
    the reference samples all 2051 (and its decode fails on the other 3). The Engine passes
    num_codes=2048 so it never emits an id the codec cannot decode; None keeps reference sampling.
    `generator`: one for the whole batch, or a tuple of one per row (see `multinomial_no_sync`).
    """

    temperature: float
    topk: int
    generator: Generators = None
    num_codes: int | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.num_codes is not None:
            logits = logits[..., : self.num_codes]
        return sample_topk(logits, self.topk, self.temperature, self.generator)


def generate_frame(
    model: CSM, tokens: torch.Tensor, mask: torch.Tensor, input_pos: torch.Tensor, sample: Sampler,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """New frames (B, S, K+1) at positions (B, S) -> the next frame's codes (B, K)."""
    return depth_frame(model, model.backbone_step(tokens, mask, input_pos, key_valid), sample)


def depth_frame(model: CSM, last_h: torch.Tensor, sample: Sampler) -> torch.Tensor:
    """The backbone's last hidden states (B, Db) -> a frame's codes (B, K): codebook 0 from the
    backbone's head, codebooks 1..K-1 from the depth decoder, one step each."""
    code = sample(model.codebook0_head(last_h))  # (B, 1)
    codes = [code]
    h = torch.cat([last_h.unsqueeze(1), model.embed_audio(0, code)], dim=1)  # (B, 2, Db)
    pos = model.decoder_positions[: last_h.size(0), :2]
    model.decoder.reset_caches()  # the depth decoder sees one frame at a time
    for i in range(1, model.config.audio_num_codebooks):
        code = sample(model.codebook_logits(i, model.decoder_step(h, pos)))
        codes.append(code)
        h, pos = model.embed_audio(i, code), pos[:, -1:] + 1
    return torch.cat(codes, dim=1)


def next_frame_input(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated codes (B, K) -> the backbone's next input frame (B, 1, K+1) and its mask."""
    b, k = codes.shape
    tokens = torch.cat([codes, codes.new_zeros(b, 1)], dim=1).unsqueeze(1)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[..., -1] = False
    return tokens, mask


def iterate_frames(
    model: CSM, tokens: torch.Tensor, mask: torch.Tensor, sample: Sampler, max_frames: int,
    pad: torch.Tensor | None = None, graph: FrameGraph | None = None, prefix: PrefixCache | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (codes (B, K), alive (B,) bool) per frame until every row has emitted EOS.

    `tokens`/`mask` are (B, S, K+1) prompts, left-padded; `pad` (B,) says how many leading
    positions of each row are padding (they are masked out of attention). A row's EOS frame and
    everything after it are reported with alive=False. The caller checks the window beforehand.
    With `graph` (captured for this batch size and this `sample`), frames after the eager prefill
    are CUDA-graph replays. With `prefix` (one unpadded row), the prompt's longest cached start is
    copied in instead of prefilled, and the state the row ends with (prompt + fed frames) is kept
    for later prompts, also when the caller stops early.
    """
    b, s, _ = tokens.shape
    model.setup_caches(b)
    model.reset_caches()
    device = tokens.device
    cached = prefix is not None and prefix.enabled and b == 1 and pad is None
    start = prefix.load(tokens[0], mask[0], row=0) if cached else 0
    if start:
        model.skip_positions(start)
    prompt_tokens, prompt_mask = tokens, mask
    tokens, mask = tokens[:, start:], mask[:, start:]
    input_pos = torch.arange(start, s, device=device).unsqueeze(0).expand(b, s - start)
    key_valid = None
    if pad is not None:
        key_valid = torch.arange(model.config.max_seq_len, device=device).unsqueeze(0) >= pad.to(device).unsqueeze(1)
    alive = torch.ones(b, dtype=torch.bool, device=device)
    made: list[torch.Tensor] = []  # frames yielded; the first `steps - 1` of them were fed back
    steps, failed = 0, False
    try:
        for i in range(max_frames):
            try:
                if graph is not None and i > 0:
                    codes = graph.step().clone()
                else:
                    codes = generate_frame(model, tokens, mask, input_pos, sample, key_valid)
            except BaseException:
                failed = True
                raise
            steps += 1
            alive = alive & ~is_eos(codes)
            if not bool(alive.any()):  # one host sync per frame: the caller needs the frame anyway
                return
            if cached:
                made.append(codes[0])
            yield codes, alive
            input_pos = input_pos[:, -1:] + 1
            if graph is not None:
                if i == 0:
                    graph.start(codes, input_pos, key_valid)
            else:
                tokens, mask = next_frame_input(codes)
    finally:
        if cached and steps and not failed:
            prefix.store(*fed_frames(prompt_tokens[0], prompt_mask[0], made[: steps - 1]), row=0)


class FrameGraph:
    """A whole decode frame as ONE CUDA graph: backbone step for the newest frame, the K-1
    depth-decoder steps and all sampling, then it writes its own next input. One replay per frame
    leaves no per-frame Python or kernel-launch overhead (eager CSM launches thousands of kernels).

    Static buffers: `tokens` (B, 1, K+1), `input_pos` (B, 1), `codes` (B, K). Captured for one
    batch size and one Sampler (temperature, top-k and its generator are baked in). CUDA only.
    """

    def __init__(self, model: CSM, batch: int, sample: Sampler, padded: bool = False, warmup: int = 2):
        device = next(model.parameters()).device
        k, width = model.config.audio_num_codebooks, model.config.frame_width
        model.setup_caches(batch)
        self.model, self.sample = model, sample
        self.tokens = torch.zeros(batch, 1, width, dtype=torch.long, device=device)
        self.mask = torch.ones(batch, 1, width, dtype=torch.bool, device=device)
        self.mask[..., -1] = False  # generated frames carry audio only
        self.input_pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.key_valid = (torch.ones(batch, model.config.max_seq_len, dtype=torch.bool, device=device)
                          if padded else None)
        generators = _as_list(sample.generator)
        rng = [g.get_state() for g in generators]
        trim, model.trim_kv = model.trim_kv, False  # captured shapes must not depend on the fill level
        model.reset_caches()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        for g in generators:
            self.graph.register_generator_state(g)
        # thread_local: other threads (the app encoding or transcribing a clip) may use the GPU
        # while this one captures; the default mode would fail their calls and the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.codes = self._step()
        model.reset_caches()
        for g, state in zip(generators, rng):
            g.set_state(state)  # warm-up draws must not shift the seeded sequence
        model.trim_kv = trim
        self.batch, self.k = batch, k
        self.cache_version = model.cache_version

    @property
    def valid(self) -> bool:
        """False once the model's caches were reallocated (e.g. for another batch size)."""
        return self.cache_version == self.model.cache_version

    def _step(self) -> torch.Tensor:
        codes = generate_frame(self.model, self.tokens, self.mask, self.input_pos, self.sample, self.key_valid)
        self.tokens[:, 0, :-1].copy_(codes)  # feed the frame back: next replay continues from it
        self.input_pos.add_(1)
        return codes

    def start(self, codes: torch.Tensor, next_pos: torch.Tensor, key_valid: torch.Tensor | None = None) -> None:
        """Continue after an eager prefill: the last sampled frame (B, K) sits at `next_pos` (B, 1)."""
        self.tokens[:, 0, :-1].copy_(codes)
        self.input_pos.copy_(next_pos)
        if self.key_valid is not None and key_valid is not None:
            self.key_valid.copy_(key_valid)

    def step(self) -> torch.Tensor:
        """Replay once; returns the static (B, K) codes buffer (clone to keep them)."""
        self.graph.replay()
        return self.codes


def _as_list(generator: Generators) -> list[torch.Generator]:
    if generator is None:
        return []
    return [generator] if isinstance(generator, torch.Generator) else list(generator)
