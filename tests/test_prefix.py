"""The prefix cache: a dialogue line reuses the backbone state of the lines before it and prefills
only what is new; the codes equal a full prefill's (tiny preset, CPU fp32), alone and through the
scheduler; entries are bounded in bytes, subsumed when extended, kept when a caller stops early,
and a context the budget trimmed falls back to prefilling what differs."""

from __future__ import annotations

import pytest
import torch

from csm_multi import SamplingConfig
from csm_multi.codec import MimiCodec, build_mimi
from csm_multi.config import get_preset
from csm_multi.context import ContextBudget
from csm_multi.engine import Engine
from csm_multi.frames import Segment
from csm_multi.model import CSM
from csm_multi.prefix import PrefixCache, common_length, fed_frames
from csm_multi.render import RenderConfig, ScriptRenderer
from csm_multi.text import ByteTokenizer

SCRIPT = """Alice: Hi Bob, did you bring the maps?
Bob: I did, and the compass too.
Alice: Then we leave at dawn.
Bob: Dawn it is. Sleep well.
"""
VOICES = {"alice": "alice-voice", "bob": "bob-voice"}


@pytest.fixture(scope="module")
def model():
    return CSM(get_preset("tiny")).init_random_(seed=3).eval()


@pytest.fixture(scope="module")
def codec():
    return MimiCodec(build_mimi(None, seed=0))


def profile(name: str) -> Segment:
    g = torch.Generator().manual_seed(len(name) * 7)
    return Segment(speaker=0, text=f"This is how {name} sounds.", codes=torch.randint(1, 2048, (32, 12), generator=g))


def render(model, codec, mb: int, serve: bool, config: RenderConfig, budget: ContextBudget | None = None):
    engine = Engine(model, ByteTokenizer(), codec, watermark=False, prefix_cache_mb=mb)
    if serve:
        engine.serve()
    try:
        result = ScriptRenderer(engine, profile, budget=budget).render(SCRIPT, VOICES, config)
    finally:
        engine.stop_serving()
    return result, engine.prefix


@pytest.mark.parametrize("serve", [False, True], ids=["alone", "scheduler"])
@pytest.mark.parametrize("topk", [1, 50], ids=["greedy", "sampled"])
def test_a_dialogue_reuses_earlier_lines_and_makes_the_same_codes(model, codec, serve, topk):
    config = RenderConfig(seed=11, topk=topk, max_line_ms=480, extra_ms=0)
    full, off = render(model, codec, 0, serve, config)
    cached, prefix = render(model, codec, 64, serve, config)
    assert off.hits == 0 and len(off) == 0
    for a, b in zip(full.clips, cached.clips, strict=True):
        assert torch.equal(a.codes, b.codes), f"line {a.line.number}"
    # every line after the first found the voices and all earlier lines but the last in the cache
    assert prefix.hits == 3 and prefix.misses == 1
    engine = Engine(model, ByteTokenizer(), codec, watermark=False)
    voices = sum(engine.segment_positions(profile(v)) for v in VOICES.values())
    assert prefix.reused >= 3 * voices
    assert cached.clips[-1].context[:2] == ["profile:alice-voice", "profile:bob-voice"]  # fixed order


