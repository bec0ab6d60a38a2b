"""render_script on the tiny preset: dialogue = clips + pauses, context per line, progress, cancel,
errors that keep finished clips, regenerating one line, the batched fast mode, and line endings
(padded text, extra length, trimmed silence) with an engine that returns a known waveform."""

import itertools
import json

import numpy as np
import pytest
import torch

from csm_multi.codec import MimiCodec, build_mimi
from csm_multi.config import SAMPLES_PER_FRAME
from csm_multi.endings import FILLER, pad_line
from csm_multi.engine import Engine, Utterance
from csm_multi.errors import BusyError, ScriptError
from csm_multi.frames import Segment
from csm_multi.render import FAST, RenderCancelled, RenderConfig, RenderError, ScriptRenderer
from csm_multi.text import ByteTokenizer

SCRIPT = """# a three-speaker scene
Alice: Hi Bob.
Bob: Hello Alice, how are you?
[Carol] I am here too.
Alice: Good to see you both.
"""
VOICES = {"alice": "alice-profile", "Bob": "bob-profile", "carol": None}
CONFIG = RenderConfig(pause_ms=250, seed=100, max_line_ms=400, extra_ms=0)  # extra_ms=0: fewer frames


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model, ByteTokenizer(), MimiCodec(build_mimi(None, seed=0)), watermark=False)


@pytest.fixture(scope="module")
def profiles():
    calls = []

    def segment(name):
        calls.append(name)
        g = torch.Generator().manual_seed(len(name))
        return Segment(speaker=0, text=f"Reference words of {name}.", codes=torch.randint(1, 2048, (32, 4), generator=g))

    segment.calls = calls
    return segment


@pytest.fixture(scope="module")
def rendered(engine, profiles):
    events = []
    result = ScriptRenderer(engine, profiles).render(SCRIPT, VOICES, CONFIG, progress=events.append)
    return result, events


def test_dialogue_length_is_clips_plus_pauses(rendered, tmp_path):
    result, _ = rendered
    assert [c.line.speaker for c in result.clips] == ["Alice", "Bob", "Carol", "Alice"]
    pause = int(24_000 * 0.25)
    assert result.audio.numel() == sum(c.audio.numel() for c in result.clips) + 3 * pause
    for clip, row in zip(result.clips, result.manifest()):  # trimmed or not, codes match the audio
        assert clip.audio.numel() > 0 and clip.codes.shape[1] == -(-clip.audio.numel() // SAMPLES_PER_FRAME)
        assert clip.codes.shape[1] <= clip.generated_frames and row["duration_s"] == round(clip.duration_s, 3)
        assert row["model_text"] == pad_line(row["text"]) and row["generated_s"] == clip.generated_frames * 0.08
    paths = result.save(tmp_path)
    import soundfile as sf

    info = sf.info(str(paths["dialogue"]))
    assert info.samplerate == 24_000 and info.channels == 1 and info.frames == result.audio.numel()
    manifest = json.loads(paths["manifest"].read_text())["lines"]
    assert [m["line"] for m in manifest] == [2, 3, 4, 5]
    assert [m["seed"] for m in manifest] == [100, 101, 102, 103]
    for prev, cur in itertools.pairwise(manifest):
        assert cur["start_s"] == pytest.approx(prev["start_s"] + prev["duration_s"] + 0.25, abs=2e-3)
    assert len(list((tmp_path / "clips").glob("*.wav"))) == 4


def test_each_line_gets_profile_and_history_context(rendered):
    result, _ = rendered
    first, bob, carol, alice2 = result.clips
    assert "profile:alice-profile" in first.context and not any(c.startswith("line") for c in first.context)
    assert "line 2" in bob.context and "profile:bob-profile" in bob.context
    assert not any("carol" in c for c in carol.context)  # Carol has no profile
    assert {"line 2", "line 3", "line 4"} <= set(alice2.context)
    assert all(c.context_positions > 0 for c in result.clips)
    # speakers get dialogue-local ids in order of appearance
    assert [c.speaker_id for c in result.clips] == [0, 1, 2, 0]


def test_progress_per_line_and_per_frame(rendered):
    result, events = rendered
    assert {e.line for e in events} == {0, 1, 2, 3}
    frames_line0 = [e.frame for e in events if e.line == 0]
    assert frames_line0[0] == 0 and frames_line0[-1] == result.clips[0].generated_frames
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] <= 1


