"""Takes: scoring candidates (WER, cut-off endings, silent tails), several takes per line as one batch
with seeds that never collide, choosing and adding takes, re-rendering a line with new text and the
lines that then go stale. A fake engine makes each take's sound known; one test runs the tiny model."""

import pytest
import torch

from csm_multi.codec import MimiCodec, build_mimi
from csm_multi.config import MAX_SEED, SAMPLES_PER_FRAME
from csm_multi.engine import Engine, Utterance
from csm_multi.errors import ScriptError, TranscriptionError
from csm_multi.frames import Segment
from csm_multi.render import FAST, MAX_LINES, RenderConfig, ScriptRenderer, take_seed
from csm_multi.takes import MAX_CANDIDATES, TakeScore, best, ending_score, normalise, word_error_rate
from csm_multi.text import ByteTokenizer

SCRIPT = "Alice: Hi Bob.\nBob: Hello Alice, how are you?\n[Carol] I am here too.\n"
VOICES = {"alice": "alice-profile", "Bob": "bob-profile", "carol": None}
CONFIG = RenderConfig(pause_ms=100, seed=40, max_line_ms=1200, extra_ms=0, takes=3)  # 15 frames at most
SR = 24_000
SPOKEN = {0: 14_400, 1: 9_600, 2: 14_400, 3: 0}  # samples of tone per take of the fake engine


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model, ByteTokenizer(), MimiCodec(build_mimi(None, seed=0)), watermark=False)


def profiles(name):
    g = torch.Generator().manual_seed(len(name))
    return Segment(speaker=0, text=f"Reference words of {name}.", codes=torch.randint(1, 2048, (32, 4), generator=g))


class Takes:
    """The tiny engine's tokenizer and context sizes, but what a candidate 'says' depends on its take
    (seed // MAX_LINES, see `take_seed`): take 0 runs to the maximum length (cut off) after 0.6 s of
    tone; take 1 ends after 0.4 s of tone, take 2 after 0.6 s, both within 10 frames; take 3 is
    silent. The tone's amplitude (0.1 * (take + 1)) tells the fake transcriber which take it hears."""

    def __init__(self, inner):
        self.inner, self.calls, self.last_text = inner, [], ""

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _utterance(self, seed, max_frames) -> Utterance:
        take = (seed or 0) // MAX_LINES % 4
        frames = max_frames if take == 0 else 10
        t = torch.arange(frames * SAMPLES_PER_FRAME) / SR
        tone = 0.1 * (take + 1) * torch.sin(2 * torch.pi * 220 * t)
        audio = torch.where(torch.arange(t.numel()) < SPOKEN[take], tone, torch.zeros(()))
        return Utterance(audio=audio, codes=torch.full((32, frames), take + 1), seed=seed or 0, watermarked=False,
                         prompt_positions=0)

    def generate(self, text, speaker, context, sampling, on_frame=None, on_stage=None):
        self.calls.append(("one", [text], [sampling.seed], [(s.text, s.codes.shape[1]) for s in context]))
        self.last_text = text
        return self._utterance(sampling.seed, sampling.max_frames)

    def generate_batch(self, requests, sampling, seeds, on_frame=None, on_stage=None):
        self.calls.append(("batch", [r[0] for r in requests], list(seeds),
                           [[(s.text, s.codes.shape[1]) for s in r[2]] for r in requests]))
        self.last_text = requests[-1][0]
        return [self._utterance(seed, sampling.max_frames) for seed in seeds]


def transcriber_for(fake, heard=None):
    """Hears take 0 and take 2 say the line right, take 1 get it wrong; records what it was given."""
    heard = [] if heard is None else heard

    def transcribe(audio):
        take = round(float(audio.abs().max()) * 10) - 1
        heard.append(take)
        return fake.last_text.upper() if take in (0, 2) else "something else entirely"

    transcribe.heard = heard
    return transcribe


# ---- scores --------------------------------------------------------------------------------------
def test_normalised_word_error_rate():
    assert normalise("Hello, World!  It's me…") == "hello world it s me"
    assert word_error_rate("Hello, world!", "hello world") == 0.0
    assert word_error_rate("Hello there, Bob!", "hello bear") == pytest.approx(2 / 3, abs=1e-4)
    assert word_error_rate("Hi Bob.", "") == 1.0
    assert word_error_rate("...", "anything") is None  # nothing to compare against


