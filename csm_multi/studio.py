"""What the web app does, without the web: per-visitor profile libraries, script rendering to
fresh output files, regeneration, status. `app.py` only wires these to Gradio components.

Knows no UI toolkit. Every path it returns is a fresh file under `outputs_root` (never a stored
profile file), so the app can hand it out without exposing the profile store.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import soundfile as sf
import torch
from cachetools import LRUCache

from .audio import load_upload, prepare_reference, save_audio
from .config import SAMPLE_RATE
from .engine import Engine
from .errors import CsmError, ProfileError, ScriptError
from .memory import CudaMemoryManager
from .profiles import (
    NO_SPACE,
    ProfileStore,
    StorageQuota,
    VoiceProfile,
    clean_name,
    disk_full_errors,
    remove_library,
    resolve_voices,
)
from .project import PROJECT_SUFFIX, Project, import_project, read_project, save_project
from .render import RenderConfig, RenderResult, ScriptRenderer, word_char
from .scheduler import as_visitor
from .script import MAX_PAUSE_MS, ScriptLine, parse_script, speaker_key, speakers

LIBRARY_KEY = re.compile(r"[A-Za-z0-9_-]{8,64}")  # used with fullmatch: `$` would let a final "\n" through
SHARED = "shared"
log = logging.getLogger(__name__)
NO_VOICE = "(none)"  # what the page's speaker map shows for "no reference voice"

EXAMPLE_SCRIPT = """# One line per utterance: `Name: text`. Names map to voice profiles below.
Alice: Hey, did you get a chance to listen to the demo?
Bob: I did! The voices sound surprisingly natural.
Alice: Right? And it keeps track of who is speaking.
Bob: Let's send the link to the rest of the team.
"""


def _shown(setting: str, value: float) -> str:
    return {"max_line_ms": f"{value / 1000:g} s", "pause_ms": f"{value:g} ms"}.get(setting, f"{value:g}")


def bundle_name(title: str | None, result: RenderResult | None, now: float | None = None) -> str:
    """A download's name: the title (a project's) or the first line's first words, and the time:
    `alice-hey-did-you-get-2026-12-01-1204`."""
    def words_of(text: str) -> list[str]:  # runs of letters, digits and combining marks (render.word_char)
        return "".join(c if word_char(c) else " " for c in text).split()

    first = result.clips[:1] if result is not None else []
    words = words_of(title or "") or [w for c in first for w in words_of(f"{c.line.speaker} {c.line.text}")]
    slug = "-".join(words[:6]).lower()[:48].strip("-") or "dialogue"
    return f"{slug}-{time.strftime('%Y-%m-%d-%H%M', time.localtime(now))}"


def zip_files(path: Path, root: Path, files, top: str) -> Path:
    """`files` (under `root`) in a zip at `path`, inside one folder `top`; audio is stored, not
    deflated (it does not shrink), text is deflated."""
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for f in dict.fromkeys(Path(p) for p in files):
            packed = zipfile.ZIP_DEFLATED if f.suffix in (".json", ".csv", ".srt") else zipfile.ZIP_STORED
            z.write(f, f"{top}/{f.relative_to(root).as_posix()}", compress_type=packed)
    return path


def new_library_key() -> str:
    return secrets.token_hex(16)


def create_profile(store: ProfileStore, name: str, audio: str | Path | bytes, transcript: str | None,
                   transcriber: Callable[[torch.Tensor], str] | None = None,
                   speaker_id: int | None = None) -> tuple[VoiceProfile, bool]:
    """Save a profile from a clip file; an empty transcript is written by `transcriber` from the
    trimmed clip. Returns the profile and whether its transcript was generated."""
    if (transcript or "").strip():
        return store.create(name, audio, transcript, speaker_id), False
    if transcriber is None:
        raise ProfileError("type what the clip says (its transcript): CSM needs it to learn the voice")
    clean_name(name)  # a bad name fails before the slow part
    clip = load_upload(audio)
    text = transcriber(prepare_reference(clip))  # the audio the profile keeps: silence trimmed, level set
    return store.create(name, (clip, SAMPLE_RATE), text, speaker_id), True


@dataclass(frozen=True)
class StudioLimits:
    max_script_lines: int = 200
    max_script_chars: int = 20_000
    max_line_chars: int = 1_000
    max_line_s: float = 30.0
    libraries_in_memory: int = 64
    # storage a public link can fill (0 turns each off): voices in one library (visitor or shared);
    # bytes on disk of all libraries together; days after which an untouched visitor library is
    # deleted (the shared one never is), checked at start-up and at most every `expiry_every_s`
    voices_per_library: int = 50
    storage_quota_bytes: int = 2_000_000_000
    library_idle_days: float = 30.0
    expiry_every_s: float = 600.0
    # the Script tab's controls (a project made with the command line may go beyond them)
    temperature: tuple[float, float] = (0.1, 1.5)
    max_topk: int = 100
    max_pause_ms: int = 2000
    min_line_s: float = 1.0
    # an opened project's rendering longer than this is left out (its memory grows with its length)
    max_open_render_s: float = 20 * 60


def _as_visitor(method):
    """A Studio method whose generations count against the caller's library in the scheduler's
    per-visitor share (see csm_multi/scheduler.py)."""
    @functools.wraps(method)
    def wrapped(self, key, *args, **kwargs):
        with as_visitor(self.visitor(key)):
            return method(self, key, *args, **kwargs)

    return wrapped


class Studio:
    def __init__(self, engine: Engine, profiles_root: str | Path, *, shared_library: bool = False,
                 outputs_root: str | Path | None = None, limits: StudioLimits = StudioLimits(), cache_size: int = 32,
                 transcriber: Callable[[torch.Tensor], str] | None = None):
        self.engine = engine
        self.transcriber = transcriber  # writes empty transcripts (a lazily loaded Whisper); None: type them
        self.profiles_root = Path(profiles_root).resolve()
        self.shared = shared_library
        self.limits = limits
        self.cache_size = cache_size
        self.outputs_root = Path(outputs_root or tempfile.gettempdir()) / "csm-multi-outputs"
        self.outputs_root.mkdir(parents=True, exist_ok=True)
        self._stores: LRUCache = LRUCache(maxsize=limits.libraries_in_memory)
        self._last: LRUCache = LRUCache(maxsize=limits.libraries_in_memory)  # library -> its last rendering
        self._last_audio: LRUCache = LRUCache(maxsize=limits.libraries_in_memory)  # library -> its last audio file
        self._cut_short: LRUCache = LRUCache(maxsize=limits.libraries_in_memory)  # library -> a lost render's note
        self._lock = threading.Lock()
        self.memory = CudaMemoryManager(engine.device)
        if getattr(engine, "prefix", None) is not None:  # a crowded GPU drops the prefix cache first
            self.memory.releasers.append(engine.prefix.clear)
        quota = limits.storage_quota_bytes
        self.quota = StorageQuota(self.profiles_root, quota) if quota > 0 else None
        if self.quota is not None:
            self.quota.recount()  # at start-up, so the count is right after a restart or other writers
        self._next_expiry = 0.0
        self._expire_if_due()

    # ---- libraries ------------------------------------------------------------------------
    def library(self, key: str | None) -> ProfileStore:
        """The visitor's own profile store (or the shared one when configured)."""
        if self.shared:
            folder = SHARED
        else:
            if not isinstance(key, str) or not LIBRARY_KEY.fullmatch(key):
                raise ProfileError("this page has no valid library key: reload the page (API callers: the first "
                                   "argument, key, labelled library_key, takes 8-64 letters, digits, '-' or '_')")
            folder = f"visitor-{key}"
        with self._lock:
            store = self._stores.get(folder)
            if store is None:
                try:
                    store = ProfileStore(self.profiles_root / folder, cache_size=self.cache_size,
                                         max_profiles=max(self.limits.voices_per_library, 0) or None,
                                         quota=self.quota)
                except ProfileError as e:  # visitors get the reason, not the server's path
                    cause = e.__cause__
                    if isinstance(cause, OSError) and cause.errno not in NO_SPACE:
                        raise ProfileError(f"the server cannot open your voice library ({cause.strerror}): "
                                           "try again later, or tell whoever runs this demo") from cause
                    raise
                self._stores[folder] = store
            store.touch()  # under the lock: expiry (which holds it) sees this use
        self._expire_if_due()
        return store

    def expire_idle_libraries(self, now: float | None = None) -> list[str]:
        """Delete the visitor libraries (`visitor-*` folders) untouched for `limits.library_idle_days`;
        returns their folder names. Touched: the folder's mtime, which every use renews
        (`ProfileStore.touch`), or for a library open in the LRU its last use. The shared library
        and other folders are never expired. Each is checked and removed holding the studio's lock
        (no request can open it meanwhile; one that holds it already has just touched it), the quota
        and, without waiting, the store's lock (a writer in another process: left for next time)."""
        if self.limits.library_idle_days <= 0:
            return []
        cutoff = (time.time() if now is None else now) - self.limits.library_idle_days * 86400
        removed = []
        try:
            with os.scandir(self.profiles_root) as it:
                entries = [e for e in it
                           if e.name.startswith(("visitor-", ".expired-")) and e.is_dir(follow_symlinks=False)]
        except OSError:  # no profiles root yet
            return []
        for entry in entries:
            leftover = entry.name.startswith(".expired-")  # of an expiry that was killed mid-way
            try:
                if not leftover and entry.stat(follow_symlinks=False).st_mtime > cutoff:
                    continue
                with self._lock:
                    store = self._stores.get(entry.name)
                    if store is not None and store.touched_at > cutoff:
                        continue
                    if remove_library(entry.path, self.quota, idle_since=None if leftover else cutoff):
                        self._stores.pop(entry.name, None)
                        removed.append(entry.name)
            except (OSError, ProfileError) as e:
                log.warning("could not expire the idle voice library %s: %s", entry.path, e)
        if removed:
            log.info("expired %d voice libraries idle for over %g days", len(removed), self.limits.library_idle_days)
        return removed

    def _expire_if_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next_expiry:
                return
            self._next_expiry = now + self.limits.expiry_every_s
        self.expire_idle_libraries()

    def profile_rows(self, key: str | None) -> list[list]:
        return [[p.name, round(p.duration_s, 1), p.transcript, time.strftime("%Y-%m-%d %H:%M", time.localtime(p.created))]
                for p in self.library(key).list()]

    def add_profile(self, key: str | None, name: str, audio: str | Path | bytes,
                    transcript: str | None) -> tuple[VoiceProfile, bool]:
        """See `create_profile`: (profile, whether the transcript was generated). The clip is Mimi-encoded
        now, while its owner waits for the save, not in their first render (where it queued behind
        everyone else's generation)."""
        store = self.library(key)
        profile, generated = create_profile(store, name, audio, transcript, self.transcriber)
        try:
            store.segment(profile.name, encoder=self.engine.encode_reference, encoder_id=self.engine.codec_id)
        except Exception as e:  # the profile is saved; the first render tries again and reports it
            log.warning("could not encode the new voice %r now: %s", profile.name, e)
        return profile, generated

    def profile_names(self, key: str | None) -> list[str]:
        return [p.name for p in self.library(key).list()]

    # ---- scripts --------------------------------------------------------------------------
    def parse(self, script: str) -> list[ScriptLine]:
        if not isinstance(script, str):
            raise ScriptError("script: write the script as text, one `Name: line` per line "
                              f"(got {'nothing' if script is None else type(script).__name__})")
        if len(script) > self.limits.max_script_chars:
            raise ScriptError(f"the script is longer than {self.limits.max_script_chars} characters: split it up")
        return parse_script(script, max_lines=self.limits.max_script_lines,
                            max_chars_per_line=self.limits.max_line_chars)

    def default_voices(self, key: str | None, script: str) -> dict[str, str | None]:
        """Speaker -> profile of the same name (case-insensitive), else None (no reference voice)."""
        names = speakers(self.parse(script))
        voices, _ = resolve_voices(self.library(key), names)
        return {name: voices.get(name) for name in names}

    def voices_for(self, key: str | None, script: str, chosen: Mapping[str, str | None] | None) -> dict[str, str | None]:
        """Every script speaker -> a profile: the one `chosen` for it (None, "" or "(none)": no
        reference voice), else the profile of the same name, else None. Entries of `chosen` for
        speakers the script does not have are ignored. Not checked yet: `check_voices` (after
        `follow_voices`, where a rendering's renamed voices are followed) says which is unknown."""
        voices = self.default_voices(key, script)
        chosen = {speaker_key(str(k)): v for k, v in (chosen or {}).items()}
        for speaker in voices:
            if speaker_key(speaker) in chosen:
                voices[speaker] = chosen[speaker_key(speaker)]
        return voices

    def check_voices(self, key: str | None, voices: Mapping[str, str | None]) -> dict[str, str | None]:
        """Re-validate a speaker -> profile mapping that came from the browser: ProfileError naming
        the speaker whose profile is not in the library."""
        given = {str(k): None if v in (None, "", NO_VOICE) else v for k, v in voices.items()}
        try:
            return resolve_voices(self.library(key), given, given)[0]
        except ProfileError as e:  # the speaker is named by resolve_voices; the argument here
            raise ProfileError(f"mapping: {e}") from None

    @staticmethod
    def visitor(key) -> str | None:
        """Who a generation counts against in the scheduler's per-visitor share: the library key, which
        names one browser even with a shared library (the methods check the key itself)."""
        return f"key-{key}" if isinstance(key, str) else None

    def renderer(self, key: str | None) -> ScriptRenderer:
        store = self.library(key)
        source = functools.partial(store.segment, encoder=self.engine.encode_reference, encoder_id=self.engine.codec_id)
        # with a scheduler its loop does the memory housekeeping once per step, not each line per frame
        on_frame = None if self.engine.scheduler is not None else self.memory.step
        return ScriptRenderer(self.engine, source, on_frame=on_frame, transcriber=self.transcriber)

    @_as_visitor
    def render(self, key, script: str, voices: Mapping[str, str | None], config: RenderConfig,
               progress: Callable | None = None, cancel: Callable[[], bool] | None = None,
               on_clip: Callable | None = None) -> RenderResult:
        if config.max_line_ms > self.limits.max_line_s * 1000:
            raise CsmError(f"max length per line is {self.limits.max_line_s:g} s on this server")
        lines = self.parse(script)
        voices = self.check_voices(key, voices)
        store = self.library(key)
        used = {name: store.get(name).audio_sha256 for name in voices.values() if name}  # before: a rename may come
        result = self.renderer(key).render(lines, voices, config, progress, cancel, on_clip)
        result.voice_audio = used
        return result

    @_as_visitor
    def rerender(self, key, result: RenderResult, line_number: int | None, voices, seed: int | None = None,
                 progress=None, cancel=None) -> RenderResult:
        numbers = ", ".join(str(c.line.number) for c in result.clips)
        if line_number is None:
            raise ScriptError(f"enter the number of the script line to regenerate; rendered script lines are: {numbers}")
        index = next((i for i, c in enumerate(result.clips) if c.line.number == line_number), None)
        if index is None:
            raise ScriptError(f"there is no rendered script line {line_number} to regenerate; "
                              f"rendered script lines are: {numbers}")
        voices, result = self.follow_voices(key, voices, result)
        return self.renderer(key).rerender_line(result, index, self.check_voices(key, voices), seed, progress, cancel)

    # ---- one line of a rendering: takes, text, pause (`row`: 0-based clip index) ----------------
    def _row(self, result: RenderResult | None, row) -> int:
        if result is None:
            raise ScriptError("render the script first: then each line can get new takes, new text or a pause")
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < len(result.clips):
            raise ScriptError(f"there is no line {row if not isinstance(row, int) else row + 1} in the last rendering; "
                              f"its lines are 1 to {len(result.clips)}")
        return row

    def _line_voices(self, key, voices, result: RenderResult) -> tuple[dict, RenderResult]:
        voices, result = self.follow_voices(key, voices or {c.line.speaker: c.profile for c in result.clips}, result)
        return self.check_voices(key, voices), result

    @_as_visitor
    def new_takes(self, key, result: RenderResult, row: int, voices, n: int = 1, seed: int | None = None,
                  progress=None, cancel=None) -> RenderResult:
        """`n` more candidates of line `row` in one batch (take t of `seed`: seed + t); the best is chosen."""
        row = self._row(result, row)
        voices, result = self._line_voices(key, voices, result)
        seeds = None if seed is None else [seed + t for t in range(n)]
        return self.renderer(key).new_takes(result, row, voices, n, seeds, progress, cancel)

    @_as_visitor
    def edit_line(self, key, result: RenderResult, row: int, text: str, voices, progress=None,
                  cancel=None) -> RenderResult:
        """Line `row` said with new `text` (same speaker and pause), with fresh takes; in conversational
        mode the later lines that heard it are listed in the result's `stale`."""
        row = self._row(result, row)
        if not isinstance(text, str) or not text.strip():
            raise ScriptError(f"text of line {row + 1}: write what {result.clips[row].line.speaker} should say")
        if len(text) > self.limits.max_line_chars:
            raise ScriptError(f"text of line {row + 1}: {len(text)} characters, the limit is "
                              f"{self.limits.max_line_chars}")
        voices, result = self._line_voices(key, voices, result)
        return self.renderer(key).rerender_line(result, row, voices, None, progress, cancel, text=text)

    @_as_visitor
    def rerender_stale(self, key, result: RenderResult, voices, progress=None, cancel=None) -> RenderResult:
        """Re-render, in order, the lines that heard a line which changed since (`result.stale`)."""
        self.library(key)  # the key is checked first
        if result is None or not result.stale:
            raise ScriptError("no line needs re-rendering: every line heard the lines before it as they are now")
        voices, result = self._line_voices(key, voices, result)
        renderer = self.renderer(key)
        while result.stale:
            result = renderer.rerender_line(result, min(result.stale), voices, None, progress, cancel)
        return result

    def choose_take(self, result: RenderResult, row: int, take: int) -> RenderResult:
        """Take `take` (0-based) of line `row` kept; refused in the page's and the API's 1-based words."""
        row = self._row(result, row)
        n = len(result.candidates(row))
        if not isinstance(take, bool) and isinstance(take, int) and not 0 <= take < n:
            have = "only take 1" if n == 1 else f"takes 1 to {n}"
            raise ScriptError(f"take: line {row + 1} has {have}, not {take + 1}")
        try:
            return result.choose_take(row, take)
        except ValueError as e:
            raise ScriptError(f"take: {e}") from None

    def set_pause(self, result: RenderResult, row: int, seconds: float | None) -> RenderResult:
        """The silence before line `row`, in seconds (None: the script's default); nothing is regenerated."""
        row = self._row(result, row)
        limit_s = MAX_PAUSE_MS / 1000
        if seconds is not None and not (isinstance(seconds, (int, float)) and 0 <= seconds <= limit_s):
            shown = f"{seconds:g}" if isinstance(seconds, (int, float)) else repr(seconds)  # 1e+308, not 309 digits
            raise ScriptError(f"pause before line {row + 1}: give 0 to {limit_s:g} seconds, got {shown}")
        ms = None if seconds is None else round(float(seconds) * 1000)
        try:
            return result.with_pause(row, ms)
        except ValueError as e:
            raise ScriptError(f"pause before line {row + 1}: {e}") from None

    def follow_voices(self, key, voices: Mapping[str, str | None], result: RenderResult | None,
                      ) -> tuple[dict[str, str | None], RenderResult | None]:
        """The speaker -> profile mapping and `result` with voices renamed since the rendering put
        under their new names (found by their audio). A voice of the rendering that is gone raises
        ProfileError; a name the rendering does not know is left for `check_voices` to report."""
        voices = dict(voices)
        if result is None or not result.voice_audio:
            return voices, result
        profiles = self.library(key).list()
        names = {p.name.casefold() for p in profiles} | {p.slug for p in profiles}
        used = {v for v in voices.values() if v} | {c.profile for c in result.clips if c.profile}
        renamed = {}
        for old in sorted(used):
            sha = result.voice_audio.get(old)
            if old.casefold() in names or sha is None:
                continue
            same = [p.name for p in profiles if p.audio_sha256 == sha]
            if not same:  # name it by its newest name (renames add names at the end)
                newest = [name for name, h in result.voice_audio.items() if h == sha][-1]
                raise ProfileError(f"the voice {newest!r} of the last rendering is no longer in your library: "
                                   "render the script again (or add the voice back) first")
            renamed[old] = same[0]
        if not renamed:
            return voices, result
        voices = {k: renamed.get(v, v) if v else v for k, v in voices.items()}
        clips = [replace(c, profile=renamed.get(c.profile, c.profile)) if c.profile else c for c in result.clips]
        # old names stay known, so a mapping that still says "Bob" is followed again next time
        audio = {**result.voice_audio, **{new: result.voice_audio[old] for old, new in renamed.items()}}
        return voices, replace(result, clips=clips, voice_audio=audio)

    # ---- projects -------------------------------------------------------------------------
    def save_project(self, key, script: str, voices: Mapping[str, str | None], config: RenderConfig,
                     result: RenderResult | None = None) -> Path:
        """The script, its voices (with their audio), settings and `result` as a fresh `.csmproj` file."""
        voices, result = self.follow_voices(key, voices, result)
        # named as the zip of its rendering is (the first line's words and the time), or after the script's
        # first line when nothing was rendered: every project used to download as "project.csmproj"
        first = next((ln.strip() for ln in (script or "").splitlines() if ln.strip() and not ln.strip().startswith("#")), "")
        name = bundle_name(None, result) if result is not None and result.clips else bundle_name(first, None)
        path = self.fresh_dir("project-") / f"{name}{PROJECT_SUFFIX}"
        return save_project(path, script or "", self.check_voices(key, voices), config, result,
                            store=self.library(key))

    def open_project(self, key, path: str | Path) -> Project:
        """A `.csmproj` checked (file, then this server's script limit), then its voices imported into
        the visitor's library (reused or renamed on collisions: see project.py). Settings beyond the
        Script tab's controls (max length per line, top-k, pause, temperature) are brought within
        them, with a note."""
        checked = read_project(path, max_render_s=self.limits.max_open_render_s)
        if len(checked.script) > self.limits.max_script_chars:
            raise ScriptError(f"the project's script is longer than {self.limits.max_script_chars} characters, "
                              "this server's limit: open it with the command line instead")
        store = self.library(key)
        project = import_project(checked, store)
        if project.result is not None:  # so a voice renamed later is still found (follow_voices)
            used = {c.profile for c in project.result.clips if c.profile} | {v for v in project.voices.values() if v}
            project.result.voice_audio = {name: store.get(name).audio_sha256 for name in used}
        c, lim = project.config, self.limits
        for setting, value, bounded, label in (
                ("max_line_ms", c.max_line_ms, min(max(c.max_line_ms, lim.min_line_s * 1000), lim.max_line_s * 1000),
                 "max length per line"),
                ("topk", c.topk, min(c.topk, lim.max_topk), "top-k"),
                ("pause_ms", c.pause_ms, min(c.pause_ms, lim.max_pause_ms), "pause between lines"),
                ("temperature", c.temperature, min(max(c.temperature, lim.temperature[0]), lim.temperature[1]),
                 "temperature")):
            if bounded != value:
                project.config = replace(project.config, **{setting: bounded})
                project.notes.append(f"{label} changed from {_shown(setting, value)} to {_shown(setting, bounded)} "
                                     "(this server's limit)")
        return project

    def browser_secret(self) -> str:
        """The key that encrypts what this app keeps in visitors' browsers (their library key, drafts).

        Kept beside the libraries (`.browser-secret`, owner-only) so a restart can still read what
        browsers saved before it: Gradio's default, a new random key per start, would cut every
        visitor off from their voice library at each restart."""
        path = self.profiles_root / ".browser-secret"
        with disk_full_errors(CsmError):
            self.profiles_root.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                secret = path.read_text(encoding="ascii").strip()
                if len(secret) >= 32:
                    return secret
                raise CsmError(f"{path} holds no usable secret: delete it (visitors' saved pages then start "
                               "afresh) and start again") from None
            secret = secrets.token_urlsafe(32)
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(secret + "\n")
        return secret

    # ---- the last rendering of each library -----------------------------------------------
    def remember(self, key, script: str, voices: Mapping[str, str | None], config: RenderConfig,
                 result: RenderResult) -> None:
        """Keep `result` (with its script, voices and settings) as this library's last rendering, so a
        reloaded page can reopen it: one per library, in memory, `limits.libraries_in_memory` at most."""
        folder = self._folder(key)
        with self._lock:
            self._last[folder] = (script, dict(voices), config, result)
            self._cut_short.pop(folder, None)

    def cut_short(self, key, lines_done: int, lines: int) -> None:
        """A render of this library ended unfinished without a Cancel (its page closed or reloaded, an API
        caller's cancel): its lines are lost, and a reopen says so instead of only "no rendering"."""
        when, folder = time.strftime("%H:%M"), self._folder(key)  # the folder first: library() takes the lock
        with self._lock:
            self._cut_short[folder] = (
                f"the render started at {when} was stopped when its page was closed or reloaded "
                f"({lines_done} of {lines} line{'' if lines == 1 else 's'} done), so it was not kept")

    def cut_short_note(self, key) -> str | None:
        """What `cut_short` said of this library's last unfinished render, if it came after its last rendering."""
        folder = self._folder(key)
        with self._lock:
            return self._cut_short.get(folder)

    def remember_audio(self, key, path: str | Path) -> None:
        """`path` (a fresh output file) as this library's last rendered audio, for the watermark check."""
        folder = self._folder(key)
        with self._lock:
            self._last_audio[folder] = Path(path)

    def last_audio(self, key) -> Path | None:
        """This library's last rendered dialogue or utterance, while its file is kept (an hour)."""
        folder = self._folder(key)
        with self._lock:
            path = self._last_audio.get(folder)
        return path if path is not None and path.is_file() else None

    def last_rendering(self, key) -> tuple[str, dict, RenderConfig, RenderResult] | None:
        folder = self._folder(key)
        with self._lock:
            return self._last.get(folder)

    def _folder(self, key) -> str:
        self.library(key)  # checks the key
        return SHARED if self.shared else f"visitor-{key}"

    def fresh_dir(self, prefix: str) -> Path:
        """A new private folder for one response's files (folders older than an hour are pruned)."""
        self._prune_outputs()
        with disk_full_errors(CsmError):
            return Path(tempfile.mkdtemp(prefix=prefix, dir=self.outputs_root))

    def write_outputs(self, result: RenderResult, title: str | None = None) -> dict[str, Path]:
        """Dialogue (WAV, FLAC, MP3), per-speaker stems, clips, manifest (JSON, CSV), SRT subtitles and
        all of them in one zip (key "zip", named after `title` or the first line, and the time) in a
        fresh folder. On a full disk: CsmError, and no partial folder is left."""

        def write(folder: Path) -> dict[str, Path]:
            paths = result.save(folder, formats=("wav", "flac", "mp3"), stems=True)
            name = f"{bundle_name(title, result)}.zip"
            paths["zip"] = zip_files(folder / name, folder, paths.values(), top=name[:-4])
            return paths

        return self._write_fresh("render-", write)

    def write_clip(self, audio: torch.Tensor, stem: str = "clip") -> Path:
        return self._write_fresh("say-", lambda folder: save_audio(folder / f"{stem}.wav", audio))

    def _write_fresh(self, prefix: str, write: Callable[[Path], object]):
        folder = self.fresh_dir(prefix)
        try:
            with disk_full_errors(CsmError):
                return write(folder)
        except sf.SoundFileError as e:  # encoding failed (save_audio writes the bytes itself)
            shutil.rmtree(folder, ignore_errors=True)
            raise CsmError(f"could not encode the audio files ({e}); try again, or report this") from e
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _prune_outputs(self, max_age_s: float = 3600) -> None:
        now = time.time()
        for entry in self.outputs_root.iterdir():
            try:
                if entry.is_dir() and now - entry.stat().st_mtime > max_age_s:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                pass

    def check_watermark(self, path: str | Path) -> dict:
        """Does this audio file carry this deployment's watermark key? (silentcipher, cheap mode)

        Only a few seconds of the file are decoded, read from it without loading the rest (see
        `Watermarker.detect_spans`), so any accepted upload is checked in bounded time and memory."""
        from .audio import open_upload_spans

        if self.engine.watermarker is None:
            raise CsmError("this deployment runs without a watermark model, so it cannot check for one")
        with open_upload_spans(path) as (length, read):
            return self.engine.watermarker.detect_spans(length, read, SAMPLE_RATE)

    def context_rows(self, result: RenderResult) -> list[list]:
        """Per line: window positions taken by context, what was kept and what was dropped."""
        window = self.engine.config.max_seq_len
        return [[m["line"], m["speaker"], f"{m['context_positions']} / {window}", ", ".join(m["context"]) or "-",
                 ", ".join(m["dropped"]) or "-"] for m in result.manifest()]

    # ---- status ---------------------------------------------------------------------------
    def status(self, key: str | None) -> dict:
        info = vars(self.engine.info).copy()
        try:
            info["profile_cache"] = self.library(key).stats()
        except ProfileError:
            info["profile_cache"] = None
        info["memory"] = self.memory.stats()
        with self._lock:
            info["libraries"] = {"open": len(self._stores), "max": self._stores.maxsize}
        if self.engine.device.type == "cuda":
            info["gpu_allocated_mb"] = round(torch.cuda.memory_allocated(self.engine.device) / 2**20)
            info["gpu_reserved_mb"] = round(torch.cuda.memory_reserved(self.engine.device) / 2**20)
        info["library"] = "shared" if self.shared else "private to this browser"
        if self.engine.scheduler is not None:
            info["scheduler"] = self.engine.scheduler.stats()
        prefix = getattr(self.engine, "prefix", None)
        if prefix is not None and prefix.enabled:
            info["prefix_cache"] = {**prefix.stats(), "max_mb": prefix.max_bytes >> 20}
        return info