def test_progress_names_the_stage_of_each_line(rendered, tiny_model, profiles):
    """Frames are "generating"; after the last one comes "decoding", then "watermarking" when the
    engine marks its output."""
    result, events = rendered
    for i, clip in enumerate(result.clips):
        mine = [(e.stage, e.frame) for e in events if e.line == i]
        assert mine[-1] == ("decoding", clip.generated_frames)
        assert {stage for stage, _ in mine[:-1]} == {"generating"}

    class Marker:
        def apply(self, audio, sample_rate):
            return audio

    marked = Engine(tiny_model, ByteTokenizer(), MimiCodec(build_mimi(None, seed=0)), Marker())
    seen = []
    ScriptRenderer(marked, profiles).render("Alice: Hi.", VOICES, RenderConfig(seed=1, max_line_ms=160, extra_ms=0),
                                            progress=seen.append)
    assert [e.stage for e in seen][-2:] == ["decoding", "watermarking"]
    assert [e.stage for e in seen][:-2] == ["generating"] * (len(seen) - 2)


def test_same_seeds_reproduce_the_render(rendered, engine, profiles):
    again = ScriptRenderer(engine, profiles).render(SCRIPT, VOICES, CONFIG)
    for a, b in zip(rendered[0].clips, again.clips):
        assert torch.equal(a.codes, b.codes)


def test_unknown_speaker_reported_before_generation(engine):
    called = []
    renderer = ScriptRenderer(engine, lambda name: called.append(name))
    with pytest.raises(ScriptError, match="Dave") as e:
        renderer.render("Alice: hi\nDave: who?\nDave: me", {"alice": None})
    assert "3" in str(e.value) and "2" in str(e.value)
    assert called == []


def test_cancel_keeps_finished_lines(engine, profiles):
    stop = {"after": None}

    def progress(p):
        if p.line == 1 and p.frame == 1:
            stop["after"] = True

    with pytest.raises(RenderCancelled) as e:
        ScriptRenderer(engine, profiles).render(SCRIPT, VOICES, CONFIG, progress=progress,
                                                cancel=lambda: bool(stop["after"]))
    assert [c.line.number for c in e.value.partial.clips] == [2]
    assert e.value.line.number == 3


def test_failing_line_reports_its_number_and_keeps_clips(engine, profiles):
    class Flaky:  # the engine, raising `error` on its `at`-th generation
        def __init__(self, inner, at, error):
            self.inner, self.n, self.at, self.error = inner, 0, at, error

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def generate(self, *args, **kwargs):
            self.n += 1
            if self.n == self.at:
                raise self.error
            return self.inner.generate(*args, **kwargs)

    with pytest.raises(RenderError, match=r"line 4 \(Carol\) failed: CUDA error") as e:
        ScriptRenderer(Flaky(engine, 3, RuntimeError("CUDA error: out of memory")), profiles).render(SCRIPT, VOICES,
                                                                                                     CONFIG)
    assert [c.line.number for c in e.value.partial.clips] == [2, 3]

    # a full queue is not a failure of the line: the message says it never started
    full = BusyError("the server is busy: 64 requests are already waiting; try again shortly")
    with pytest.raises(RenderError, match=r"^line 3 \(Bob\) was not started: the server is busy") as e:
        ScriptRenderer(Flaky(engine, 2, full), profiles).render(SCRIPT, VOICES, CONFIG)
    assert [c.line.number for c in e.value.partial.clips] == [2]


