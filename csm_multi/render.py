"""Render a multi-speaker script: lines + voice profiles -> one dialogue, per-line clips, manifest.

Each line is generated with context chosen by `ContextBudget`: the speaker's profile prompt, the
most recent lines, other speakers' prompts. With `takes` > 1 each line gets several candidates from
one batch, scored by `takes.py`; the best is chosen and the others kept to switch to. Each line is
preceded by its own pause (its script tag) or the default. Progress (with the stage: generating,
decoding, watermarking, transcribing) goes out through a callback, cancellation comes in through
one; this module never imports a UI. Waveforms: (S,) float32 at 24 kHz.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .audio import save_audio
from .config import FRAME_MS, MAX_SEED, SAMPLE_RATE, SamplingConfig, check_seed
from .context import LINE, PROFILE, ContextBudget, ContextItem
from .endings import end_sentence, pad_line, trim_clip
from .engine import GENERATING, Engine, Utterance
from .errors import BusyError, CsmError
from .frames import Segment, format_text
from .script import MAX_PAUSE_MS, ScriptLine, check_speakers, clean_line_text, parse_script, speaker_key, speakers
from .takes import MAX_CANDIDATES, MAX_TAKES, TakeScore, Transcribe, best, ending_score, measure

CONVERSATIONAL = "conversational"
FAST = "fast"
MAX_LINES = 1_000_000  # room kept above a script's seed for seed + i
TRANSCRIBING = "transcribing"  # the stage after the engine's: candidates heard by the transcriber


def take_seed(seed: int | None, index: int, take: int) -> int | None:
    """Line `index`'s seed for take `take` of a render seeded with `seed` (None: random).

    Take 0 is seed + index, as with one take; take t > 0 is seed + t * MAX_LINES + index, modulo
    2**63, so no take of any line repeats another line's or take's seed.
    """
    if seed is None:
        return None
    return seed + index if take == 0 else (seed + take * MAX_LINES + index) % (MAX_SEED + 1)


@dataclass(frozen=True)
class RenderConfig:
    """How a script is rendered. `seed` fixes line i's seed to seed + i (None: random per line).

    `pause_ms` is the silence between lines whose script sets none (see `pause_before_ms`).
    `takes` candidates are generated per line as one batch (see `take_seed`) and the best is
    chosen; in fast mode a batch holds at most max(batch_size, takes) rows, every take of a line in
    the same batch (so batch_size // takes lines, at least one).

    Line endings (see `endings.py`): `end_padding` sends each line as `pad_line(text)` (a full stop
    and a short pause, so the last word is finished); every line may run `extra_ms` beyond
    `max_line_ms` so the cap does not cut that tail; `trim_silence` then cuts each clip
    `margin_ms` after its last speech (and, with `trim_leading`, before its first), codes included.
    """

    pause_ms: int = 300
    temperature: float = 0.9
    topk: int = 50
    seed: int | None = None
    max_line_ms: float = 10_000
    mode: str = CONVERSATIONAL  # "fast": context = profiles only, lines generated in batches
    batch_size: int = 4
    end_padding: bool = True
    extra_ms: float = 800
    trim_silence: bool = True
    trim_leading: bool = False
    margin_ms: int = 120
    takes: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.pause_ms <= MAX_PAUSE_MS:
            raise ValueError(f"pause_ms must be between 0 and {MAX_PAUSE_MS}")
        if isinstance(self.takes, bool) or not isinstance(self.takes, int) or not 1 <= self.takes <= MAX_TAKES:
            raise ValueError(f"takes must be a whole number from 1 to {MAX_TAKES}, got {self.takes!r}")
        if self.mode not in (CONVERSATIONAL, FAST):
            raise ValueError(f"mode must be {CONVERSATIONAL!r} or {FAST!r}, got {self.mode!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not FRAME_MS <= self.max_line_ms <= 600_000:
            raise ValueError(f"max length per line must be from {FRAME_MS} ms to 10 minutes, got {self.max_line_ms:g} ms")
        check_seed(self.seed, room=MAX_LINES)  # line i uses seed + i
        if not 0 <= self.extra_ms <= 5_000:
            raise ValueError("extra_ms must be between 0 and 5000")
        if not 0 <= self.margin_ms <= 2_000:
            raise ValueError("margin_ms must be between 0 and 2000")

    def sampling(self, index: int, seed: int | None = None) -> SamplingConfig:
        if seed is None and self.seed is not None:
            seed = self.seed + index
        return SamplingConfig(temperature=self.temperature, topk=self.topk, seed=seed,
                              max_audio_length_ms=self.max_line_ms + self.extra_ms)

    def take_seeds(self, index: int) -> list[int | None]:
        """The seed of each take of line `index` (all None, i.e. random, when `seed` is None)."""
        return [take_seed(self.seed, index, t) for t in range(self.takes)]

    def pause_before_ms(self, line: ScriptLine, index: int) -> int:
        """Silence before the line at `index`: its own (script tag or override), else 0 for the first
        line and `pause_ms` for the others."""
        if line.pause_before_ms is not None:
            return line.pause_before_ms
        return 0 if index == 0 else self.pause_ms

    def model_text(self, text: str) -> str:
        """What the model is asked to say for a line of the script."""
        return pad_line(text) if self.end_padding else text

    def context_text(self, text: str) -> str:
        """The transcript paired with a finished clip when later lines hear it (the filler is trimmed)."""
        return end_sentence(text) if self.end_padding else text


@dataclass(frozen=True)
class Progress:
    """One progress event: line `line` of `lines` (0-based), `frame` frames into it, at `stage`
    ("generating", "decoding", "watermarking", "transcribing"). A fast-mode batch covers `span`
    lines from `line` on."""

    line: int
    lines: int
    frame: int
    max_frames: int
    speaker: str
    text: str
    stage: str = GENERATING
    span: int = 1

    @property
    def fraction(self) -> float:
        done = self.span * min(self.frame, self.max_frames) / self.max_frames
        return min(1.0, (self.line + done) / self.lines)


@dataclass
class Clip:
    """One rendered line (or one candidate take of it): `audio` (S,) as trimmed, `codes` (K, T) with
    T = ceil(S / 1920), the text sent to the model, the frames generated before trimming, its place
    among its line's candidates (`take`) and how it scored (None: not known, e.g. opened from an
    older project)."""

    index: int
    line: ScriptLine
    speaker_id: int
    profile: str | None
    audio: torch.Tensor
    codes: torch.Tensor
    seed: int
    watermarked: bool
    context: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    context_positions: int = 0
    model_text: str = ""
    generated_frames: int = 0
    take: int = 0
    score: TakeScore | None = None
    # how the 2048-position window was spent: voice prompts, earlier lines (their sum is
    # `context_positions`), the new line's text, room to speak; empty when not known (older projects)
    context_split: dict[str, int] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return self.audio.numel() / SAMPLE_RATE


@dataclass
class RenderResult:
    """A rendering: the chosen clip of each line, in order, and the candidates of lines with several.

    `takes` maps a clip index to its candidates (`clips[i]` among them, at `clips[i].take`); lines
    with a single take are absent. `stale` lists the lines (conversational mode) that heard, as
    context, a line that has changed since: re-render them to make them follow it.
    """

    clips: list[Clip]
    config: RenderConfig
    sample_rate: int = SAMPLE_RATE
    voice_audio: dict[str, str] = field(default_factory=dict)  # profile name -> its audio's SHA-256 when rendered
    takes: dict[int, list[Clip]] = field(default_factory=dict)
    stale: tuple[int, ...] = ()

    def candidates(self, index: int) -> list[Clip]:
        """Every take of line `index` (just the chosen clip when it has one)."""
        return self.takes.get(index) or [self.clips[index]]

    def pause_before_ms(self, index: int) -> int:
        """Silence before clip `index` in the dialogue (see `RenderConfig.pause_before_ms`)."""
        return self.config.pause_before_ms(self.clips[index].line, index)

    def _layout(self) -> tuple[list[int], int]:
        """Each clip's first sample in the dialogue, and the dialogue's length in samples."""
        starts, at = [], 0
        for i, clip in enumerate(self.clips):
            at += self.sample_rate * self.pause_before_ms(i) // 1000
            starts.append(at)
            at += clip.audio.numel()
        return starts, at

    @property
    def audio(self) -> torch.Tensor:
        """The dialogue: each clip after its pause (`pause_before_ms`) of silence."""
        starts, length = self._layout()
        out = torch.zeros(length)
        for clip, at in zip(self.clips, starts):
            out[at:at + clip.audio.numel()] = clip.audio
        return out

    def manifest(self) -> list[dict]:
        rows = []
        starts, _ = self._layout()
        for i, (clip, at) in enumerate(zip(self.clips, starts)):
            rows.append({"index": clip.index, "line": clip.line.number, "speaker": clip.line.speaker,
                         "profile": clip.profile, "text": clip.line.text, "start_s": round(at / self.sample_rate, 3),
                         "duration_s": round(clip.duration_s, 3), "seed": clip.seed,
                         "watermarked": clip.watermarked, "context": clip.context, "dropped": clip.dropped,
                         "context_positions": clip.context_positions, "context_split": dict(clip.context_split),
                         "speaker_id": clip.speaker_id,
                         "model_text": clip.model_text,
                         "generated_s": round(clip.generated_frames * FRAME_MS / 1000, 3),
                         "pause_before_s": round(self.pause_before_ms(i) / 1000, 3),
                         "take": clip.take, "takes": len(self.candidates(i)),
                         "scores": [c.score and {"take": c.take, "seed": c.seed, **c.score.as_dict()}
                                    for c in self.candidates(i)]})
        return rows

    def with_pause(self, index: int, ms: int | None) -> RenderResult:
        """A copy with line `index` preceded by `ms` of silence (None: the default); nothing is regenerated."""
        if ms is not None and (isinstance(ms, bool) or not isinstance(ms, int) or not 0 <= ms <= MAX_PAUSE_MS):
            raise ValueError(f"a pause must be a whole number of ms from 0 to {MAX_PAUSE_MS}, got {ms!r}")
        line = replace(self.clips[index].line, pause_before_ms=ms)
        clips = list(self.clips)
        clips[index] = replace(clips[index], line=line)
        takes = dict(self.takes)
        if index in takes:
            takes[index] = [clips[index] if c.take == clips[index].take else replace(c, line=line) for c in takes[index]]
        return replace(self, clips=clips, takes=takes)

    def choose_take(self, index: int, take: int) -> RenderResult:
        """A copy with take `take` of line `index` as its clip (later lines that heard it become stale)."""
        candidates = self.candidates(index)
        if isinstance(take, bool) or not isinstance(take, int) or not 0 <= take < len(candidates):
            raise ValueError(f"line {self.clips[index].line.number} has takes 0 to {len(candidates) - 1}, "
                             f"not {take!r}")
        if take == self.clips[index].take:
            return replace(self, clips=list(self.clips))
        clips = list(self.clips)
        clips[index] = candidates[take]
        return _changed(replace(self, clips=clips), index)

    def affected_by(self, index: int) -> list[int]:
        """Later clips that heard clip `index` as context (conversational mode; none in fast mode)."""
        if self.config.mode != CONVERSATIONAL:
            return []
        label = _line_labels(self.clips[:index + 1])[-1]
        return [j for j in range(index + 1, len(self.clips)) if label in self.clips[j].context]

    def stems(self) -> dict[str, torch.Tensor]:
        """Speaker -> a track as long as the dialogue with only that speaker's lines (silence elsewhere)."""
        return dict(self.iter_stems())

    def iter_stems(self) -> Iterator[tuple[str, torch.Tensor]]:
        """`stems()` one track at a time, in order of first line, so that only one full-length track
        is in memory at once (a script may have as many speakers as lines)."""
        starts, length = self._layout()
        for speaker in dict.fromkeys(c.line.speaker for c in self.clips):
            track = torch.zeros(length)
            for clip, at in zip(self.clips, starts):
                if clip.line.speaker == speaker:
                    track[at:at + clip.audio.numel()] = clip.audio
            yield speaker, track

    def srt(self) -> str:
        """Subtitles (SubRip) with the manifest's timestamps: `Speaker: text` per line."""

        def stamp(t: float) -> str:
            ms = round(t * 1000)
            return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"

        blocks = [f"{i}\n{stamp(m['start_s'])} --> {stamp(m['start_s'] + m['duration_s'])}\n{m['speaker']}: {m['text']}\n"
                  for i, m in enumerate(self.manifest(), start=1)]
        return "\n".join(blocks)

    def csv(self) -> str:
        import csv
        import io

        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["index", "line", "speaker", "profile", "text", "start_s", "duration_s", "seed"])
        for m in self.manifest():
            writer.writerow([m["index"], m["line"], m["speaker"], m["profile"] or "", m["text"], m["start_s"],
                             m["duration_s"], m["seed"]])
        return out.getvalue()

    def save(self, directory: str | Path, name: str = "dialogue", formats: Sequence[str] = ("wav",),
             stems: bool = False) -> dict[str, Path]:
        """Write the dialogue in each of `formats` (wav, flac, mp3), `clips/NNN-speaker.wav`, the
        manifest as `<name>.json` and `<name>.csv`, subtitles `<name>.srt`, and with `stems` one
        `stems/<speaker>.wav` per speaker."""
        directory = Path(directory)
        (directory / "clips").mkdir(parents=True, exist_ok=True)
        dialogue = self.audio
        paths = {"dialogue": save_audio(directory / f"{name}.{formats[0]}", dialogue)}
        for fmt in formats[1:]:
            paths[f"dialogue.{fmt}"] = save_audio(directory / f"{name}.{fmt}", dialogue)
        if stems:
            (directory / "stems").mkdir(exist_ok=True)
            speakers = list(dict.fromkeys(c.line.speaker for c in self.clips))
            for (speaker, track), slug in zip(self.iter_stems(), _unique_slugs(speakers)):
                paths[f"stem:{speaker}"] = save_audio(directory / "stems" / f"{slug}.wav", track)
        (directory / f"{name}.srt").write_text(self.srt(), encoding="utf-8")
        (directory / f"{name}.csv").write_text(self.csv(), encoding="utf-8")
        paths["srt"], paths["csv"] = directory / f"{name}.srt", directory / f"{name}.csv"
        for clip in self.clips:  # the index prefix keeps clip names unique
            slug = _slug(clip.line.speaker)
            paths[f"clip{clip.index}"] = save_audio(directory / "clips" / f"{clip.index + 1:03d}-{slug}.wav", clip.audio)
        manifest = directory / f"{name}.json"
        manifest.write_text(json.dumps({"sample_rate": self.sample_rate, "pause_ms": self.config.pause_ms,
                                        "lines": self.manifest()}, indent=2, ensure_ascii=False))
        paths["manifest"] = manifest
        return paths


