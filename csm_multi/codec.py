"""Mimi, the neural audio codec: waveform <-> codes, whole or streamed frame by frame.

One job: encode 24 kHz waveforms to Mimi codes and decode codes back, using moshi's `MimiModel`.
It knows nothing about CSM, text, frames of tokens or speakers. Building a model is separate from
using it: `build_mimi` makes one (trained from a file, or untrained for tests), `MimiCodec` takes
that object in. Importing this module does no work.

Shapes: B batch, K codebooks (32 for CSM), T frames (80 ms, 1920 samples each), S samples.
"""

from __future__ import annotations

import copy
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

# moshi wraps rotary embeddings, gating and its quantizer in a lazy torch.compile: on CPU the first call
# of each shape then compiles C++ for seconds (in a fresh temp dir, every process start), and several
# server threads hitting it at once all waited 40 s for their first render. Steady-state encode and
# decode times were the same without it (measured on the project's 2-core CPU), so it is off unless
# NO_TORCH_COMPILE is set otherwise before csm_multi is imported.
os.environ.setdefault("NO_TORCH_COMPILE", "1")
import moshi.utils.compile as _moshi_compile

if os.environ["NO_TORCH_COMPILE"]:
    _moshi_compile._compile_disabled = True  # moshi imported before us: its wrappers read this flag per call
from moshi.models import MimiModel, loaders
from moshi.quantization.core_vq import EuclideanCodebook

from . import omp
from .config import SAMPLE_RATE, SAMPLES_PER_FRAME
from .errors import AudioInputError, CheckpointFormatError, WeightsUnavailableError

# Norm of every random codebook vector of an untrained Mimi. Untrained Mimi maps 0.1-RMS noise to
# quantizer inputs of norm ~0.14; vectors of comparable norm keep every residual level varied.
# All vectors share one norm, so the nearest one is the one of highest cosine: no code is dead.
_RANDOM_CODEBOOK_NORM = 0.03


def build_mimi(
    weights_path: str | Path | None,
    device: str | torch.device = "cpu",
    num_codebooks: int = 32,
    seed: int = 0,
) -> MimiModel:
    """A Mimi model in eval mode using `num_codebooks` codebooks.

    `weights_path=None` builds an untrained Mimi, deterministic from `seed` (network weights and
    codebooks), without touching the global RNG. Its codebooks are filled with random vectors:
    moshi leaves them zero, so every code would be 0, and an all-zero frame means end of audio
    to CSM.
    """
    if weights_path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # Built on the CPU so that the same seed gives the same model on every device.
            mimi = loaders.get_mimi(None, device="cpu", num_codebooks=num_codebooks)
        randomize_codebooks(mimi, seed)
        mimi = mimi.to(device)
    else:
        path = Path(weights_path)
        if not path.is_file():
            raise WeightsUnavailableError(f"Mimi weights file not found: {path}")
        try:
            mimi = loaders.get_mimi(path, device=device, num_codebooks=num_codebooks)
        except Exception as e:  # safetensors, torch.load and load_state_dict raise unrelated types
            raise CheckpointFormatError(f"{path} is not a Mimi checkpoint moshi can load: {e}") from e
    return mimi.eval()


def randomize_codebooks(mimi: MimiModel, seed: int = 0) -> None:
    """Fill every quantizer codebook (all 32 levels, used or not) with random equal-norm vectors.

    A moshi `EuclideanCodebook` keeps its centroids as `embedding_sum / cluster_usage` and caches
    that quotient in the non-persistent `_embedding` buffer on first use; encode (nearest centroid,
    `torch.cdist`) and decode (`F.embedding`) both read it. So: set `embedding_sum`, set
    `cluster_usage` to ones, drop the cache, and mark the codebook initialised (only training reads
    the flag, but a state dict saved from this model then says what it holds).
    """
    generator = torch.Generator().manual_seed(seed)
    for codebook in mimi.quantizer.modules():
        if not isinstance(codebook, EuclideanCodebook):
            continue
        vectors = torch.randn(codebook.codebook_size, codebook.dim, generator=generator)
        vectors *= _RANDOM_CODEBOOK_NORM / vectors.norm(dim=1, keepdim=True)
        with torch.no_grad():
            codebook.embedding_sum.copy_(vectors)
            codebook.cluster_usage.fill_(1.0)
            codebook._initialized.fill_(1.0)
        codebook.register_buffer("_embedding", None, persistent=False)
        codebook._cached_initialized = False


