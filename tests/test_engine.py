"""The Engine on the tiny preset: text + context -> audio, streaming, windows, watermark policy."""

import pytest
import torch

from csm_multi import SamplingConfig, Segment, StreamConfig
from csm_multi.codec import MimiCodec, build_mimi
from csm_multi.config import SAMPLES_PER_FRAME
from csm_multi.engine import Engine
from csm_multi.errors import ContextTooLongError, WatermarkUnavailableError
from csm_multi.text import ByteTokenizer

SHORT = SamplingConfig(seed=3, max_audio_length_ms=480)  # at most 6 frames


class SpyWatermarker:
    """Records every waveform it is asked to mark and adds a recognisable offset."""

    def __init__(self):
        self.calls = []

    def apply(self, audio, sample_rate):
        self.calls.append(audio.numel())
        return audio + 0.5


@pytest.fixture(scope="module")
def codec():
    return MimiCodec(build_mimi(None, seed=0))


@pytest.fixture(scope="module")
def engine(tiny_model, codec):
    return Engine(tiny_model, ByteTokenizer(), codec, watermark=False)


def test_generate_returns_audio_of_its_frames(engine):
    utt = engine.generate("Hello there.", 0, sampling=SHORT)
    k, t = utt.codes.shape
    assert k == 32 and 1 <= t <= 6
    assert utt.audio.shape == (t * SAMPLES_PER_FRAME,) and utt.audio.dtype == torch.float32
    assert utt.sample_rate == 24_000 and utt.seed == 3 and not utt.watermarked
    assert torch.isfinite(utt.audio).all() and utt.audio.abs().max() > 0
    assert utt.prompt_positions == len(ByteTokenizer().encode("[0]Hello there."))


def test_same_seed_same_audio_other_seed_differs(engine):
    a = engine.generate("Hi.", 1, sampling=SHORT)
    b = engine.generate("Hi.", 1, sampling=SHORT)
    c = engine.generate("Hi.", 1, sampling=SHORT.with_(seed=4))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.audio, b.audio)
    assert not torch.equal(a.codes, c.codes)


def test_seed_is_drawn_and_reported_when_not_given(engine):
    a = engine.generate("Hi.", 0, sampling=SHORT.with_(seed=None))
    b = engine.generate("Hi.", 0, sampling=SHORT.with_(seed=a.seed))
    assert torch.equal(a.codes, b.codes)


def test_context_audio_is_encoded_into_the_prompt(engine, codec):
    ref = torch.randn(SAMPLES_PER_FRAME * 5, generator=torch.Generator().manual_seed(0)) * 0.1
    seg = Segment(speaker=0, text="Reference words.", audio=ref)
    tokens, mask = engine.build_prompt("Next.", 0, [seg])
    n_ref_text = len(ByteTokenizer().encode("[0]Reference words."))
    n_text = len(ByteTokenizer().encode("[0]Next."))
    assert tokens.shape == (n_ref_text + 5 + 1 + n_text, 33)
    audio_rows = slice(n_ref_text, n_ref_text + 5)
    assert torch.equal(tokens[audio_rows, :32], codec.encode(ref).T.cpu())
    assert not tokens[n_ref_text + 5].any() and mask[n_ref_text + 5, :32].all()  # EOS frame
    assert engine.segment_positions(seg) == n_ref_text + 6
    # precomputed codes are used as they are (profiles pass them)
    seg_codes = Segment(speaker=0, text="Reference words.", codes=codec.encode(ref))
    assert torch.equal(engine.build_prompt("Next.", 0, [seg_codes])[0], tokens)
    assert engine.generate("Next.", 0, [seg], SHORT).codes.shape[0] == 32


def test_window_check_raises_clear_error(engine):
    with pytest.raises(ContextTooLongError, match="2048 positions"):
        engine.generate("Hi.", 0, sampling=SHORT.with_(max_audio_length_ms=2048 * 80))
    long_ctx = [Segment(0, "x", codes=torch.ones(32, 2040, dtype=torch.long))]
    with pytest.raises(ContextTooLongError, match="shorten the context"):
        engine.generate("Hi.", 0, long_ctx, SHORT)