def word_char(c: str) -> bool:
    """A letter, digit or combining mark: what a file name keeps of a name. Marks count, so a word of a
    script that writes its vowels as signs (Devanagari "राहुल") keeps them: `isalnum` alone made it "र_ह_ल"."""
    return c.isalnum() or unicodedata.category(c)[0] == "M"


def _slug(speaker: str) -> str:
    return "".join(c if word_char(c) else "_" for c in speaker)[:24]


def _unique_slugs(speakers) -> list[str]:
    """File-name stems for speakers, in order: `_slug`, then "-2", "-3"... where two would collide
    ("A.B" and "A-B", or names alike in their first 24 characters); compared case-insensitively
    for case-insensitive file systems."""
    taken: set[str] = set()
    out = []
    for speaker in speakers:
        base = slug = _slug(speaker)
        n = 1
        while slug.casefold() in taken:
            n += 1
            slug = f"{base}-{n}"
        taken.add(slug.casefold())
        out.append(slug)
    return out


class RenderError(CsmError):
    """A line failed (or the render was cancelled); `partial` holds the clips already made."""

    def __init__(self, message: str, partial: RenderResult, line: ScriptLine | None = None):
        super().__init__(message)
        self.partial, self.line = partial, line


class RenderCancelled(RenderError):
    pass