def test_ending_score_sees_cut_off_tail_and_silence():
    t = torch.arange(10 * SAMPLES_PER_FRAME) / SR
    tone = 0.5 * torch.sin(2 * torch.pi * 220 * t)
    audio = torch.where(t < 0.5, tone, torch.zeros(()))  # 0.5 s of speech, 0.3 s of silence
    clean = ending_score(audio, frames=10, max_frames=15)
    assert (clean.cut_off, clean.silent, clean.wer) == (False, False, None) and clean.tail_s == pytest.approx(0.3, abs=0.011)
    assert ending_score(audio, frames=15, max_frames=15).cut_off
    silent = ending_score(torch.zeros(4800), frames=3, max_frames=15)
    assert silent.silent and silent.tail_s == 0.2
    assert clean.score == 0.0 and silent.score >= 1.0


def test_the_lowest_score_wins_and_ties_go_to_the_first():
    good, cut, wrong = TakeScore(0.1, False, 0.3), TakeScore(0.0, True, 0.3), TakeScore(0.5, False, 0.3)
    assert best([cut, wrong, good]) == 2
    assert best([TakeScore(None, False, 0.2), TakeScore(None, False, 0.2)]) == 0
    assert best([None, TakeScore(None, True, 0.0)]) == 1  # unscored ranks last
    assert TakeScore(0.0, False, 3.0).score == pytest.approx(0.2)  # a long silent tail costs a little
    with pytest.raises(ValueError):
        best([])


def test_take_count_is_checked_and_seeds_never_collide():
    for bad in (0, 5, True, 1.5):
        with pytest.raises(ValueError, match="takes must be"):
            RenderConfig(takes=bad)
    assert RenderConfig(seed=7, takes=3).take_seeds(2) == [9, 7 + MAX_LINES + 2, 7 + 2 * MAX_LINES + 2]
    assert RenderConfig(takes=2).take_seeds(5) == [None, None]
    for seed in (0, MAX_SEED - MAX_LINES):  # near the top, takes wrap around but stay distinct and in range
        seeds = {take_seed(seed, i, t) for i in range(0, MAX_LINES, 997) for t in range(4)}
        assert len(seeds) == 4 * len(range(0, MAX_LINES, 997)) and all(0 <= s <= MAX_SEED for s in seeds)
    assert take_seed(seed, 3, 0) == seed + 3  # take 0 is the seed a single take has


# ---- rendering with takes ------------------------------------------------------------------------
def test_each_line_takes_are_one_batch_and_the_best_ending_is_chosen(engine):
    fake = Takes(engine)
    result = ScriptRenderer(fake, profiles).render(SCRIPT, VOICES, CONFIG)
    assert [kind for kind, *_ in fake.calls] == ["batch"] * 3
    for i, (_, texts, seeds, contexts) in enumerate(fake.calls):
        assert seeds == [take_seed(40, i, t) for t in range(3)] and len(set(texts)) == 1
        assert all(c == contexts[0] for c in contexts)  # every take hears the same context
    for i, clip in enumerate(result.clips):
        candidates = result.candidates(i)
        assert [c.take for c in candidates] == [0, 1, 2] and candidates[clip.take] is clip
        assert [c.score.cut_off for c in candidates] == [True, False, False]
        assert clip.take == 1 and clip.score.wer is None  # no transcriber: ties on the ending go to the first
    # later lines hear the chosen take: 0.4 s + the 120 ms margin = 7 frames
    assert ("Hi Bob.", 7) in fake.calls[1][3][0]
    row = result.manifest()[0]
    assert (row["take"], row["takes"], row["seed"]) == (1, 3, take_seed(40, 0, 1))
    assert [s["seed"] for s in row["scores"]] == [take_seed(40, 0, t) for t in range(3)]
    assert [s["cut_off"] for s in row["scores"]] == [True, False, False] and row["scores"][0]["score"] >= 1


def test_a_transcriber_ranks_takes_by_word_error_rate(engine):
    fake = Takes(engine)
    transcribe = transcriber_for(fake)
    config = RenderConfig(pause_ms=100, seed=40, max_line_ms=1200, extra_ms=0, takes=4)
    result = ScriptRenderer(fake, profiles, transcriber=transcribe).render(SCRIPT, VOICES, config)
    assert transcribe.heard == [0, 1, 2] * 3  # the silent take is not sent to the transcriber
    for i, clip in enumerate(result.clips):
        scores = [c.score for c in result.candidates(i)]
        assert [s.wer for s in scores[::2]] == [0.0, 0.0] and scores[1].wer > 0.5 and scores[3].wer == 1.0
        assert clip.take == 2  # words right and ended cleanly; take 0 said it right but was cut off
    events = []
    ScriptRenderer(fake, profiles, transcriber=transcribe).render("A: Hi.", {"a": None}, config,
                                                                  progress=events.append)
    assert "transcribing" in [e.stage for e in events]


