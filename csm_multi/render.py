"""Render a multi-speaker script: lines + voice profiles -> one dialogue, per-line clips, manifest.

Each line is generated with context chosen by `ContextBudget`: the speaker's profile prompt, the
most recent lines, other speakers' prompts. Progress goes out through a callback, cancellation
comes in through one; this module never imports a UI. Waveforms: (S,) float32 at 24 kHz.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .audio import save_audio
from .config import FRAME_MS, SAMPLE_RATE, SamplingConfig, check_seed
from .context import ContextBudget, ContextItem
from .endings import end_sentence, pad_line, trim_clip
from .engine import Engine, Utterance
from .errors import CsmError
from .frames import Segment, format_text
from .script import ScriptLine, check_speakers, parse_script, speaker_key, speakers

CONVERSATIONAL = "conversational"
FAST = "fast"
MAX_LINES = 1_000_000  # room kept above a script's seed for seed + i


@dataclass(frozen=True)
class RenderConfig:
    """How a script is rendered. `seed` fixes line i's seed to seed + i (None: random per line).

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

    def __post_init__(self) -> None:
        if not 0 <= self.pause_ms <= 10_000:
            raise ValueError("pause_ms must be between 0 and 10000")
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

    def model_text(self, text: str) -> str:
        """What the model is asked to say for a line of the script."""
        return pad_line(text) if self.end_padding else text

    def context_text(self, text: str) -> str:
        """The transcript paired with a finished clip when later lines hear it (the filler is trimmed)."""
        return end_sentence(text) if self.end_padding else text


@dataclass(frozen=True)
class Progress:
    """One progress event: line `line` of `lines` (0-based), `frame` frames into it."""

    line: int
    lines: int
    frame: int
    max_frames: int
    speaker: str
    text: str

    @property
    def fraction(self) -> float:
        return min(1.0, (self.line + min(self.frame, self.max_frames) / self.max_frames) / self.lines)


@dataclass
class Clip:
    """One rendered line: `audio` (S,) as trimmed, `codes` (K, T) with T = ceil(S / 1920), the text
    sent to the model, and the frames generated before trimming."""

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

    @property
    def duration_s(self) -> float:
        return self.audio.numel() / SAMPLE_RATE


@dataclass
class RenderResult:
    clips: list[Clip]
    config: RenderConfig
    sample_rate: int = SAMPLE_RATE
    voice_audio: dict[str, str] = field(default_factory=dict)  # profile name -> its audio's SHA-256 when rendered

    @property
    def audio(self) -> torch.Tensor:
        """The dialogue: clips joined with `pause_ms` of silence between consecutive lines."""
        pause = torch.zeros(int(self.sample_rate * self.config.pause_ms / 1000))
        parts: list[torch.Tensor] = []
        for i, clip in enumerate(self.clips):
            if i:
                parts.append(pause)
            parts.append(clip.audio)
        return torch.cat(parts) if parts else torch.zeros(0)

    def manifest(self) -> list[dict]:
        rows, t = [], 0.0
        pause = self.config.pause_ms / 1000
        for i, clip in enumerate(self.clips):
            if i:
                t += pause
            rows.append({"index": clip.index, "line": clip.line.number, "speaker": clip.line.speaker,
                         "profile": clip.profile, "text": clip.line.text, "start_s": round(t, 3),
                         "duration_s": round(clip.duration_s, 3), "seed": clip.seed,
                         "watermarked": clip.watermarked, "context": clip.context, "dropped": clip.dropped,
                         "context_positions": clip.context_positions, "speaker_id": clip.speaker_id,
                         "model_text": clip.model_text,
                         "generated_s": round(clip.generated_frames * FRAME_MS / 1000, 3)})
            t += clip.duration_s
        return rows

    def stems(self) -> dict[str, torch.Tensor]:
        """Speaker -> a track as long as the dialogue with only that speaker's lines (silence elsewhere)."""
        return dict(self.iter_stems())

    def iter_stems(self) -> Iterator[tuple[str, torch.Tensor]]:
        """`stems()` one track at a time, in order of first line, so that only one full-length track
        is in memory at once (a script may have as many speakers as lines)."""
        pause = int(self.sample_rate * self.config.pause_ms / 1000)
        starts, start = [], 0
        for i, clip in enumerate(self.clips):
            start += pause if i else 0
            starts.append(start)
            start += clip.audio.numel()
        for speaker in dict.fromkeys(c.line.speaker for c in self.clips):
            track = torch.zeros(start)
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