@pytest.mark.parametrize("mode", ["conversational", "fast"])
def test_takes_of_a_line_prefill_their_prompt_once_and_keep_their_codes(model, codec, mode):
    """Three takes per line through the scheduler: a line's three identical prompts join together,
    the first is prefilled and its state kept the moment its prefill is done, and the other two copy
    it and compute only their last position. In fast mode the later lines also find the voice
    prompts the first line prefilled. Every take's codes equal those of a render without the cache."""
    config = RenderConfig(seed=4, topk=50, max_line_ms=400, extra_ms=0, takes=3, mode=mode)
    runs = {}
    for mb in (0, 64):
        engine = Engine(model, ByteTokenizer(), codec, watermark=False, prefix_cache_mb=mb)
        scheduler = engine.serve()
        try:
            result = ScriptRenderer(engine, profile).render(SCRIPT, VOICES, config)
            runs[mb] = result, scheduler.stats()["prefilled_positions"]
        finally:
            engine.stop_serving()
    (full, without), (cached, prefilled) = runs[0], runs[64]
    for i in range(len(full.clips)):
        for a, b in zip(full.candidates(i), cached.candidates(i), strict=True):
            assert torch.equal(a.codes, b.codes), f"line {i + 1}, take {a.take}"
    prompts = [c.context_positions + c.context_split["text"] for c in full.clips]
    assert without == 3 * sum(prompts)  # no cache: every take prefills its whole prompt
    # With it, a line's first take prefills at most what follows the voice prompts (in fast mode
    # the first line's, in a dialogue the earlier lines' too), and the other two one position each.
    voices = sum(engine.segment_positions(profile(v)) for v in VOICES.values())
    assert all(c.context[:2] == ["profile:alice-voice", "profile:bob-voice"] for c in cached.clips)
    assert prefilled <= prompts[0] + sum(p - voices for p in prompts[1:]) + 2 * len(prompts)


def test_the_state_a_line_ends_with_is_what_a_full_prefill_computes(model, codec):
    """Teacher-forced check at the cache level: the kept state of prompt + fed frames equals the
    state a fresh prefill of the same frames computes, to float rounding."""
    engine = Engine(model, ByteTokenizer(), codec, watermark=False)
    sampling = SamplingConfig(topk=1, seed=0, max_audio_length_ms=80 * 9)
    context = [profile("alice")]
    codes, _, _ = engine.generate_codes("Hello over there.", 0, context, sampling)
    [entry] = engine.prefix._entries.values()
    tokens, mask = engine.build_prompt("Hello over there.", 0, context)
    want, _ = fed_frames(tokens, mask, list(codes.T[:-1]))  # the last frame made is never fed
    assert torch.equal(entry.tokens, want)
    n = want.size(0)
    with torch.inference_mode():
        model.setup_caches(1)
        model.reset_caches()
        model.backbone_step(entry.tokens[None], entry.mask[None], torch.arange(n).unsqueeze(0))
        fresh = torch.stack([layer.attn.kv_cache.k_cache[0, :, :n] for layer in model.backbone.layers])
    assert torch.allclose(entry.keys, fresh, atol=1e-5, rtol=1e-4)


def test_a_trimmed_context_falls_back_to_prefilling_what_differs(model, codec):
    """A window so small that the oldest lines are dropped: prompts then stop starting like the last
    one, and the codes still equal the uncached run's."""
    config = RenderConfig(seed=5, topk=1, max_line_ms=400, extra_ms=0)
    budget = ContextBudget(230)
    full, _ = render(model, codec, 0, False, config, budget)
    cached, prefix = render(model, codec, 64, False, config, budget)
    assert any(c.dropped for c in cached.clips)
    for a, b in zip(full.clips, cached.clips, strict=True):
        assert torch.equal(a.codes, b.codes)
    assert prefix.hits >= 1


@torch.inference_mode()
def test_stopping_early_keeps_what_was_fed(model, codec):
    engine = Engine(model, ByteTokenizer(), codec, watermark=False)
    sampling = SamplingConfig(topk=1, seed=0, max_audio_length_ms=80 * 20)
    tokens, _ = engine.build_prompt("Stop me early.", 0, [profile("bob")])
    frames, _, _ = engine._frames("Stop me early.", 0, [profile("bob")], sampling)
    got = [next(frames) for _ in range(4)]
    frames.close()  # the consumer stops after four frames: three were fed back
    [entry] = engine.prefix._entries.values()
    assert entry.length == tokens.size(0) + 3
    assert torch.equal(entry.tokens[-3:, :-1], torch.stack(got[:3]))