def test_rerender_one_line_keeps_the_others(rendered, engine, profiles):
    result, _ = rendered
    new = ScriptRenderer(engine, profiles).rerender_line(result, 1, VOICES, seed=999)
    assert new.clips[1].seed == 999 and not torch.equal(new.clips[1].codes, result.clips[1].codes)
    for i in (0, 2, 3):
        assert new.clips[i] is result.clips[i]
    assert new.audio.numel() == sum(c.audio.numel() for c in new.clips) + 3 * int(24_000 * 0.25)
    drawn = ScriptRenderer(engine, profiles).rerender_line(result, 2, VOICES)
    assert drawn.clips[2].seed != result.clips[2].seed


def test_fast_mode_batches_lines_with_profile_context_only(engine, profiles):
    config = RenderConfig(pause_ms=100, seed=5, max_line_ms=320, mode=FAST, batch_size=3, extra_ms=0)
    events = []
    result = ScriptRenderer(engine, profiles).render(SCRIPT, VOICES, config, progress=events.append)
    assert [c.line.number for c in result.clips] == [2, 3, 4, 5]
    # a batch reports its frames and stages for the lines it covers, and the fraction only grows
    assert [(e.line, e.span) for e in events if e.stage == "decoding"] == [(0, 3), (3, 1)]
    assert max(e.frame for e in events if e.line == 0) == max(c.generated_frames for c in result.clips[:3])
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert not any(ctx.startswith("line") for c in result.clips for ctx in c.context)
    assert result.audio.numel() == sum(c.audio.numel() for c in result.clips) + 3 * 2400
    # the batch agrees with rendering each line alone under greedy sampling
    greedy = RenderConfig(pause_ms=0, seed=1, max_line_ms=240, mode=FAST, batch_size=4, topk=1, extra_ms=0)
    single = RenderConfig(pause_ms=0, seed=1, max_line_ms=240, mode=FAST, batch_size=1, topk=1, extra_ms=0)
    a = ScriptRenderer(engine, profiles).render(SCRIPT, VOICES, greedy)
    b = ScriptRenderer(engine, profiles).render(SCRIPT, VOICES, single)
    assert all(torch.equal(x.codes, y.codes) for x, y in zip(a.clips, b.clips))


def test_fast_mode_can_be_cancelled_during_a_batch(engine, profiles):
    config = RenderConfig(pause_ms=0, seed=5, max_line_ms=320, mode=FAST, batch_size=2, extra_ms=0)
    frames = []
    with pytest.raises(RenderCancelled, match="during line 4") as e:
        ScriptRenderer(engine, profiles, on_frame=lambda: frames.append(1)).render(
            SCRIPT, VOICES, config, cancel=lambda: len(frames) > 4)  # the first batch has at most 4 frames
    assert [c.line.number for c in e.value.partial.clips] == [2, 3]


def test_fast_mode_keeps_seed_per_line_and_a_line_regenerates_from_its_seed(engine, profiles):
    """Line i uses seed + i in batches too; regenerating it alone with its recorded seed gives the same clip."""
    config = RenderConfig(pause_ms=0, seed=7, max_line_ms=320, mode=FAST, batch_size=4, extra_ms=0, trim_silence=False)
    renderer = ScriptRenderer(engine, profiles)
    result = renderer.render(SCRIPT, VOICES, config)
    assert [c.seed for c in result.clips] == [7, 8, 9, 10]
    again = renderer.rerender_line(result, 2, VOICES, seed=result.clips[2].seed)
    assert torch.equal(again.clips[2].codes, result.clips[2].codes)
    other = renderer.rerender_line(result, 2, VOICES, seed=123)
    assert not torch.equal(other.clips[2].codes, result.clips[2].codes)


