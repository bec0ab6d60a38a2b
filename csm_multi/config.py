"""Frozen configuration: model shapes (presets), sampling and rendering settings.

Every derived constant of the CSM format (frame width, frame length, window size) is defined here
and only here. This module knows nothing about torch, files or the hub.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from numbers import Integral

SAMPLE_RATE = 24_000  # Mimi's rate; every waveform crossing a public boundary is at this rate
FRAME_MS = 80  # one Mimi frame (12.5 Hz)
SAMPLES_PER_FRAME = SAMPLE_RATE * FRAME_MS // 1000  # 1920


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of one Llama-3.2-style transformer (torchtune `llama3_2` arguments)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int = 2048
    rope_base: float = 500_000.0
    rope_scale_factor: float = 32.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


@dataclass(frozen=True)
class ModelConfig:
    """CSM: a backbone over 33-column frames and a depth decoder over the 32 codebooks of a frame."""

    name: str
    backbone: LlamaConfig
    decoder: LlamaConfig
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051  # 2048 Mimi codes + 3 reserved ids, as in the reference
    audio_num_codebooks: int = 32

    def __post_init__(self) -> None:
        if self.decoder.max_seq_len < self.audio_num_codebooks:
            raise ValueError("the decoder window must hold one position per codebook")

    @property
    def frame_width(self) -> int:
        """Columns of a frame: K audio codebooks + 1 text column (the last)."""
        return self.audio_num_codebooks + 1

    @property
    def max_seq_len(self) -> int:
        """The backbone window (2048 for csm-1b): context + prompt text + generated frames."""
        return self.backbone.max_seq_len


_LLAMA_1B = LlamaConfig(num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048, intermediate_dim=8192)
_LLAMA_100M = LlamaConfig(num_layers=4, num_heads=8, num_kv_heads=2, embed_dim=1024, intermediate_dim=8192)

PRESETS: dict[str, ModelConfig] = {
    "csm-1b": ModelConfig(name="csm-1b", backbone=_LLAMA_1B, decoder=_LLAMA_100M),
    # Same structure and vocabularies, a few small layers: tests and the offline demo.
    "tiny": ModelConfig(
        name="tiny",
        backbone=LlamaConfig(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128),
        decoder=LlamaConfig(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64),
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None


QUANT_MODES = ("none", "int8", "int4", "bf16")  # CPU weight modes (quant.quantize); "none": float32
MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes without wrapping around


def check_seed(seed: int | None, room: int = 0) -> None:
    """ValueError unless `seed` is None or a whole number in 0..MAX_SEED - room (room: seed + i for line i)."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed <= MAX_SEED - room:
        raise ValueError(f"seed must be a whole number from 0 to {MAX_SEED - room}, got {seed!r} "
                         "(leave it out for a random seed)")


@dataclass(frozen=True)
class SamplingConfig:
    """How one utterance is sampled. `topk=1` is greedy."""

    temperature: float = 0.9
    topk: int = 50
    seed: int | None = None
    max_audio_length_ms: float = 10_000

    def __post_init__(self) -> None:
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be > 0 and finite, got {self.temperature}")
        if isinstance(self.topk, bool) or not isinstance(self.topk, Integral) or self.topk < 1:
            raise ValueError(f"topk must be a whole number >= 1, got {self.topk!r}")
        check_seed(self.seed)
        if not FRAME_MS <= self.max_audio_length_ms < math.inf:
            raise ValueError(f"max_audio_length_ms must be finite and at least one frame ({FRAME_MS} ms)")

    @property
    def max_frames(self) -> int:
        return int(self.max_audio_length_ms // FRAME_MS)

    def with_(self, **changes) -> SamplingConfig:
        return replace(self, **changes)


@dataclass(frozen=True)
class StreamConfig:
    """Chunking of the streaming iterator.

    Each chunk is watermarked on its own, and silentcipher can read a mark back only from about
    0.84 s of audio, so the defaults are 11 frames (0.88 s) per chunk; only the last chunk of an
    utterance may be shorter. Smaller first chunks cut time-to-first-audio but carry marks that
    cannot be verified on their own.
    """

    first_chunk_frames: int = 11
    chunk_frames: int = 11

    def __post_init__(self) -> None:
        if self.first_chunk_frames < 1 or self.chunk_frames < 1:
            raise ValueError("stream chunks must hold at least one frame")