def _slug(speaker: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in speaker)[:24]


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
    """Renders scripts with one engine and one profile source (e.g. `ProfileStore.segment`)."""

    def __init__(self, engine: Engine, profile_segment: ProfileSource, budget: ContextBudget | None = None,
                 on_frame: Callable[[], None] | None = None):
        self.engine = engine
        self.profile_segment = profile_segment
        self.budget = budget or ContextBudget(engine.config.max_seq_len)
        self.on_frame = on_frame  # e.g. CudaMemoryManager.step

    def prepare(self, script: str | Sequence[ScriptLine], voices: Mapping[str, str | None]):
        """Parse and check a script before any generation: unknown speakers raise ScriptError."""
        lines = parse_script(script) if isinstance(script, str) else list(script)
        check_speakers(lines, {speaker_key(k): v for k, v in voices.items()})
        return lines

    def render(self, script: str | Sequence[ScriptLine], voices: Mapping[str, str | None],
               config: RenderConfig = RenderConfig(), progress: Callable[[Progress], None] | None = None,
               cancel: Callable[[], bool] | None = None, on_clip: Callable[[Clip], None] | None = None) -> RenderResult:
        """voices: script speaker name -> profile name (None: no reference voice for that speaker).

        `on_clip` receives each finished clip in script order (for playback while rendering).
        """
        lines = self.prepare(script, voices)
        ids = {speaker_key(name): i for i, name in enumerate(speakers(lines))}
        profiles = self._profile_items(voices, ids)
        result = RenderResult([], config)
        if config.mode == FAST:
            return self._render_fast(lines, voices, ids, profiles, config, progress, cancel, result, on_clip)
        for index in range(len(lines)):
            clip = self._line(index, lines, result.clips, voices, ids, profiles, config, progress, cancel, result)
            result.clips.append(clip)
            if on_clip:
                on_clip(clip)
        return result

    def rerender_line(self, result: RenderResult, index: int, voices: Mapping[str, str | None],
                      seed: int | None = None, progress=None, cancel=None) -> RenderResult:
        """Regenerate line `index` (new or given seed) with the same context rules; others are kept."""
        lines = [c.line for c in result.clips]
        ids = {speaker_key(name): i for i, name in enumerate(speakers(lines))}
        profiles = self._profile_items(voices, ids)
        history = result.clips[:index] if result.config.mode == CONVERSATIONAL else []
        clip = self._line(index, lines, history, voices, ids, profiles, result.config, progress, cancel, result,
                          seed=seed, fresh_seed=seed is None)
        clips = list(result.clips)
        clips[index] = clip
        return replace(result, clips=clips)

    # ---- internals ------------------------------------------------------------------------
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

    def _context(self, line, history, ids, profiles, config) -> tuple[list[Segment], list[str], list[str], int]:
        key = speaker_key(line.speaker)
        hist = [ContextItem(kind="line", label=f"line {c.line.number}", speaker=speaker_key(c.line.speaker),
                            positions=self.engine.segment_positions(seg), order=c.index, payload=seg)
                for c in history
                for seg in [Segment(speaker=ids[speaker_key(c.line.speaker)], text=config.context_text(c.line.text),
                                    codes=c.codes)]]
        text_positions = len(self.engine.tokenizer.encode(format_text(ids[key], config.model_text(line.text))))
        plan = self.budget.plan(key, list(profiles.values()), hist, text_positions + config.sampling(0).max_frames)
        kept = [item.payload for item in plan.kept]
        return kept, [i.label for i in plan.kept], [d.label if isinstance(d, ContextItem) else str(d) for d in plan.dropped], plan.used

    def _line(self, index, lines, history, voices, ids, profiles, config, progress, cancel, result,
              seed=None, fresh_seed=False) -> Clip:
        line = lines[index]
        sampling = config.sampling(index, seed)
        if fresh_seed:
            sampling = sampling.with_(seed=None)
        context, kept, dropped, used = self._context(line, history, ids, profiles, config)
        text = config.model_text(line.text)
        frames_done = 0

        def on_frame() -> None:
            nonlocal frames_done
            frames_done += 1
            if self.on_frame:
                self.on_frame()
            if progress:
                progress(Progress(index, len(lines), frames_done, sampling.max_frames, line.speaker, line.text))
            if cancel and cancel():
                raise RenderCancelled(f"cancelled during line {line.number}", result, line)

        if progress:
            progress(Progress(index, len(lines), 0, sampling.max_frames, line.speaker, line.text))
        try:
            utt = self.engine.generate(text, ids[speaker_key(line.speaker)], context, sampling,
                                       on_frame=on_frame)
        except RenderError:
            raise
        except Exception as e:  # report which line failed; keep what was made
            raise RenderError(f"line {line.number} ({line.speaker}) failed: {e}", result, line) from e
        return _clip(index, line, ids, voices, config, utt, kept, dropped, used)

    def _render_fast(self, lines, voices, ids, profiles, config, progress, cancel, result, on_clip=None) -> RenderResult:
        """Lines conditioned only on profile prompts, generated `batch_size` at a time."""
        sampling = config.sampling(0)
        for start in range(0, len(lines), config.batch_size):
            if cancel and cancel():
                raise RenderCancelled(f"cancelled before line {lines[start].number}", result, lines[start])
            chunk = list(enumerate(lines))[start:start + config.batch_size]
            requests, meta = [], []
            for index, line in chunk:
                context, kept, dropped, used = self._context(line, [], ids, profiles, config)
                requests.append((config.model_text(line.text), ids[speaker_key(line.speaker)], context))
                meta.append((index, line, kept, dropped, used))
            if progress:
                progress(Progress(start, len(lines), 0, sampling.max_frames, chunk[0][1].speaker, chunk[0][1].text))
            try:  # each line keeps its own seed (seed + index), as in conversational mode
                utts = self.engine.generate_batch(requests, sampling, [config.sampling(i).seed for i, _ in chunk])
            except Exception as e:
                raise RenderError(f"lines {chunk[0][1].number}-{chunk[-1][1].number} failed: {e}", result,
                                  chunk[0][1]) from e
            for (index, line, kept, dropped, used), utt in zip(meta, utts):
                result.clips.append(_clip(index, line, ids, voices, config, utt, kept, dropped, used))
                if on_clip:
                    on_clip(result.clips[-1])
        if progress and lines:
            last = lines[-1]
            progress(Progress(len(lines) - 1, len(lines), sampling.max_frames, sampling.max_frames, last.speaker, last.text))
        return result


def _clip(index: int, line: ScriptLine, ids: Mapping[str, int], voices: Mapping[str, str | None],
          config: RenderConfig, utt: Utterance, kept: list[str], dropped: list[str], used: int) -> Clip:
    """A finished line as a Clip, trimmed when `config.trim_silence`. The codes are cut with the
    audio (whole 80 ms frames) so later lines hear what the listener hears, not the trimmed pause."""
    audio, codes = utt.audio, utt.codes
    if config.trim_silence:
        trimmed = trim_clip(audio, codes, margin_ms=config.margin_ms, leading=config.trim_leading)
        audio, codes = trimmed.audio, trimmed.codes
    return Clip(index=index, line=line, speaker_id=ids[speaker_key(line.speaker)], profile=_lookup(voices, line.speaker),
                audio=audio, codes=codes, seed=utt.seed, watermarked=utt.watermarked, context=kept, dropped=dropped,
                context_positions=used, model_text=config.model_text(line.text), generated_frames=utt.codes.shape[-1])


def _lookup(voices: Mapping[str, str | None], speaker: str) -> str | None:
    key = speaker_key(speaker)
    return next((v for k, v in voices.items() if speaker_key(k) == key), None)