def test_stems_of_speakers_with_alike_names_get_their_own_files(tmp_path):
    """'A.B' and 'A-B' (and names alike in their first 24 characters) slug alike; no stem overwrites another."""
    import soundfile as sf

    from csm_multi.render import Clip, RenderResult
    from csm_multi.script import ScriptLine

    names = ["A.B", "A-B", "a_b", "x" * 24 + "1", "x" * 24 + "2"]
    clips = [Clip(index=i, line=ScriptLine(i + 1, name, "Hi."), speaker_id=i, profile=None,
                  audio=torch.full((240,), 0.1 * (i + 1)), codes=torch.zeros(32, 1, dtype=torch.long), seed=i,
                  watermarked=False) for i, name in enumerate(names)]
    paths = RenderResult(clips, RenderConfig(pause_ms=0)).save(tmp_path, stems=True)
    stems = sorted((tmp_path / "stems").glob("*.wav"))
    assert len(stems) == len(names) == len({p for k, p in paths.items() if k.startswith("stem:")})
    for i, name in enumerate(names):
        track, _ = sf.read(str(paths[f"stem:{name}"]))
        assert np.allclose(track[240 * i:240 * (i + 1)], 0.1 * (i + 1), atol=1e-4)  # its own line...
        assert np.abs(np.delete(track, np.s_[240 * i:240 * (i + 1)])).max() == 0  # ...and silence elsewhere


def test_file_names_keep_every_letter_of_a_name_vowel_signs_included(tmp_path):
    """Stems, clips and the download's name keep a name's letters in any script: Devanagari writes its
    vowels as combining signs, which `isalnum` drops ("राहुल" became "र_ह_ल" and "र-ह-ल-नमस-त")."""
    from csm_multi.render import Clip, RenderResult
    from csm_multi.script import ScriptLine
    from csm_multi.studio import bundle_name

    clips = [Clip(index=0, line=ScriptLine(1, "राहुल", "नमस्ते दोस्तों"), speaker_id=0, profile=None,
                  audio=torch.full((240,), 0.1), codes=torch.zeros(32, 1, dtype=torch.long), seed=0, watermarked=False)]
    result = RenderResult(clips, RenderConfig(pause_ms=0))
    paths = result.save(tmp_path, stems=True)
    assert paths["stem:राहुल"].name == "राहुल.wav" and paths["clip0"].name == "001-राहुल.wav"
    assert bundle_name(None, result, now=0).startswith("राहुल-नमस्ते-दोस्तों-")
    assert bundle_name("राहुल की परियोजना", result, now=0).startswith("राहुल-की-परियोजना-")
    assert bundle_name("Alice: hi_there, O'Neil!", result, now=0).startswith("alice-hi-there-o-neil-")


def test_mapping_names_match_script_speakers_as_the_check_does(engine, profiles):
    """A mapping key spelled with other spacing or case ('mary  ANN') still gives that speaker its voice."""
    config = RenderConfig(pause_ms=0, seed=1, max_line_ms=160, extra_ms=0)
    result = ScriptRenderer(engine, profiles).render("Mary Ann: Hello.\nBob: Hi.", {"mary  ANN": "alice-profile",
                                                                                     "Bob": None}, config)
    assert result.clips[0].profile == "alice-profile" and "profile:alice-profile" in result.clips[0].context
    assert result.clips[1].profile is None


