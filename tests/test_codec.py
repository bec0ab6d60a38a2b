"""Mimi codec: shapes, code ranges, round-trip lengths, streaming vs whole decode, errors.

One untrained Mimi with random codebooks per module; CPU only, no downloads.
"""

from __future__ import annotations

import math

import pytest
import torch

from csm_multi.codec import MimiCodec, build_mimi
from csm_multi.loaders import mimi_weights_path
from csm_multi.config import SAMPLES_PER_FRAME
from csm_multi.errors import AudioInputError, CheckpointFormatError, WeightsUnavailableError

K = 32
# Measured streaming-vs-whole max abs difference is ~1.5e-7 (float rounding); decoding chunks
# without the stream's state differs by ~5e-2, so this bound separates the two.
STREAM_ATOL = 1e-5


@pytest.fixture(scope="module")
def codec() -> MimiCodec:
    return MimiCodec(build_mimi(None, device="cpu", num_codebooks=K, seed=0))


def noise(*shape: int, seed: int = 1, amp: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * amp


def test_attributes(codec: MimiCodec) -> None:
    assert codec.sample_rate == 24_000
    assert codec.samples_per_frame == SAMPLES_PER_FRAME == 1920
    assert codec.num_codebooks == K
    assert codec.device == torch.device("cpu")


def test_encode_shape_dtype_and_range(codec: MimiCodec) -> None:
    codes = codec.encode(noise(5 * SAMPLES_PER_FRAME + 100))
    assert codes.shape == (K, 6)
    assert codes.dtype == torch.int64
    assert codes.device == codec.device
    assert int(codes.min()) >= 0 and int(codes.max()) < 2048


def test_random_codebooks_give_varied_nonzero_codes(codec: MimiCodec) -> None:
    codes = codec.encode(noise(12 * SAMPLES_PER_FRAME))
    # An all-zero frame is CSM's end of audio: untrained moshi codebooks would give only those.
    assert (codes != 0).any(dim=0).all()
    assert all(len(level.unique()) > 1 for level in codes), "every codebook level should vary over time"


@pytest.mark.parametrize("length", [1, 1919, 1920, 1921, 5000, 4 * 1920 + 7])
def test_round_trip_length(codec: MimiCodec, length: int) -> None:
    codes = codec.encode(noise(length))
    frames = math.ceil(length / SAMPLES_PER_FRAME)
    assert codes.shape == (K, frames)
    audio = codec.decode(codes)
    assert audio.shape == (frames * SAMPLES_PER_FRAME,)
    assert audio.dtype == torch.float32
    assert 0 <= audio.shape[0] - length < SAMPLES_PER_FRAME
    assert torch.isfinite(audio).all()


def test_batch_encode_equals_per_item(codec: MimiCodec) -> None:
    batch = noise(3, 3 * SAMPLES_PER_FRAME + 5, seed=2)
    codes = codec.encode(batch)
    assert codes.shape == (3, K, 4)
    for item, item_codes in zip(batch, codes, strict=True):
        assert torch.equal(codec.encode(item), item_codes)
    audio = codec.decode(codes)
    assert audio.shape == (3, 4 * SAMPLES_PER_FRAME)
    torch.testing.assert_close(audio[1], codec.decode(codes[1]), atol=STREAM_ATOL, rtol=0)


def _decode_in_chunks(codec: MimiCodec, codes: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    outs, start = [], 0
    with codec.stream(batch_size=codes.shape[0]) as stream:
        for size in sizes:
            out = stream.decode(codes[..., start : start + size])
            assert out.shape == (codes.shape[0], size * SAMPLES_PER_FRAME)
            outs.append(out)
            start += size
    assert start == codes.shape[-1]
    return torch.cat(outs, dim=-1)


def test_stream_decode_matches_whole_decode(codec: MimiCodec) -> None:
    codes = codec.encode(noise(2, 12 * SAMPLES_PER_FRAME, seed=3))
    whole = codec.decode(codes)
    chunked = _decode_in_chunks(codec, codes, [1, 3, 2, 1, 4, 1])
    assert chunked.shape == whole.shape
    assert (chunked - whole).abs().max() < STREAM_ATOL
    # Leaving the block resets the state: a second stream starts from scratch, not mid-utterance.
    assert not codec.mimi.is_streaming
    again = _decode_in_chunks(codec, codes, [5, 7])
    assert (again - whole).abs().max() < STREAM_ATOL


def test_stream_accepts_unbatched_codes_and_guards_misuse(codec: MimiCodec) -> None:
    codes = codec.encode(noise(3 * SAMPLES_PER_FRAME, seed=4))
    whole = codec.decode(codes)
    with codec.stream() as stream:
        first = stream.decode(codes[:, :1])
        assert first.shape == (SAMPLES_PER_FRAME,)
        # a whole decode meanwhile (another visitor's line) neither fails nor disturbs the stream:
        # the stream runs on a twin of the model with its own state
        assert torch.equal(codec.decode(codes), whole)
        with pytest.raises(ValueError):
            stream.decode(codes[None].expand(2, -1, -1)[..., 1:2])  # batch 2 in a batch-1 stream
        rest = stream.decode(codes[:, 1:])
    assert (torch.cat([first, rest]) - whole).abs().max() < STREAM_ATOL
    with pytest.raises(RuntimeError, match="closed"):
        stream.decode(codes[:, :1])
    with codec.stream():  # a newer stream on the same model does not revive the old one
        with pytest.raises(RuntimeError, match="closed"):
            stream.decode(codes[:, :1])
    assert not torch.is_inference_mode_enabled()


def test_encode_rejects_bad_audio(codec: MimiCodec) -> None:
    for bad in (torch.zeros(0), torch.zeros(2, 2, 1920), torch.zeros(1920, dtype=torch.int16)):
        with pytest.raises(AudioInputError):
            codec.encode(bad)
    with pytest.raises(AudioInputError, match="NaN"):
        codec.encode(torch.full((1920,), float("nan")))


def test_decode_rejects_wrong_codebook_count(codec: MimiCodec) -> None:
    with pytest.raises(ValueError, match="K=32"):
        codec.decode(torch.zeros(8, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        codec.decode(torch.zeros(K, 3))  # float codes


def test_build_mimi_is_deterministic_and_leaves_global_rng_alone(codec: MimiCodec) -> None:
    audio = noise(4 * SAMPLES_PER_FRAME, seed=5)
    rng_before = torch.get_rng_state()
    same_seed = MimiCodec(build_mimi(None, seed=0))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(same_seed.encode(audio), codec.encode(audio))
    other_seed = MimiCodec(build_mimi(None, seed=1))
    assert not torch.equal(other_seed.encode(audio), codec.encode(audio))


def test_build_mimi_num_codebooks() -> None:
    codec8 = MimiCodec(build_mimi(None, num_codebooks=8))
    codes = codec8.encode(noise(SAMPLES_PER_FRAME))
    assert codec8.num_codebooks == 8 and codes.shape == (8, 1)
    assert codec8.decode(codes).shape == (SAMPLES_PER_FRAME,)


def test_build_mimi_missing_file_raises(tmp_path) -> None:
    with pytest.raises(WeightsUnavailableError, match="not found"):
        build_mimi(tmp_path / "absent.safetensors")


def test_build_mimi_unreadable_file_raises(tmp_path) -> None:
    bad = tmp_path / "mimi.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="not a Mimi checkpoint"):
        build_mimi(bad)


def test_weights_path_offline_raises_readable_error(monkeypatch, tmp_path) -> None:
    import huggingface_hub.constants as hub_constants

    # The hub reads its settings into `constants` at import, so patch both the env and the module;
    # an empty cache makes sure a previously downloaded file does not satisfy the request.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as info:
        mimi_weights_path()
    message = str(info.value)
    assert "HF_TOKEN" in message and "tiny" in message


def test_streams_in_several_threads_at_once_each_keep_their_own_state(codec: MimiCodec) -> None:
    import threading

    clips = [codec.encode(noise(6 * SAMPLES_PER_FRAME, seed=10 + i)) for i in range(3)]
    wholes = [codec.decode(c) for c in clips]
    out = [None] * 3
    barrier = threading.Barrier(3)

    def run(i):
        parts = []
        with codec.stream() as stream:
            for t in range(clips[i].shape[-1]):
                barrier.wait(timeout=30)  # every thread is mid-stream at the same time
                parts.append(stream.decode(clips[i][:, t: t + 1]))
        out[i] = torch.cat(parts)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for got, whole in zip(out, wholes):
        assert (got - whole).abs().max() < STREAM_ATOL
    assert not codec.mimi.is_streaming


def test_moshi_compiles_nothing_lazily():
    """moshi's lazy torch.compile is off: a server's first encode of each shape compiled for seconds."""
    import moshi.modules.rope as rope
    import moshi.utils.compile as moshi_compile

    assert moshi_compile._compile_disabled or not hasattr(rope.apply_rope, "__wrapped__")