class MimiCodec:
    """Encode and decode with a built Mimi model (see `build_mimi`); the model is not copied.

    Waveforms are float at 24 kHz; codes are int64 in [0, 2048). Results live on `device`.
    """

    def __init__(self, mimi: MimiModel) -> None:
        if mimi.sample_rate != SAMPLE_RATE or mimi.frame_size != SAMPLES_PER_FRAME:
            raise ValueError(
                f"Mimi runs at {mimi.sample_rate} Hz with {mimi.frame_size}-sample frames; "
                f"expected {SAMPLE_RATE} Hz and {SAMPLES_PER_FRAME}"
            )
        self.mimi = mimi
        self.sample_rate: int = SAMPLE_RATE
        self.samples_per_frame: int = SAMPLES_PER_FRAME
        self.num_codebooks: int = mimi.num_codebooks
        self.cardinality: int = mimi.cardinality  # 2048
        param = next(mimi.parameters())
        self.device: torch.device = param.device
        self._dtype = param.dtype
        self._twins: list[MimiCodec] = []  # idle stream twins (see _borrow)
        self._twins_lock = threading.Lock()

    @omp.released
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """(S,) -> (K, T) or (B, S) -> (B, K, T) int64 codes, T = ceil(S / 1920).

        The waveform is zero-padded at the end to whole frames.
        """
        if audio.dim() not in (1, 2) or not audio.dtype.is_floating_point:
            raise AudioInputError(
                f"expected a float waveform of shape (S,) or (B, S), got {audio.dtype} {tuple(audio.shape)}"
            )
        if audio.shape[-1] == 0:
            raise AudioInputError("cannot encode an empty waveform")
        if not torch.isfinite(audio).all():
            raise AudioInputError("the waveform contains NaN or infinite samples")
        self._check_not_streaming()
        batch = audio if audio.dim() == 2 else audio[None]
        frames = math.ceil(batch.shape[-1] / self.samples_per_frame)
        batch = F.pad(batch, (0, frames * self.samples_per_frame - batch.shape[-1]))
        with torch.inference_mode():
            codes = self.mimi.encode(batch.to(self.device, self._dtype)[:, None, :])  # (B, K, T)
        codes = codes.long()
        return codes if audio.dim() == 2 else codes[0]

    @omp.released
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(K, T) -> (T * 1920,) or (B, K, T) -> (B, T * 1920) float32 waveform."""
        self._check_not_streaming()
        return self._decode(codes)

    @contextmanager
    def stream(self, batch_size: int = 1) -> Iterator[MimiStream]:
        """Decode chunk by chunk with moshi's streaming state; leaving the block resets it.

        Concatenated chunk outputs have exactly the length of a whole `decode` of the same codes
        and match it up to float rounding: measured on CPU in float32 with the untrained
        random-codebook Mimi (`build_mimi(None)`), chunks of 1, 3, 2, 5 or 7 frames over 12 frames
        (and 3-frame chunks over 100 frames) differed by at most 1.5e-7 against a waveform peak of
        ~0.17. Decoding the same chunks independently, without a stream, differs by ~0.05.

        moshi builds the state in inference mode here, so its tensors are inference tensors:
        touching it (e.g. `mimi.reset_streaming()`) outside `torch.inference_mode()` raises.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        twin = self._borrow()
        try:
            with twin._stream(batch_size) as stream:
                yield stream
        finally:
            with self._twins_lock:
                self._twins.append(twin)

    def _borrow(self) -> MimiCodec:
        """A codec for one stream: a twin of this Mimi sharing its weights (new module objects, so
        its own streaming state). Streams from several threads at once each get their own; the
        shared model never streams, so whole encodes and decodes can run beside them."""
        with self._twins_lock:
            if self._twins:
                return self._twins.pop()
        shared = {id(t): t for t in (*self.mimi.parameters(), *self.mimi.buffers())}
        return MimiCodec(copy.deepcopy(self.mimi, memo=shared))

    @contextmanager
    def _stream(self, batch_size: int) -> Iterator[MimiStream]:
        self._check_not_streaming()
        # The state is built (and later updated) in inference mode, but the caller's block is not
        # put in inference mode.
        with torch.inference_mode():
            state = self.mimi.streaming(batch_size)
        stream = MimiStream(self, batch_size)
        with state:
            try:
                yield stream
            finally:
                stream.closed = True

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() not in (2, 3) or codes.dtype.is_floating_point or codes.shape[-2] != self.num_codebooks:
            raise ValueError(
                f"expected integer codes of shape (K={self.num_codebooks}, T) or (B, K, T), "
                f"got {codes.dtype} {tuple(codes.shape)}"
            )
        # Values are not range-checked: that would cost a device sync per call.
        batch = codes if codes.dim() == 3 else codes[None]
        with torch.inference_mode():
            audio = self.mimi.decode(batch.to(self.device))  # (B, 1, T * 1920)
        audio = audio[:, 0].float()
        return audio if codes.dim() == 3 else audio[0]

    def _check_not_streaming(self) -> None:
        # Mimi's modules read their streaming state implicitly: a whole decode in the middle of a
        # stream would both use and corrupt it.
        if self.mimi.is_streaming:
            raise RuntimeError("this Mimi model is inside a stream(); finish the stream first")


class MimiStream:
    """Incremental decoder handed out by `MimiCodec.stream`; valid only inside that block."""

    def __init__(self, codec: MimiCodec, batch_size: int) -> None:
        self._codec = codec
        self.batch_size = batch_size
        self.closed = False

    @omp.released
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Next chunk: (B, K, t) -> (B, t * 1920) float32, continuing from the previous chunks.

        (K, t) -> (t * 1920,) is accepted when the stream's batch size is 1.
        """
        if self.closed:
            raise RuntimeError("this stream is closed; open a new one with MimiCodec.stream()")
        batch = codes.shape[0] if codes.dim() == 3 else 1
        if batch != self.batch_size or codes.shape[-1] == 0:
            raise ValueError(
                f"expected at least one frame for a batch of {self.batch_size}, got {tuple(codes.shape)}"
            )
        return self._codec._decode(codes)