def test_exports_formats_stems_subtitles(rendered, tmp_path):
    import soundfile as sf

    result, _ = rendered
    paths = result.save(tmp_path, "scene", formats=("wav", "flac", "mp3"), stems=True)
    n = result.audio.numel()
    for fmt in ("wav", "flac"):
        info = sf.info(str(tmp_path / f"scene.{fmt}"))
        assert info.frames == n and info.channels == 1 and info.samplerate == 24_000
    mp3 = sf.info(str(tmp_path / "scene.mp3"))
    assert mp3.channels == 1 and abs(mp3.frames - n) <= 2 * 1152  # MP3 pads by up to a frame or two
    stems = {p.stem: sf.read(str(p))[0] for p in (tmp_path / "stems").glob("*.wav")}
    assert sorted(stems) == ["Alice", "Bob", "Carol"]
    assert all(len(s) == n and s.ndim == 1 for s in stems.values())
    mixed, _ = sf.read(str(tmp_path / "scene.wav"))
    assert np.abs(sum(stems.values()) - mixed).max() < 2e-4  # lines never overlap: stems add up to the mix
    bob_rows = [m for m in result.manifest() if m["speaker"] == "Bob"]
    start = round(bob_rows[0]["start_s"] * 24_000)
    assert np.abs(stems["Alice"][start:start + 1000]).max() == 0  # Alice is silent while Bob speaks
    srt = (tmp_path / "scene.srt").read_text().strip().split("\n\n")
    assert len(srt) == 4 and srt[1].splitlines()[0] == "2"
    m = result.manifest()[1]
    begin, end = srt[1].splitlines()[1].split(" --> ")

    def seconds(stamp):
        h, mi, rest = stamp.split(":")
        s, ms = rest.split(",")
        return int(h) * 3600 + int(mi) * 60 + int(s) + int(ms) / 1000

    assert seconds(begin) == pytest.approx(m["start_s"], abs=1e-3)
    assert seconds(end) == pytest.approx(m["start_s"] + m["duration_s"], abs=1e-3)
    assert srt[1].splitlines()[2] == "Bob: Hello Alice, how are you?"
    csv_rows = (tmp_path / "scene.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 5 and csv_rows[0].startswith("index,line,speaker")
    assert paths["srt"].exists() and paths["stem:Bob"].exists()


# ---- line endings ------------------------------------------------------------------------------
SPOKEN = 14_400  # 0.6 s of tone, then silence up to 15 frames (1.2 s)


class KnownWaveform:
    """The tiny engine, except that every line 'says' a 0.6 s tone followed by 0.6 s of silence
    (15 frames of codes 1..15); records what each call was given."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _utterance(self, sampling) -> Utterance:
        t = torch.arange(15 * SAMPLES_PER_FRAME) / 24_000
        audio = torch.where(t < SPOKEN / 24_000, 0.5 * torch.sin(2 * torch.pi * 220 * t), torch.zeros(()))
        return Utterance(audio=audio, codes=torch.arange(1, 16).repeat(32, 1), seed=sampling.seed or 0,
                         watermarked=False, prompt_positions=0)

    def generate(self, text, speaker, context, sampling, on_frame=None, on_stage=None):
        self.calls.append((text, [(s.text, s.codes.shape[1]) for s in context], sampling.max_frames))
        return self._utterance(sampling)

    def generate_batch(self, requests, sampling, seeds, on_frame=None, on_stage=None):
        for text, _, context in requests:
            self.calls.append((text, [(s.text, s.codes.shape[1]) for s in context], sampling.max_frames))
        return [self._utterance(sampling.with_(seed=seed)) for seed in seeds]


ENDINGS = RenderConfig(pause_ms=0, seed=1, max_line_ms=400)  # defaults: padding, +800 ms, trimming


def test_lines_are_padded_given_extra_length_and_trimmed(engine, profiles):
    fake = KnownWaveform(engine)
    result = ScriptRenderer(fake, profiles).render(SCRIPT, VOICES, ENDINGS)
    kept = SPOKEN + 24_000 * 120 // 1000  # speech + the 120 ms margin: 17280 samples = 9 frames
    assert [c.audio.numel() for c in result.clips] == [kept] * 4
    assert all(c.codes.shape == (32, 9) and torch.equal(c.codes[0], torch.arange(1, 10)) for c in result.clips)
    assert all(c.audio[-1] == 0 and torch.equal(c.audio[:SPOKEN], fake._utterance(CONFIG.sampling(0)).audio[:SPOKEN])
               for c in result.clips)
    texts = [call[0] for call in fake.calls]
    assert texts == ["Hi Bob." + FILLER, "Hello Alice, how are you?" + FILLER, "I am here too." + FILLER,
                     "Good to see you both." + FILLER]
    assert {call[2] for call in fake.calls} == {(400 + 800) // 80}
    # later lines hear the trimmed codes, with the punctuated text and no filler
    assert ("Hi Bob.", 9) in fake.calls[1][1]
    row = result.manifest()[0]
    assert (row["text"], row["model_text"]) == ("Hi Bob.", "Hi Bob." + FILLER)
    assert (row["duration_s"], row["generated_s"]) == (0.72, 1.2)


def test_endings_can_be_switched_off(engine, profiles):
    fake = KnownWaveform(engine)
    plain = RenderConfig(pause_ms=0, seed=1, max_line_ms=400, end_padding=False, extra_ms=0, trim_silence=False)
    result = ScriptRenderer(fake, profiles).render("A: Hi Bob\nB: Yes", {"a": None, "b": None}, plain)
    assert [call[0] for call in fake.calls] == ["Hi Bob", "Yes"] and fake.calls[0][2] == 400 // 80
    assert [c.audio.numel() for c in result.clips] == [15 * SAMPLES_PER_FRAME] * 2
    assert ("Hi Bob", 15) in fake.calls[1][1]


def test_fast_mode_and_rerender_trim_too(engine, profiles):
    fake = KnownWaveform(engine)
    fast = ScriptRenderer(fake, profiles).render(SCRIPT, VOICES, RenderConfig(pause_ms=0, seed=1, max_line_ms=400,
                                                                             mode=FAST, batch_size=3))
    assert all(c.codes.shape[1] == 9 and c.generated_frames == 15 for c in fast.clips)
    assert fake.calls[0][0] == "Hi Bob." + FILLER
    again = ScriptRenderer(fake, profiles).rerender_line(fast, 1, VOICES, seed=7)
    assert again.clips[1].audio.numel() == SPOKEN + 2880 and again.clips[1].seed == 7


def test_render_config_checks_its_ending_settings():
    assert RenderConfig(max_line_ms=1000, extra_ms=600).sampling(0).max_audio_length_ms == 1600
    with pytest.raises(ValueError, match="extra_ms"):
        RenderConfig(extra_ms=-1)
    with pytest.raises(ValueError, match="margin_ms"):
        RenderConfig(margin_ms=5000)


def test_render_config_leaves_room_for_a_seed_per_line():
    from csm_multi.config import MAX_SEED
    from csm_multi.render import MAX_LINES

    assert RenderConfig(seed=MAX_SEED - MAX_LINES).sampling(MAX_LINES - 1).seed == MAX_SEED - 1
    for bad in (-1, MAX_SEED, 2**64):
        with pytest.raises(ValueError, match="seed must be a whole number"):
            RenderConfig(seed=bad)
    for bad in (0, 79, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max length per line"):
            RenderConfig(max_line_ms=bad)


# ---- pauses ------------------------------------------------------------------------------------
def hand_made(pauses, config=None):
    """A result of clips 0.1 s long, of value 0.1 * (i + 1), by speakers A, B, A, B..., with these pauses."""
    from csm_multi.render import Clip, RenderResult
    from csm_multi.script import ScriptLine

    clips = [Clip(index=i, line=ScriptLine(i + 1, "AB"[i % 2], f"Line {i}.", pause), speaker_id=i % 2, profile=None,
                  audio=torch.full((2400,), 0.1 * (i + 1)), codes=torch.zeros(32, 2, dtype=torch.long), seed=i,
                  watermarked=False) for i, pause in enumerate(pauses)]
    return RenderResult(clips, config or RenderConfig(pause_ms=100))


def test_each_line_keeps_its_own_pause_in_audio_manifest_subtitles_and_stems():
    result = hand_made([None, 500, None, 0])  # the first line defaults to 0, the third to pause_ms
    starts = [0, 2400 + 12_000, 2400 + 12_000 + 2400 + 2400, 2400 + 12_000 + 2400 + 2400 + 2400]
    audio = result.audio
    assert audio.numel() == starts[-1] + 2400
    for i, at in enumerate(starts):
        assert torch.allclose(audio[at:at + 2400], torch.tensor(0.1 * (i + 1)))
    assert float(audio[2400:starts[1]].abs().max()) == 0 and float(audio[starts[1] + 2400:starts[2]].abs().max()) == 0
    rows = result.manifest()
    assert [r["pause_before_s"] for r in rows] == [0.0, 0.5, 0.1, 0.0]
    assert [r["start_s"] for r in rows] == [at / 24_000 for at in starts]
    assert result.srt().split("\n\n")[1].splitlines()[1] == "00:00:00,600 --> 00:00:00,700"
    stems = result.stems()
    assert all(s.numel() == audio.numel() for s in stems.values())
    assert torch.allclose(stems["A"] + stems["B"], audio) and float(stems["A"][starts[1]:starts[1] + 2400].abs().max()) == 0
    lead = hand_made([1000, None]).audio  # a pause before the first line is silence at the start
    assert lead.numel() == 24_000 + 2400 + 2400 + 2400 and float(lead[:24_000].abs().max()) == 0


def test_a_lines_pause_can_be_changed_without_regenerating():
    result = hand_made([None, None, None])
    longer = result.with_pause(1, 2000)
    assert [r["pause_before_s"] for r in longer.manifest()] == [0.0, 2.0, 0.1]
    assert longer.manifest()[2]["start_s"] - result.manifest()[2]["start_s"] == pytest.approx(1.9)
    assert longer.clips[1].codes is result.clips[1].codes and longer.clips[1].line.pause_before_ms == 2000
    assert result.clips[1].line.pause_before_ms is None  # the original is untouched
    assert longer.with_pause(1, None).audio.numel() == result.audio.numel()  # None: back to the default
    assert longer.with_pause(0, 0).audio.numel() == longer.audio.numel()  # an explicit 0 is kept as 0
    for bad in (-1, 10_001, 1.5, True):
        with pytest.raises(ValueError, match="a pause must be"):
            result.with_pause(1, bad)


def test_pause_tags_shape_the_dialogue_and_never_reach_the_model(engine, profiles):
    fake = KnownWaveform(engine)
    script = "Alice: Hi Bob. [pause 1s] Are you there?\n[pause 250ms]\nBob: Yes. [pause 2s]\n[Carol] Me too."
    result = ScriptRenderer(fake, profiles).render(script, VOICES, RenderConfig(pause_ms=300, seed=1, max_line_ms=400))
    assert [call[0] for call in fake.calls] == [t + FILLER for t in ("Hi Bob.", "Are you there?", "Yes.", "Me too.")]
    assert [(c.line.number, c.line.speaker) for c in result.clips] == [(1, "Alice"), (1, "Alice"), (3, "Bob"),
                                                                       (4, "Carol")]
    assert [m["pause_before_s"] for m in result.manifest()] == [0.0, 1.0, 0.25, 2.0]
    assert result.audio.numel() == sum(c.audio.numel() for c in result.clips) + int(3.25 * 24_000)
    assert ("Hi Bob.", 9) in fake.calls[1][1]  # the second half hears the first as context
    assert result.clips[1].context[-1] == "line 1" and {"line 1", "line 1 part 2"} <= set(result.clips[2].context)
    assert result.affected_by(0) == [1, 2, 3] and result.affected_by(1) == [2, 3]
    assert result.manifest()[1]["seed"] == 2  # a split line's halves are lines of their own: seed + index


def test_each_line_says_how_its_context_window_was_spent(rendered):
    """voices + earlier lines = the context positions kept; the new text and the room to speak are
    what the line reserved (tests/test_views.py draws it; projects keep it)."""
    result, _ = rendered
    rows = result.manifest()
    for row in rows:
        split = row["context_split"]
        assert split["voices"] + split["lines"] == row["context_positions"]
        assert split["speak"] == CONFIG.sampling(0).max_frames and split["text"] > len(row["text"])
    assert rows[0]["context_split"]["lines"] == 0 and rows[0]["context_split"]["voices"] > 0  # Alice's voice only
    assert rows[2]["context_split"]["lines"] > 0  # Carol heard the lines before hers