def test_a_transcriber_that_hears_nothing_counts_every_word_wrong(engine):
    fake = Takes(engine)

    def deaf(audio):
        raise TranscriptionError("heard no words")

    result = ScriptRenderer(fake, profiles, transcriber=deaf).render("A: Hi there.", {"a": None}, CONFIG)
    assert [c.score.wer for c in result.candidates(0)] == [1.0, 1.0, 1.0] and result.clips[0].take == 1


def test_one_take_is_one_generate_call_and_scores_nothing_by_transcript(engine):
    fake = Takes(engine)
    transcribe = transcriber_for(fake)
    config = RenderConfig(pause_ms=100, seed=40, max_line_ms=1200, extra_ms=0)
    result = ScriptRenderer(fake, profiles, transcriber=transcribe).render(SCRIPT, VOICES, config)
    assert [kind for kind, *_ in fake.calls] == ["one"] * 3 and [c[2] for c in fake.calls] == [[40], [41], [42]]
    assert result.takes == {} and transcribe.heard == [] and all(c.score.wer is None for c in result.clips)
    assert [m["takes"] for m in result.manifest()] == [1, 1, 1]


def test_choosing_a_take_switches_the_clip_and_marks_the_lines_that_heard_it(engine):
    result = ScriptRenderer(Takes(engine), profiles).render(SCRIPT, VOICES, CONFIG)
    chosen = result.choose_take(0, 2)
    assert chosen.clips[0] is result.takes[0][2] and all(a is b for a, b in zip(chosen.clips[1:], result.clips[1:]))
    assert result.clips[0].take == 1 and result.stale == ()  # the original is untouched
    assert chosen.stale == (1, 2)  # both later lines heard line 1 as context
    assert chosen.audio.numel() - result.audio.numel() == chosen.clips[0].audio.numel() - result.clips[0].audio.numel()
    assert chosen.manifest()[0]["take"] == 2 and chosen.manifest()[0]["seed"] == take_seed(40, 0, 2)
    assert chosen.choose_take(0, 2).stale == (1, 2)
    for bad in (3, -1, True):
        with pytest.raises(ValueError, match="takes 0 to 2"):
            result.choose_take(0, bad)
    paused = result.with_pause(1, 1200).choose_take(1, 0)  # a pause set on a line stays whichever take is chosen
    assert paused.clips[1].take == 0 and paused.manifest()[1]["pause_before_s"] == 1.2
    fast = ScriptRenderer(Takes(engine), profiles).render(SCRIPT, VOICES, RenderConfig(**{**vars(CONFIG), "mode": FAST}))
    assert fast.choose_take(0, 0).stale == ()  # fast mode: no line hears another