@torch.inference_mode()
def test_entries_are_bounded_in_bytes_and_subsumed_when_extended(model):
    model.setup_caches(2)
    model.reset_caches()
    k = model.config.audio_num_codebooks

    def frames(n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(1, 100, (n, k + 1), generator=g), torch.ones(n, k + 1, dtype=torch.bool)

    probe = PrefixCache(model, min_reuse=1)
    probe.store(*frames(10, 9), row=0)
    per_position = probe.nbytes // 10
    cache = PrefixCache(model, max_bytes=per_position * 100, min_reuse=1)

    a_tokens, a_mask = frames(40, 0)
    cache.store(a_tokens[:30], a_mask[:30], row=0)
    cache.store(a_tokens, a_mask, row=0)  # extends the first entry: it replaces it
    assert len(cache) == 1
    cache.store(a_tokens[:20], a_mask[:20], row=0)  # already held by the longer one
    assert len(cache) == 1
    b_tokens, b_mask = frames(50, 1)
    cache.store(b_tokens, b_mask, row=1)
    assert len(cache) == 2
    c_tokens, c_mask = frames(45, 2)
    cache.store(c_tokens, c_mask, row=1)  # over the byte bound: the oldest entry (a) goes
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    assert cache.load(a_tokens, a_mask, row=0) == 0
    # b is still there: a prompt starting with its first 25 frames reuses exactly those
    prompt = torch.cat([b_tokens[:25], frames(5, 3)[0]])
    assert cache.load(prompt, torch.ones_like(prompt, dtype=torch.bool), row=0) == 25
    # never the whole prompt: its last frame is always computed
    assert cache.load(b_tokens[:10], b_mask[:10], row=0) == 9
    few = PrefixCache(model, min_reuse=1, max_entries=2)
    for seed in range(4):
        few.store(*frames(12, 10 + seed), row=0)
    assert len(few) == 2  # the two newest
    assert few.load(*frames(12, 13), row=0) == 11 and few.load(*frames(12, 10), row=0) == 0
    with pytest.raises(ValueError, match="prefix cache size"):
        PrefixCache(model, max_bytes=-1)
    with pytest.raises(ValueError, match="prefix_cache_mb"):
        Engine(model, ByteTokenizer(), None, watermark=False, prefix_cache_mb=-5)


def test_common_length():
    a = torch.arange(12).reshape(4, 3)
    m = torch.ones(4, 3, dtype=torch.bool)
    b = a.clone()
    b[2, 1] = -1
    assert common_length(a, m, b, m) == 2
    assert common_length(a, m, a[:3], m[:3]) == 3
    m2 = m.clone()
    m2[0, 0] = False
    assert common_length(a, m, a, m2) == 0
    assert common_length(a[:0], m[:0], a, m) == 0


def test_the_size_setting_reaches_the_engine_and_bad_values_name_the_flag(monkeypatch, capsys):
    import app as app_module
    from csm_multi.cli import build_parser
    from csm_multi.loaders import build_engine

    engine = build_engine("tiny", watermark=False, prefix_cache_mb=3)
    assert engine.prefix.max_bytes == 3 << 20 and engine.prefix.enabled
    assert not build_engine("tiny", watermark=False, prefix_cache_mb=0).prefix.enabled
    with pytest.raises(ValueError, match="--prefix-cache-mb"):
        build_engine("tiny", watermark=False, prefix_cache_mb=-1)
    monkeypatch.setenv("CSM_PREFIX_CACHE_MB", "64")
    assert build_parser().parse_args(["say", "hello"]).prefix_cache_mb == 64
    monkeypatch.setattr(app_module, "build_engine", lambda *a, **k: pytest.fail("built despite a bad flag"))
    assert app_module.main(["--model", "tiny", "--prefix-cache-mb", "-2"]) == 2
    assert "error: --prefix-cache-mb must be a whole number >= 0" in capsys.readouterr().err