def test_stream_chunks_concatenate_to_the_whole_call(engine):
    sampling = SamplingConfig(seed=11, max_audio_length_ms=80 * 13)
    whole = engine.generate("Streaming test line.", 0, sampling=sampling)
    chunks = list(engine.stream("Streaming test line.", 0, sampling=sampling,
                                chunks=StreamConfig(first_chunk_frames=2, chunk_frames=4)))
    t = whole.codes.shape[1]
    assert t > 2, "the random model must produce a few frames for this test to mean anything"
    sizes = [c.audio.numel() // SAMPLES_PER_FRAME for c in chunks]
    assert sizes[0] == 2 and all(s <= 4 for s in sizes[1:]) and sum(sizes) == t
    assert [c.frames for c in chunks] == list(torch.tensor(sizes).cumsum(0).tolist())
    streamed = torch.cat([c.audio for c in chunks])
    assert streamed.shape == whole.audio.shape
    torch.testing.assert_close(streamed, whole.audio, atol=1e-5, rtol=0)


def test_watermark_required_unless_explicitly_disabled(tiny_model, codec):
    with pytest.raises(WatermarkUnavailableError, match="watermark=False"):
        Engine(tiny_model, ByteTokenizer(), codec)


def test_every_output_goes_through_the_watermark(tiny_model, codec):
    spy = SpyWatermarker()
    engine = Engine(tiny_model, ByteTokenizer(), codec, spy)
    plain = Engine(tiny_model, ByteTokenizer(), codec, watermark=False)
    utt, ref = engine.generate("Hi.", 0, sampling=SHORT), plain.generate("Hi.", 0, sampling=SHORT)
    assert utt.watermarked and spy.calls == [utt.audio.numel()]
    torch.testing.assert_close(utt.audio, ref.audio + 0.5)
    chunks = list(engine.stream("Hi.", 0, sampling=SHORT, chunks=StreamConfig(1, 2)))
    assert all(c.watermarked for c in chunks) and len(spy.calls) == 1 + len(chunks)


def test_stages_are_announced_before_decoding_and_watermarking(tiny_model, codec):
    """`on_stage` hears "decoding" after the last frame, then "watermarking" (only with a watermarker);
    a batch announces each stage once, and its `on_frame` runs once per batch frame."""
    spy = SpyWatermarker()
    marked = Engine(tiny_model, ByteTokenizer(), codec, spy)
    plain = Engine(tiny_model, ByteTokenizer(), codec, watermark=False)
    events = []

    def frame():
        events.append(("frame", len(spy.calls)))

    def stage(name):
        events.append((name, len(spy.calls)))

    utt = marked.generate("Hi.", 0, sampling=SHORT, on_frame=frame, on_stage=stage)
    frames = utt.codes.shape[1]
    assert events == [("frame", 0)] * frames + [("decoding", 0), ("watermarking", 0)] and len(spy.calls) == 1
    events.clear()
    again = plain.generate("Hi.", 0, sampling=SHORT, on_stage=stage)
    assert events == [("decoding", 1)] and torch.equal(again.codes, utt.codes)  # stages change nothing drawn
    events.clear()
    reqs = [("A fairly long first line.", 0, []), ("Short.", 1, [])]
    batch = marked.generate_batch(reqs, SHORT, on_frame=frame, on_stage=stage)
    longest = max(u.codes.shape[1] for u in batch)
    assert events[-2:] == [("decoding", 1), ("watermarking", 1)] and len(spy.calls) == 3
    assert events[:-2] == [("frame", 1)] * longest
    assert all(u.watermarked for u in batch)
    plain_batch = plain.generate_batch(reqs, SHORT)
    for a, b in zip(batch, plain_batch):
        assert torch.equal(a.codes, b.codes)
        torch.testing.assert_close(a.audio, b.audio + 0.5)  # every row marked once, after its own decode


def test_batch_rows_sample_with_their_own_seeds(engine):
    """Sampled (not greedy) batches: row i uses seed + i, and regenerating it alone with that seed
    gives the same codes."""
    sampling = SamplingConfig(seed=11, topk=50, temperature=0.9, max_audio_length_ms=480)
    reqs = [("A fairly long first line of text.", 0, []), ("Short.", 1, []), ("Third one here.", 0, [])]
    batch = engine.generate_batch(reqs, sampling)
    assert [u.seed for u in batch] == [11, 12, 13]
    for (text, spk, ctx), got in zip(reqs, batch):
        assert got.codes.shape[1] > 0
        assert torch.equal(got.codes, engine.generate(text, spk, ctx, sampling.with_(seed=got.seed)).codes)
    picked = engine.generate_batch(reqs[:2], sampling, seeds=[12, None])
    assert picked[0].seed == 12 and torch.equal(picked[0].codes, engine.generate(*reqs[0], sampling.with_(seed=12)).codes)
    assert isinstance(picked[1].seed, int)
    drawn = engine.generate_batch(reqs[:2], sampling.with_(seed=None))
    assert drawn[0].seed != drawn[1].seed
    with pytest.raises(ValueError, match="1 seeds for 2 requests"):
        engine.generate_batch(reqs[:2], sampling, seeds=[1])


def test_batch_rows_match_single_calls_greedy(engine):
    greedy = SamplingConfig(topk=1, seed=0, max_audio_length_ms=320)
    reqs = [("A fairly long first line of text.", 0, []), ("Short.", 1, [])]
    batch = engine.generate_batch(reqs, greedy)
    for (text, spk, ctx), got in zip(reqs, batch):
        alone = engine.generate(text, spk, ctx, greedy)
        assert torch.equal(got.codes, alone.codes)
        torch.testing.assert_close(got.audio, alone.audio)


@pytest.mark.parametrize("call, expected", [
    (lambda e: e.generate("", 0), "nothing to say"),
    (lambda e: e.generate(None, 0), "nothing to say"),
    (lambda e: e.generate("Hi.", -1), "speaker must be a whole number"),
    (lambda e: e.generate("Hi.", True), "speaker must be a whole number"),
    (lambda e: e.generate("Hi.", 0, [Segment(0, "t", audio=torch.zeros(2400, 2))]), "mono float tensor"),
    (lambda e: e.generate("Hi.", 0, [Segment(0, "t", audio=torch.zeros(2, 2400))]), "mono float tensor"),
    (lambda e: e.generate("Hi.", 0, [Segment(0, "t", audio=torch.zeros(2400, dtype=torch.int16))]), "mono float"),
    (lambda e: e.generate("Hi.", 0, [Segment(0, "t", codes=torch.zeros(9, 4, dtype=torch.long))]), "K=32"),
    (lambda e: e.generate("Hi.", 0, [Segment(0, "t", codes=torch.zeros(32, 4))]), "integer tensor"),
    (lambda e: e.generate("Hi.", 0, [Segment(0, "t", codes=torch.full((32, 4), 5000))]), "must lie in 0..2047"),
    (lambda e: e.stream("", 0).__next__(), "nothing to say"),
    (lambda e: e.generate_batch([("Hi.", 0, [])], seeds=[2**64]), "seed must be a whole number"),
])
def test_bad_requests_are_clear_errors_before_any_work(engine, call, expected):
    with pytest.raises(ValueError, match=expected):
        call(engine)


@pytest.mark.parametrize("kw, expected", [
    ({"seed": -1}, "seed must be"), ({"seed": 2**63}, "seed must be"), ({"seed": 1.5}, "seed must be"),
    ({"topk": 1.5}, "topk must be"), ({"temperature": float("inf")}, "temperature must be"),
    ({"max_audio_length_ms": float("inf")}, "must be finite"),
])
def test_sampling_values_are_checked(kw, expected):
    with pytest.raises(ValueError, match=expected):
        SamplingConfig(**kw)
    assert SamplingConfig(seed=2**63 - 1).seed == 2**63 - 1