ProfileSource = Callable[[str], Segment]  # profile name -> Segment(text=transcript, codes=...)


class ScriptRenderer:
    """Renders scripts with one engine and one profile source (e.g. `ProfileStore.segment`).

    `transcriber` ((S,) 24 kHz audio -> text, e.g. `transcribe.Transcriber`) measures the word
    error rate of candidates when a line has several takes; without it they rank on their endings.
    """

    def __init__(self, engine: Engine, profile_segment: ProfileSource, budget: ContextBudget | None = None,
                 on_frame: Callable[[], None] | None = None, transcriber: Transcribe | None = None):
        self.engine = engine
        self.profile_segment = profile_segment
        self.budget = budget or ContextBudget(engine.config.max_seq_len)
        self.on_frame = on_frame  # e.g. CudaMemoryManager.step
        self.transcriber = transcriber

    def prepare(self, script: str | Sequence[ScriptLine], voices: Mapping[str, str | None]):
        """Parse and check a script before any generation: unknown speakers raise ScriptError."""
        lines = parse_script(script) if isinstance(script, str) else list(script)
        check_speakers(lines, {speaker_key(k): v for k, v in voices.items()})
        return lines

    def render(self, script: str | Sequence[ScriptLine], voices: Mapping[str, str | None],
               config: RenderConfig = RenderConfig(), progress: Callable[[Progress], None] | None = None,
               cancel: Callable[[], bool] | None = None, on_clip: Callable[[Clip], None] | None = None) -> RenderResult:
        """voices: script speaker name -> profile name (None: no reference voice for that speaker).

        `on_clip` receives each finished (chosen) clip in script order (for playback while rendering).
        """
        lines = self.prepare(script, voices)
        ids = {speaker_key(name): i for i, name in enumerate(speakers(lines))}
        profiles = self._profile_items(voices, ids)
        result = RenderResult([], config)
        if config.mode == FAST:
            return self._render_fast(lines, voices, ids, profiles, config, progress, cancel, result, on_clip)
        for index in range(len(lines)):
            report = self._reporter(index, lines, config, progress, cancel, result)
            candidates = self._candidates(index, lines, result.clips, voices, ids, profiles, config, report,
                                          config.take_seeds(index))
            result.clips.append(self._keep(result, index, candidates, report))
            if on_clip:
                on_clip(result.clips[-1])
        return result

    def rerender_line(self, result: RenderResult, index: int, voices: Mapping[str, str | None],
                      seed: int | None = None, progress=None, cancel=None, *, text: str | None = None) -> RenderResult:
        """Regenerate line `index` (new or given seed) with the same context rules; others are kept.

        `text` replaces the line's text (same speaker, same pause). With `config.takes` > 1 the line
        gets that many fresh candidates (take t of a given seed uses `take_seed(seed, 0, t)`). In
        conversational mode the later lines that heard the old line are listed in the result's `stale`.
        """
        check_seed(seed)
        line = result.clips[index].line
        if text is not None:
            line = replace(line, text=clean_line_text(text))
        lines = [c.line for c in result.clips]
        lines[index] = line
        n = result.config.takes
        seeds = [None] * n if seed is None else [take_seed(seed, 0, t) for t in range(n)]
        report = self._reporter(index, lines, result.config, progress, cancel, result)
        candidates = self._line_candidates(result, index, lines, voices, seeds, report)
        return self._replaced(result, index, candidates, fresh=True, report=report)

    def new_takes(self, result: RenderResult, index: int, voices: Mapping[str, str | None], n: int,
                  seeds: Sequence[int | None] | None = None, progress=None, cancel=None) -> RenderResult:
        """Add `n` (1..MAX_TAKES) fresh candidates for line `index`, generated as one batch with the
        line's context (random seeds unless `seeds` are given); the best of all its candidates
        becomes the chosen take. A line keeps at most MAX_CANDIDATES."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_TAKES:
            raise ValueError(f"takes to add must be a whole number from 1 to {MAX_TAKES}, got {n!r}")
        seeds = [None] * n if seeds is None else list(seeds)
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} takes")
        for s in seeds:
            check_seed(s)
        have = result.candidates(index)
        if len(have) + n > MAX_CANDIDATES:
            raise ValueError(f"line {have[0].line.number} has {len(have)} takes and keeps at most {MAX_CANDIDATES}:"
                             " choose one, or re-render the line to start again")
        lines = [c.line for c in result.clips]
        report = self._reporter(index, lines, result.config, progress, cancel, result)
        fresh = self._line_candidates(result, index, lines, voices, seeds, report, first_take=len(have))
        return self._replaced(result, index, have + fresh, fresh=False, report=report)

    # ---- internals ------------------------------------------------------------------------
    def _line_candidates(self, result, index, lines, voices, seeds, report, first_take=0) -> list[Clip]:
        """Candidates for line `index` of a finished `result`, heard after the clips before it."""
        ids = {speaker_key(name): i for i, name in enumerate(speakers(lines))}
        profiles = self._profile_items(voices, ids)
        history = result.clips[:index] if result.config.mode == CONVERSATIONAL else []
        return self._candidates(index, lines, history, voices, ids, profiles, result.config, report, seeds,
                                first_take)

    def _replaced(self, result, index, candidates, fresh: bool, report) -> RenderResult:
        """`result` with `candidates` as line `index`'s takes, the best of them chosen."""
        candidates, chosen = self._rank(candidates, report)
        clips = list(result.clips)
        clips[index] = chosen
        takes = {k: v for k, v in result.takes.items() if k != index}
        if len(candidates) > 1:
            takes[index] = candidates
        new = replace(result, clips=clips, takes=takes)
        if not fresh and chosen.take == result.clips[index].take:
            return new
        return _changed(new, index, refreshed=fresh or chosen.take >= len(result.candidates(index)))

    def _keep(self, result: RenderResult, index: int, candidates: list[Clip], report) -> Clip:
        """Record line `index`'s candidates in `result` (being built) and return the chosen one."""
        candidates, chosen = self._rank(candidates, report)
        if len(candidates) > 1:
            result.takes[index] = candidates
        return chosen

    def _rank(self, candidates: list[Clip], report) -> tuple[list[Clip], Clip]:
        """The candidates with their WER measured (when there is a choice and a transcriber), and the best."""
        if len(candidates) > 1 and self.transcriber is not None and any(c.score and c.score.wer is None
                                                                        for c in candidates):
            report(TRANSCRIBING)
            candidates = [c if c.score is None else
                          replace(c, score=measure(c.score, c.audio, c.line.text, self.transcriber))
                          for c in candidates]
        return candidates, candidates[best([c.score for c in candidates])]

    def _reporter(self, index, lines, config, progress, cancel=None, result=None, span=1) -> _Reporter:
        return _Reporter(self, index, lines, config.sampling(0).max_frames, progress, cancel, result, span)

    def _profile_items(self, voices, ids) -> dict[str, ContextItem]:
        items = {}
        for name, profile in voices.items():
            key = speaker_key(name)
            if profile is None or key not in ids:
                continue
            seg = self.profile_segment(profile)
            seg = Segment(speaker=ids[key], text=seg.text, audio=seg.audio, codes=seg.codes)
            items[key] = ContextItem(kind="profile", label=f"profile:{profile}", speaker=key,
                                     positions=self.engine.segment_positions(seg), order=-1, payload=seg)
        return items

    def _context(self, line, history, ids, profiles, config) -> tuple[list[Segment], list[str], list[str], int,
                                                                     dict[str, int]]:
        """The context kept for `line`: its segments, their labels, what was dropped, the positions they
        take, and how the window is spent (`Clip.context_split`)."""
        key = speaker_key(line.speaker)
        hist = [ContextItem(kind="line", label=label, speaker=speaker_key(c.line.speaker),
                            positions=self.engine.segment_positions(seg), order=c.index, payload=seg)
                for c, label in zip(history, _line_labels(history))
                for seg in [Segment(speaker=ids[speaker_key(c.line.speaker)], text=config.context_text(c.line.text),
                                    codes=c.codes)]]
        text_positions = len(self.engine.tokenizer.encode(format_text(ids[key], config.model_text(line.text))))
        speak = config.sampling(0).max_frames
        plan = self.budget.plan(key, list(profiles.values()), hist, text_positions + speak)
        kept = [item.payload for item in plan.kept]
        split = {"voices": sum(i.positions for i in plan.kept if i.kind == PROFILE),
                 "lines": sum(i.positions for i in plan.kept if i.kind == LINE), "text": text_positions, "speak": speak}
        dropped = [d.label if isinstance(d, ContextItem) else str(d) for d in plan.dropped]
        return kept, [i.label for i in plan.kept], dropped, plan.used, split

    def _candidates(self, index, lines, history, voices, ids, profiles, config, report, seeds,
                    first_take=0) -> list[Clip]:
        """One candidate per seed for line `index`: `generate` for one (as without takes), else one batch."""
        line = lines[index]
        sampling = config.sampling(index)
        context, kept, dropped, used, split = self._context(line, history, ids, profiles, config)
        text, speaker = config.model_text(line.text), ids[speaker_key(line.speaker)]
        report(GENERATING)
        try:
            if len(seeds) == 1:
                utts = [self.engine.generate(text, speaker, context, sampling.with_(seed=seeds[0]),
                                             on_frame=report.frame, on_stage=report)]
            else:
                utts = self.engine.generate_batch([(text, speaker, context)] * len(seeds), sampling, seeds,
                                                  on_frame=report.frame, on_stage=report)
        except RenderError:
            raise
        except BusyError as e:  # nothing went wrong with the line: there was no room for it
            raise RenderError(f"line {line.number} ({line.speaker}) was not started: {e}", report.result, line) from e
        except Exception as e:  # report which line failed; keep what was made
            raise RenderError(f"line {line.number} ({line.speaker}) failed: {e}", report.result, line) from e
        return [_clip(index, line, ids, voices, config, utt, kept, dropped, used, first_take + t, split)
                for t, utt in enumerate(utts)]

    def _render_fast(self, lines, voices, ids, profiles, config, progress, cancel, result, on_clip=None) -> RenderResult:
        """Lines conditioned only on profile prompts, generated in batches of every take of
        max(1, batch_size // takes) lines (all lines in one go when the engine has a scheduler, which
        keeps its rows full as lines end)."""
        sampling, n = config.sampling(0), config.takes
        per_batch = max(1, config.batch_size // n)
        if self.engine.scheduler is not None:  # generate_batch feeds it a window of rows as lines end: all at once
            per_batch = len(lines)
        for start in range(0, len(lines), per_batch):
            chunk = list(range(start, min(start + per_batch, len(lines))))
            first, last = lines[chunk[0]], lines[chunk[-1]]
            if cancel and cancel():
                raise RenderCancelled(f"cancelled before line {first.number}", result, first)
            requests, seeds, meta = [], [], []
            for index in chunk:
                context, kept, dropped, used, split = self._context(lines[index], [], ids, profiles, config)
                requests += [(config.model_text(lines[index].text), ids[speaker_key(lines[index].speaker)], context)] * n
                seeds += config.take_seeds(index)  # each line keeps its own seed (seed + index), as in conversational mode
                meta.append((index, kept, dropped, used, split))
            report = self._reporter(start, lines, config, progress, cancel, result, span=len(chunk))
            report(GENERATING)
            try:
                utts = self.engine.generate_batch(requests, sampling, seeds, on_frame=report.frame, on_stage=report)
            except RenderError:
                raise
            except BusyError as e:
                raise RenderError(f"lines {first.number}-{last.number} were not started: {e}", result, first) from e
            except Exception as e:
                raise RenderError(f"lines {first.number}-{last.number} failed: {e}", result, first) from e
            for row, (index, kept, dropped, used, split) in enumerate(meta):
                candidates = [_clip(index, lines[index], ids, voices, config, utt, kept, dropped, used, t, split)
                              for t, utt in enumerate(utts[row * n:(row + 1) * n])]
                result.clips.append(self._keep(result, index, candidates, report))
                if on_clip:
                    on_clip(result.clips[-1])
        if progress and lines:
            last = lines[-1]
            progress(Progress(len(lines) - 1, len(lines), sampling.max_frames, sampling.max_frames, last.speaker, last.text))
        return result


class _Reporter:
    """Progress for one engine call about `line` (and `span - 1` lines after it): called with a
    stage; `frame()` after every frame also runs the renderer's `on_frame` and checks `cancel`."""

    def __init__(self, renderer: ScriptRenderer, index: int, lines: Sequence[ScriptLine], max_frames: int,
                 progress: Callable[[Progress], None] | None, cancel: Callable[[], bool] | None,
                 result: RenderResult | None, span: int = 1):
        self.renderer, self.index, self.lines, self.line = renderer, index, len(lines), lines[index]
        self.max_frames, self.progress, self.cancel, self.result, self.span = max_frames, progress, cancel, result, span
        self.frames = 0

    def __call__(self, stage: str) -> None:
        if self.progress:
            self.progress(Progress(self.index, self.lines, self.frames, self.max_frames, self.line.speaker,
                                   self.line.text, stage, self.span))

    def frame(self) -> None:
        self.frames += 1
        if self.renderer.on_frame:
            self.renderer.on_frame()
        self(GENERATING)
        if self.cancel and self.cancel():
            raise RenderCancelled(f"cancelled during line {self.line.number}", self.result, self.line)


def _line_labels(clips: Sequence[Clip]) -> list[str]:
    """How context names each clip: "line 7", and "line 7 part 2" for the second utterance of a
    script line that a pause tag split."""
    seen: dict[int, int] = {}
    labels = []
    for clip in clips:
        part = seen[clip.line.number] = seen.get(clip.line.number, 0) + 1
        labels.append(f"line {clip.line.number}" + (f" part {part}" if part > 1 else ""))
    return labels


def _changed(result: RenderResult, index: int, refreshed: bool = False) -> RenderResult:
    """`result` after clip `index` changed: the lines that heard it are stale (and, when it was
    generated anew with the current context, it is no longer stale itself)."""
    stale = set(result.stale) - ({index} if refreshed else set())
    return replace(result, stale=tuple(sorted(stale | set(result.affected_by(index)))))


def _clip(index: int, line: ScriptLine, ids: Mapping[str, int], voices: Mapping[str, str | None],
          config: RenderConfig, utt: Utterance, kept: list[str], dropped: list[str], used: int, take: int = 0,
          split: dict[str, int] | None = None) -> Clip:
    """A finished line as a Clip, trimmed when `config.trim_silence`, scored on its ending. The codes
    are cut with the audio (whole 80 ms frames) so later lines hear what the listener hears, not the
    trimmed pause."""
    audio, codes = utt.audio, utt.codes
    if config.trim_silence:
        trimmed = trim_clip(audio, codes, margin_ms=config.margin_ms, leading=config.trim_leading)
        audio, codes = trimmed.audio, trimmed.codes
    score = ending_score(utt.audio, utt.codes.shape[-1], config.sampling(0).max_frames)
    return Clip(index=index, line=line, speaker_id=ids[speaker_key(line.speaker)], profile=_lookup(voices, line.speaker),
                audio=audio, codes=codes, seed=utt.seed, watermarked=utt.watermarked, context=kept, dropped=dropped,
                context_positions=used, model_text=config.model_text(line.text), generated_frames=utt.codes.shape[-1],
                take=take, score=score, context_split=dict(split or {}))


def _lookup(voices: Mapping[str, str | None], speaker: str) -> str | None:
    key = speaker_key(speaker)
    return next((v for k, v in voices.items() if speaker_key(k) == key), None)

