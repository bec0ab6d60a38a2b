"""Line endings: text padding, end-of-speech detection and trimming on synthetic signals
(tone bursts, silence, a noise floor), with and without codes."""

import math

import pytest
import torch

from csm_multi.config import SAMPLE_RATE, SAMPLES_PER_FRAME
from csm_multi.endings import ANALYSIS_SAMPLES, FILLER, end_sentence, pad_line, speech_bounds, trim_clip

SR = SAMPLE_RATE


def tone(seconds: float, db: float = -6.0, freq: float = 220.0) -> torch.Tensor:
    t = torch.arange(round(seconds * SR), dtype=torch.float64) / SR
    return (10 ** (db / 20) * math.sqrt(2) * torch.sin(2 * math.pi * freq * t)).float()


def noise(seconds: float, db: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 10 ** (db / 20) * torch.randn(round(seconds * SR), generator=g)


def speech_then_silence(speech_s=1.0, silence_s=1.0, floor_db=-70.0):
    """A tone burst (RMS -6 dBFS) then a noise floor; returns the clip and where the burst ends."""
    burst = tone(speech_s)
    return torch.cat([burst, noise(silence_s, floor_db)]) + noise(speech_s + silence_s, floor_db, 1), burst.numel()


# ---- text ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, ended", [
    ("Hello there", "Hello there."),
    ("  Hello there.  ", "Hello there."),
    ("Really?", "Really?"),
    ("Stop!", "Stop!"),
    ("Wait,", "Wait."),
    ("Listen ;", "Listen."),
    ('She said "go"', 'She said "go."'),
    ("He called it “home”", "He called it “home.”"),
    ('"Go!"', '"Go!"'),
    ("(quietly", "(quietly."),
    ("Well...", "Well..."),
    ("Well…", "Well…"),
    ("But I—", "But I—"),
    ("42", "42."),
    ("你好", "你好。"),
    ("こんにちは，", "こんにちは。"),
    ("Привет", "Привет."),
    ("안녕하세요", "안녕하세요."),
    ("नमस्ते", "नमस्ते।"),
    ("مرحبا", "مرحبا."),
    ("...", "..."),
])
def test_end_sentence(text, ended):
    assert end_sentence(text) == ended


@pytest.mark.parametrize("text, padded", [
    ("Hello there", "Hello there." + FILLER),
    ("Really?", "Really?" + FILLER),
    ('She said "go"', 'She said "go."' + FILLER),
    ("你好", "你好。" + FILLER),
    ("Well...", "Well..."),  # already trails off: that is its pause
    ("But I—", "But I—"),  # an intended cut-off
    ("...", "..."),
])
def test_pad_line(text, padded):
    assert pad_line(text) == padded
    assert pad_line(text, filler="") == end_sentence(text)


# ---- detection -----------------------------------------------------------------------------------
def test_end_of_speech_found_within_one_frame():
    clip, speech_end = speech_then_silence()
    start, end = speech_bounds(clip)
    assert start == 0 and abs(end - speech_end) <= ANALYSIS_SAMPLES


def test_quiet_final_syllable_is_speech():
    quiet = tone(0.15, db=-36.0, freq=330)  # 30 dB below the burst
    clip = torch.cat([tone(0.8), quiet, noise(0.6, -75)])
    _, end = speech_bounds(clip)
    assert end >= round(0.95 * SR) - ANALYSIS_SAMPLES
    kept = trim_clip(clip).audio
    assert kept.numel() >= round(0.95 * SR)
    assert torch.equal(kept[:round(0.95 * SR) - ANALYSIS_SAMPLES], clip[:round(0.95 * SR) - ANALYSIS_SAMPLES])