def test_new_takes_are_one_batch_added_to_the_line_and_the_best_is_chosen(engine):
    fake = Takes(engine)
    transcribe = transcriber_for(fake)
    renderer = ScriptRenderer(fake, profiles, transcriber=transcribe)
    one = RenderConfig(pause_ms=100, seed=40, max_line_ms=1200, extra_ms=0)
    result = renderer.render(SCRIPT, VOICES, one)  # take 0 of every line is cut off
    fake.calls.clear()
    seeds = [1 * MAX_LINES + 5, 3 * MAX_LINES + 5]  # takes that sound like 1 (wrong words) and 3 (silent)
    more = renderer.new_takes(result, 1, VOICES, 2, seeds=seeds)
    [(kind, texts, got, contexts)] = fake.calls
    assert kind == "batch" and got == seeds and len(texts) == 2
    assert ("Hi Bob.", 9) in contexts[0]  # the line's own context: the clips before it
    assert [c.take for c in more.candidates(1)] == [0, 1, 2] and more.candidates(1)[0].seed == 41
    assert transcribe.heard == [0, 1]  # the first take is measured now too; the silent one is not sent
    # right words but cut off (1 + 0) ties with all words wrong (1.0 + 0): the first stays chosen, nothing is stale
    assert [c.score.score for c in more.candidates(1)] == [1.0, 1.0, 2.0]
    assert more.clips[1].take == 0 and more.stale == ()
    assert result.takes == {} and result.clips[1].take == 0  # the original is untouched
    better = renderer.new_takes(more, 1, VOICES, 1, seeds=[2 * MAX_LINES + 5])  # a take that says it right
    assert better.clips[1].take == 3 and better.clips[1].score.score == 0.0 and better.stale == (2,)
    with pytest.raises(ValueError, match="from 1 to 4"):
        renderer.new_takes(result, 1, VOICES, 0)
    with pytest.raises(ValueError, match="2 seeds for 3 takes"):
        renderer.new_takes(result, 1, VOICES, 3, seeds=[1, 2])
    full = result
    for _ in range((MAX_CANDIDATES - 1) // 4):
        full = renderer.new_takes(full, 0, VOICES, 4, seeds=[7] * 4)
    with pytest.raises(ValueError, match=f"keeps at most {MAX_CANDIDATES}"):
        renderer.new_takes(full, 0, VOICES, 4)


def test_fast_mode_batches_every_take_of_a_line_together(engine):
    for batch_size, takes, rows in [(4, 2, [4, 2]), (3, 2, [2, 2, 2]), (1, 4, [4, 4, 4]), (4, 1, [3])]:
        fake = Takes(engine)
        config = RenderConfig(pause_ms=0, seed=3, max_line_ms=1200, extra_ms=0, mode=FAST, batch_size=batch_size,
                              takes=takes)
        result = ScriptRenderer(fake, profiles).render(SCRIPT, VOICES, config)
        assert [len(texts) for _, texts, _, _ in fake.calls] == rows, (batch_size, takes)
        seeds = [s for _, _, got, _ in fake.calls for s in got]
        assert seeds == [take_seed(3, i, t) for i in range(3) for t in range(takes)]
        texts = [t for _, got, _, _ in fake.calls for t in got]
        assert texts == [t for t in texts[::takes] for _ in range(takes)]  # a line's takes side by side
        assert [c.take for c in result.clips] == [0 if takes == 1 else 1] * 3
        assert all(len(result.candidates(i)) == takes for i in range(3))


def test_rerender_with_new_text_keeps_speaker_and_pause_and_names_the_stale_lines(engine):
    fake = Takes(engine)
    renderer = ScriptRenderer(fake, profiles)
    one = RenderConfig(pause_ms=100, seed=40, max_line_ms=1200, extra_ms=0)
    result = renderer.render("Alice: Hi Bob.\n[pause 2s]\nBob: Hello.\nCarol: Me too.", VOICES, one)
    fake.calls.clear()
    new = renderer.rerender_line(result, 1, VOICES, seed=9, text="  Goodbye, Alice  ")
    assert fake.calls[0][1] == ["Goodbye, Alice. ..."] and fake.calls[0][2] == [9]
    line = new.clips[1].line
    assert (line.speaker, line.text, line.number, line.pause_before_ms) == ("Bob", "Goodbye, Alice", 3, 2000)
    assert new.manifest()[1]["text"] == "Goodbye, Alice" and new.stale == (2,)
    again = renderer.rerender_line(new, 2, VOICES, seed=new.clips[2].seed)  # Carol now hears the new line
    assert ("Goodbye, Alice.", 9) in fake.calls[-1][3] and again.stale == ()
    with pytest.raises(ScriptError, match="empty"):
        renderer.rerender_line(result, 1, VOICES, text="   ")
    several = renderer.rerender_line(result, 0, VOICES, seed=9, text="Hi.")
    assert several.stale == (1, 2)
    takes = RenderConfig(**{**vars(one), "takes": 2})
    redo = renderer.rerender_line(renderer.render(SCRIPT, VOICES, takes), 0, VOICES, seed=9)
    assert fake.calls[-1][0] == "batch" and fake.calls[-1][2] == [9, 9 + MAX_LINES]
    assert [c.seed for c in redo.candidates(0)] == [9, 9 + MAX_LINES]
    fast = renderer.render(SCRIPT, VOICES, RenderConfig(**{**vars(one), "mode": FAST}))
    assert renderer.rerender_line(fast, 0, VOICES, text="New.").stale == ()


def test_the_first_take_draws_what_a_single_take_draws(engine):
    """Exactness: take 0 of a batch of takes has the codes of the render without takes (tiny preset)."""
    single = RenderConfig(pause_ms=0, seed=21, max_line_ms=160, extra_ms=0, trim_silence=False)
    renderer = ScriptRenderer(engine, profiles)
    a = renderer.render("Alice: Hi.", VOICES, single)
    b = renderer.render("Alice: Hi.", VOICES, RenderConfig(**{**vars(single), "takes": 2}))
    assert [c.seed for c in b.candidates(0)] == [21, 21 + MAX_LINES]
    assert torch.equal(b.candidates(0)[0].codes, a.clips[0].codes)
    context = [profiles("alice-profile")]
    alone = engine.generate(single.model_text("Hi."), 0, context, single.sampling(0))
    assert torch.equal(alone.codes, a.clips[0].codes)