def test_leading_silence_is_found():
    clip = torch.cat([noise(0.5, -70), tone(0.5), noise(0.5, -70)])
    start, end = speech_bounds(clip)
    assert abs(start - SR // 2) <= ANALYSIS_SAMPLES and abs(end - SR) <= ANALYSIS_SAMPLES


@pytest.mark.parametrize("clip", [torch.zeros(0), torch.zeros(SR), noise(1.0, -80), torch.full((100,), float("nan"))],
                         ids=["empty", "zeros", "below-floor", "nan"])
def test_empty_and_silent_clips_are_left_alone(clip):
    assert speech_bounds(clip) is None
    codes = torch.zeros(32, -(-clip.numel() // SAMPLES_PER_FRAME), dtype=torch.long)
    out = trim_clip(clip, codes)
    assert out.audio is clip and out.codes is codes and (out.start, out.end) == (0, clip.numel())


# ---- trimming ------------------------------------------------------------------------------------
def test_trim_keeps_margin_and_cuts_codes_with_the_audio():
    clip, speech_end = speech_then_silence(speech_s=1.0, silence_s=1.2)
    clip = clip[: 28 * SAMPLES_PER_FRAME]  # 2.24 s, as a decoder would give for 28 frames
    codes = torch.arange(28).repeat(32, 1)
    out = trim_clip(clip, codes, margin_ms=120)
    margin = SR * 120 // 1000
    assert abs(out.audio.numel() - (speech_end + margin)) <= ANALYSIS_SAMPLES
    assert out.end == out.audio.numel() and out.start == 0
    assert torch.equal(out.audio[:speech_end], clip[:speech_end])  # speech untouched
    assert out.codes.shape == (32, math.ceil(out.audio.numel() / SAMPLES_PER_FRAME))
    assert torch.equal(out.codes, codes[:, : out.codes.shape[1]])


def test_fade_out_ends_at_zero_without_a_jump():
    burst = tone(1.0)
    clip = torch.cat([burst, noise(0.4, -50, seed=3)])  # a floor under the threshold, loud enough to click
    out = trim_clip(clip, margin_ms=120, fade_ms=20).audio
    assert out.numel() < clip.numel() and out[-1] == 0
    fade = SR * 20 // 1000
    step = (out[-fade - 1:] - torch.cat([out[-fade - 1:][1:], torch.zeros(1)])).abs()
    assert float(step.max()) <= float((clip[burst.numel():] - clip[burst.numel() - 1:-1]).abs().max())
    assert float(step[-1]) == 0  # and the following pause (zeros) joins without a step
    gains = out[-fade:] / clip[out.numel() - fade:out.numel()]
    assert torch.all(gains[1:] <= gains[:-1] + 1e-6)  # a monotone fade, not a truncation


def test_speech_running_to_the_end_is_not_faded():
    clip = torch.cat([noise(0.3, -75), tone(0.7)])
    out = trim_clip(clip, leading=False)
    assert torch.equal(out.audio, clip)


def test_leading_trim_moves_to_a_frame_boundary():
    clip = torch.cat([noise(0.7, -75), tone(0.8), noise(0.5, -75)])
    clip = clip[: clip.numel() // SAMPLES_PER_FRAME * SAMPLES_PER_FRAME]
    codes = torch.arange(clip.numel() // SAMPLES_PER_FRAME).repeat(4, 1)
    out = trim_clip(clip, codes, margin_ms=120, leading=True)
    speech_start = round(0.7 * SR)
    assert out.start % SAMPLES_PER_FRAME == 0
    assert speech_start - out.start >= SR * 120 // 1000 - ANALYSIS_SAMPLES
    assert speech_start - out.start < SR * 120 // 1000 + SAMPLES_PER_FRAME + ANALYSIS_SAMPLES
    assert out.audio[0] == 0 and torch.equal(out.audio[speech_start - out.start:][:1000], clip[speech_start:][:1000])
    assert out.codes.shape[1] == math.ceil(out.audio.numel() / SAMPLES_PER_FRAME)
    assert int(out.codes[0, 0]) == out.start // SAMPLES_PER_FRAME


def test_margin_longer_than_the_silence_keeps_everything():
    clip = torch.cat([tone(1.0), noise(0.05, -75)])
    assert torch.equal(trim_clip(clip, margin_ms=500).audio, clip)
