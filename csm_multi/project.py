"""Projects: a script, its voices, its settings and its last rendering as one portable `.csmproj` file.

A project is a zip of:

    project.json              {"schema": 1, script, voices (speaker -> profile or null), config
                              (RenderConfig fields), profiles [{name, file, audio_sha256, transcript}],
                              render: null | {config, sample_rate, lines: manifest rows + audio, codes,
                              pause_before_ms (the line's own pause: null = the default)}}
    profiles/<slug>.csmvoice  each voice used, exactly as `ProfileStore.export` writes it
    clips/NNN.wav, NNN.npy    each rendered line: 24 kHz 16-bit PCM, and its (K, T) Mimi codes (uint16)

Of a line rendered with several takes only the chosen one is saved (its score with it; the row's
`scores` list them all for reference): an opened project has one take per line, numbered 0.
Projects written before pauses and takes existed open with default pauses and unscored clips.

`read_project` checks a file as untrusted input and touches nothing: member names from a fixed
pattern (no paths to escape through), sizes bounded before and while reading, every field typed,
codes consistent with their audio. `import_project` then brings the voices into a store: a profile
with the same audio (SHA-256 of its PCM) and transcript is reused whatever its name, otherwise the
voice is imported under its own name or, if that is taken, "Name (2)", "Name (3)", ...; the speaker
map and the clips follow the renames. A failed import removes the profiles it added.
Knows no model and no UI.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from .config import FRAME_MS, SAMPLE_RATE, SAMPLES_PER_FRAME
from .errors import AudioInputError, CsmError, ProfileError, kind_words, value_words
from .profiles import (EXPORT_SUFFIX, MAX_IMPORT_BYTES, MAX_NAME_CHARS, ProfileStore, clean_name, looks_like,
                       quoted, read_zip_member, slugify)
from .render import Clip, RenderConfig, RenderResult
from .script import MAX_PAUSE_MS, ScriptLine
from .takes import TakeScore

PROJECT_SUFFIX = ".csmproj"
SCHEMA = 1
PROJECT_FILE = "project.json"
CODEBOOK_SIZE = 2048  # Mimi codes per codebook
MAX_PROJECT_BYTES = 256 * 2**20  # the whole file
MAX_UNPACKED_BYTES = 512 * 2**20  # all members together, uncompressed
MAX_JSON_BYTES = 4 * 2**20
MAX_CLIP_WAV_BYTES = 32 * 2**20  # about 11 minutes of 24 kHz 16-bit audio
MAX_CODES_BYTES = 4 * 2**20
MAX_PROFILES = 64
MAX_CLIPS = 1000
MAX_SPEAKERS = 200  # a voice per speaker: a script has at most 200 lines
_MEMBER = re.compile(r"project\.json|profiles/[a-z0-9][a-z0-9_-]{0,63}\.csmvoice|clips/\d{3,4}\.(?:wav|npy)")
_LIMITS = {".json": MAX_JSON_BYTES, ".csmvoice": MAX_IMPORT_BYTES, ".wav": MAX_CLIP_WAV_BYTES,
           ".npy": MAX_CODES_BYTES}


class ProjectError(CsmError):
    """A project file is unreadable, malformed or unsafe, or could not be written."""


@dataclass
class Project:
    """A loaded project. `voices` and the clips' profiles name profiles of the store it was imported
    into; `imported` lists the profiles it added, `renamed` maps project names that changed."""

    script: str
    voices: dict[str, str | None]
    config: RenderConfig
    result: RenderResult | None
    imported: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class ProjectFile:
    """A checked project file, not yet imported: `profiles` maps each voice's name in the project to
    (its .csmvoice bytes, its audio SHA-256, its transcript)."""

    label: str
    script: str
    voices: dict[str, str | None]
    config: RenderConfig
    result: RenderResult | None
    profiles: dict[str, tuple[bytes, str, str]]
    notes: list[str] = field(default_factory=list)


# ---- saving --------------------------------------------------------------------------------------
def save_project(path: str | Path, script: str, voices: Mapping[str, str | None], config: RenderConfig,
                 result: RenderResult | None = None, *, store: ProfileStore) -> Path:
    """Write one `.csmproj` file (suffix added if missing) holding everything needed to render
    `script` again elsewhere; returns its path. ProfileError if a voice is not in `store`."""
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(PROJECT_SUFFIX)
    names = [v for v in voices.values() if v] + [c.profile for c in (result.clips if result else []) if c.profile]
    profiles = {p.slug: p for p in map(store.get, names)}
    data = {"schema": SCHEMA, "script": script, "voices": {str(k): v and store.get(v).name for k, v in voices.items()},
            "config": asdict(config), "profiles": [], "render": None}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf, tempfile.TemporaryDirectory() as tmp:
        for profile in profiles.values():
            member = f"profiles/{profile.slug}{EXPORT_SUFFIX}"
            zf.write(store.export(profile.name, Path(tmp) / f"{profile.slug}{EXPORT_SUFFIX}"), member)
            data["profiles"].append({"name": profile.name, "file": member, "audio_sha256": profile.audio_sha256,
                                     "transcript": profile.transcript})
        if result is not None:
            lines = []
            for i, (clip, row) in enumerate(zip(result.clips, result.manifest()), start=1):
                row = {**row, "profile": clip.profile and store.get(clip.profile).name,
                       "audio": f"clips/{i:03d}.wav", "codes": f"clips/{i:03d}.npy",
                       "pause_before_ms": clip.line.pause_before_ms}
                zf.writestr(row["audio"], _wav_bytes(clip.audio))
                zf.writestr(row["codes"], _npy_bytes(clip.codes))
                lines.append(row)
            data["render"] = {"config": asdict(result.config), "sample_rate": result.sample_rate, "lines": lines}
        zf.writestr(PROJECT_FILE, json.dumps(data, indent=2, ensure_ascii=False))
    tmp_name = None
    try:  # a temp file renamed into place: an existing project is never left half-written
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=PROJECT_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp_name, path)
    except OSError as e:
        if tmp_name:
            Path(tmp_name).unlink(missing_ok=True)
        raise ProjectError(f"cannot write {path} ({e.strerror}); check the folder exists and has free space") from e
    return path


def _wav_bytes(audio: torch.Tensor) -> bytes:
    out = io.BytesIO()
    sf.write(out, audio.detach().float().cpu().clamp(-1, 1).numpy(), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return out.getvalue()


def _npy_bytes(codes: torch.Tensor) -> bytes:
    out = io.BytesIO()
    np.save(out, codes.cpu().numpy().astype(np.uint16), allow_pickle=False)
    return out.getvalue()


# ---- loading -------------------------------------------------------------------------------------
def load_project(path: str | Path, *, store: ProfileStore) -> Project:
    """`read_project` then `import_project`: the project with its voices now in `store`."""
    return import_project(read_project(path), store)


def read_project(path: str | Path, max_render_s: float | None = None) -> ProjectFile:
    """Check a `.csmproj` file and read it into memory (ProjectError saying what is wrong).

    A rendering longer than `max_render_s` seconds (counted from its 16-bit WAV sizes, before any
    is decoded) is left out, with a note: decoded, a rendering takes twice its WAV bytes, and its
    dialogue and stems as much again, so a server bounds what one upload may make it hold."""
    path = Path(path)
    label = path.name
    members = _read_zip(path, label)
    if PROJECT_FILE not in members:
        raise ProjectError(f"{label} has no {PROJECT_FILE}: it is not a csm-multi project")
    try:
        data = json.loads(members[PROJECT_FILE].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProjectError(f"{label}/{PROJECT_FILE} is not valid JSON ({e})") from e
    where = f"{label}/{PROJECT_FILE}"
    if not isinstance(data, dict):
        raise ProjectError(f"{where} must hold a JSON object")
    if data.get("schema") != SCHEMA:
        raise ProjectError(f"{label} has project schema {data.get('schema')!r}; this version reads schema {SCHEMA} "
                           "(upgrade csm_multi to open newer projects)")
    script = _get(data, "script", str, where)
    voices = _get(data, "voices", dict, where)
    if not all(isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in voices.items()):
        raise ProjectError(f"{where}: 'voices' must map speaker names to profile names or null")
    if len(voices) > MAX_SPEAKERS:
        raise ProjectError(f"{where}: the voice map has {len(voices)} speakers; a project has at most {MAX_SPEAKERS} "
                           "(one per speaker of its script)")
    profiles = {}
    entries = _get(data, "profiles", list, where)
    if len(entries) > MAX_PROFILES:
        raise ProjectError(f"{label} carries {len(entries)} voices; a project holds at most {MAX_PROFILES}")
    for entry in entries:
        if not isinstance(entry, dict):
            raise ProjectError(f"{where}: each entry of 'profiles' must be an object")
        name, member = _get(entry, "name", str, where), _get(entry, "file", str, where)
        try:  # checked here, not only when imported: a voice matched to one of the library's is never imported
            clean_name(name)
        except ProfileError as e:
            raise ProjectError(f"{where}: the project carries a voice with an unusable name: {e}") from e
        if member not in members or not member.startswith("profiles/") or name in profiles:
            raise ProjectError(f"{where}: voice {quoted(name)} names a missing or repeated file {quoted(member)}")
        profiles[name] = (members[member], _get(entry, "audio_sha256", str, where),
                          _get(entry, "transcript", str, where))
    missing = {v for v in voices.values() if v} - set(profiles)
    if missing:
        raise ProjectError(f"{where}: the voice map uses {', '.join(sorted(missing))} but the project carries no such "
                           "voice; save the project again")
    result, notes = None, []
    if (render := data.get("render")) is not None:
        seconds = sum(map(_wav_frames, (b for n, b in members.items() if n.endswith(".wav")))) / SAMPLE_RATE
        if max_render_s is not None and seconds > max_render_s:
            notes.append(f"its rendering ({seconds / 60:.0f} min) is longer than the {max_render_s / 60:g} min this "
                         "server opens, so it was left out: render the script again, or open the project with the "
                         "command line (`project open`)")
        else:
            result = _read_render(render, members, profiles, where)
    return ProjectFile(label, script, dict(voices), _config(data.get("config"), where), result, profiles, notes)


def import_project(project: ProjectFile, store: ProfileStore) -> Project:
    """Bring a checked project's voices into `store` (reused, imported, or renamed; see the module
    docstring) and return it with names remapped to the store's."""
    local: dict[str, str] = {}
    imported: list[str] = []
    known = store.list()  # the voice cap first, before anything is imported (each import checks the quota)
    have = {(p.audio_sha256, p.transcript) for p in known}
    new = {(sha, " ".join(t.split())) for _, sha, t in project.profiles.values()} - have
    try:
        store.check_room(len(new), held=len(known))
    except ProfileError as e:
        raise ProjectError(f"{project.label} cannot be opened: {e}") from e
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, (voice, sha, transcript) in project.profiles.items():
                known = store.list()
                same = [p for p in known if p.audio_sha256 == sha and p.transcript == " ".join(transcript.split())]
                same.sort(key=lambda p: p.name.casefold() != name.casefold())  # the same name first
                if same:
                    local[name] = same[0].name
                    continue
                path = Path(tmp) / f"voice-{len(local)}{EXPORT_SUFFIX}"
                path.write_bytes(voice)
                try:
                    local[name] = store.import_file(path, _free_name(name, known)).name
                except (ProfileError, AudioInputError) as e:
                    raise ProjectError(f"{project.label}: its voice {name!r} cannot be imported: {e}") from e
                imported.append(local[name])
    except BaseException:
        for added in imported:  # leave the store as it was
            store.delete(added)
        raise
    renamed = {a: b for a, b in local.items() if a != b}
    notes = [f"the project's voice {quoted(a)} is {quoted(b)} in your library "
             f"({'the same voice' if b not in imported else 'another voice already had that name'})"
             for a, b in renamed.items()]
    voices = {k: v and local[v] for k, v in project.voices.items()}
    result = project.result
    if result is not None:
        result = replace(result, clips=[replace(c, profile=c.profile and local[c.profile]) for c in result.clips])
    return Project(project.script, voices, project.config, result, imported, renamed, [*project.notes, *notes])


def _free_name(name: str, known) -> str:
    """`name` if no profile has it (or its slug), else "name (2)", "name (3)", ..."""
    taken = {looks_like(p.name) for p in known} | {p.slug for p in known}
    try:
        base = clean_name(name)
    except ProfileError as e:
        raise ProjectError(f"the project carries a voice with an unusable name: {e}") from e
    candidate, n = base, 1
    while looks_like(candidate) in taken or slugify(candidate) in taken:
        n += 1
        suffix = f" ({n})"
        candidate = base[:MAX_NAME_CHARS - len(suffix)].rstrip() + suffix
    return candidate


def _read_zip(path: Path, label: str) -> dict[str, bytes]:
    """Every member of a project zip, after checking names, count and sizes (declared and actual)."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ProjectError(f"cannot open {label} ({e.strerror})") from e
    if size > MAX_PROJECT_BYTES:
        raise ProjectError(f"{label} is {size / 2**20:.0f} MB; a project file is at most {MAX_PROJECT_BYTES >> 20} MB")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > 1 + MAX_PROFILES + 2 * MAX_CLIPS:
                raise ProjectError(f"{label} holds {len(infos)} files, more than any project can")
            names = [i.filename for i in infos]
            bad = next((n for n in names if not _MEMBER.fullmatch(n)), None)
            if bad is not None:
                raise ProjectError(f"{label} holds an unexpected or unsafe member {bad!r}; refusing to open it")
            if len(set(names)) != len(names):
                raise ProjectError(f"{label} holds a member twice; refusing to open it")
            if sum(i.file_size for i in infos) > MAX_UNPACKED_BYTES:
                raise ProjectError(f"{label} unpacks to more than {MAX_UNPACKED_BYTES >> 20} MB")
            return {info.filename: read_zip_member(zf, info, _LIMITS[Path(info.filename).suffix], label, ProjectError)
                    for info in infos}
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as e:
        raise ProjectError(f"{label} is not a readable {PROJECT_SUFFIX} file ({e}); save the project again") from e
    except OSError as e:
        raise ProjectError(f"cannot read {label} ({e})") from e


def _get(data: dict, key: str, kind: type | tuple, where: str):
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ProjectError(f"{where}: field {key!r} must be {kind_words(kind)}, found {value_words(value)}; "
                           "save the project again (or correct that field)")
    return value


_CONFIG_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "int | None": (int, type(None))}


def _config(data: object, where: str) -> RenderConfig:
    """RenderConfig from its saved fields: missing ones take their defaults, unknown ones are ignored."""
    if not isinstance(data, dict):
        raise ProjectError(f"{where}: 'config' must be an object of render settings")
    values = {}
    for f in fields(RenderConfig):
        if f.name in data:
            value = data[f.name]
            ok = isinstance(value, _CONFIG_TYPES[f.type]) and (isinstance(value, bool) == (f.type == "bool"))
            if ok and isinstance(value, float):
                ok = math.isfinite(value)
            if ok and isinstance(value, int) and not isinstance(value, bool):
                ok = abs(value) < 2**63
            if not ok:
                want = kind_words(_CONFIG_TYPES[f.type]) + (" below 2^63" if "int" in f.type else "")
                raise ProjectError(f"{where}: setting {f.name!r} must be {want}, found {value_words(value)}; "
                                   "save the project again (or correct that setting)")
            values[f.name] = value
    try:
        config = RenderConfig(**values)
        config.sampling(0)  # checks temperature, top-k, length
    except ValueError as e:
        raise ProjectError(f"{where}: the render settings are invalid ({e})") from e
    return config


def _read_render(render: object, members: dict[str, bytes], profiles: Mapping, where: str) -> RenderResult:
    if not isinstance(render, dict):
        raise ProjectError(f"{where}: 'render' must be an object or null")
    rows = _get(render, "lines", list, where)
    if render.get("sample_rate") != SAMPLE_RATE:
        raise ProjectError(f"{where}: the rendering must be at {SAMPLE_RATE} Hz")
    if len(rows) > MAX_CLIPS:
        raise ProjectError(f"{where}: the rendering has {len(rows)} lines; at most {MAX_CLIPS}")
    clips = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ProjectError(f"{where}: each rendered line must be an object")
        at = f"{where}: rendered line {i + 1}"
        profile = row.get("profile")
        if profile is not None and profile not in profiles:
            raise ProjectError(f"{at} uses voice {profile!r}, which the project does not carry")
        audio = _clip_audio(members.pop(_get(row, "audio", str, at), None), at)  # its bytes are dropped once decoded
        codes = _clip_codes(members.get(_get(row, "codes", str, at)), at)
        frames = -(-audio.numel() // SAMPLES_PER_FRAME)
        if codes.shape[1] != frames or (clips and codes.shape[0] != clips[0].codes.shape[0]):
            raise ProjectError(f"{at}: its codes {tuple(codes.shape)} do not match its audio ({audio.numel()} samples, "
                               f"{frames} frames) or the other lines' codebooks")
        labels = [_get(row, k, list, at) for k in ("context", "dropped")]
        if not all(isinstance(s, str) for s in labels[0] + labels[1]):
            raise ProjectError(f"{at}: 'context' and 'dropped' must be lists of labels")
        if _get(row, "index", int, at) != i:
            raise ProjectError(f"{at}: lines must be stored in order")
        pause = row.get("pause_before_ms")  # absent from older projects: the default
        if pause is not None and not _whole(pause, 0, MAX_PAUSE_MS):
            raise ProjectError(f"{at}: its pause must be a whole number of ms from 0 to {MAX_PAUSE_MS} or null")
        line = ScriptLine(_get(row, "line", int, at), _get(row, "speaker", str, at), _get(row, "text", str, at), pause)
        clips.append(Clip(index=i, line=line, speaker_id=_get(row, "speaker_id", int, at), profile=profile, audio=audio,
                          codes=codes, seed=_get(row, "seed", int, at), watermarked=_get(row, "watermarked", bool, at),
                          context=labels[0], dropped=labels[1],
                          context_positions=_get(row, "context_positions", int, at),
                          model_text=_get(row, "model_text", str, at),
                          generated_frames=round(_get(row, "generated_s", (int, float), at) * 1000 / FRAME_MS),
                          score=_chosen_score(row, at), context_split=_split(row, at)))
    return RenderResult(clips, _config(render.get("config"), f"{where}: render"))


def _split(row: dict, at: str) -> dict[str, int]:
    """A line's `context_split` (absent from older projects: empty)."""
    split = row.get("context_split") or {}
    if not isinstance(split, dict) or not all(k in ("voices", "lines", "text", "speak") and _whole(v, 0, 10**6)
                                              for k, v in split.items()):
        raise ProjectError(f"{at}: 'context_split' must map voices/lines/text/speak to whole numbers of positions")
    return dict(split)


def _whole(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _chosen_score(row: dict, at: str) -> TakeScore | None:
    """The score of a saved line's chosen take: `scores[take]` of its row (None where not saved)."""
    scores, take = row.get("scores"), row.get("take", 0)
    if scores is None:
        return None
    if not isinstance(scores, list) or not _whole(take, 0, len(scores) - 1):
        raise ProjectError(f"{at}: 'scores' must list its takes' scores and 'take' the chosen one")
    entry = scores[take]
    if entry is None:
        return None
    wer = entry.get("wer") if isinstance(entry, dict) else None
    if (not isinstance(entry, dict) or not (wer is None or _number(wer)) or not _number(entry.get("tail_s"))
            or not isinstance(entry.get("cut_off"), bool) or not isinstance(entry.get("silent", False), bool)):
        raise ProjectError(f"{at}: its take score must hold wer (a number or null), cut_off, tail_s and silent")
    return TakeScore(wer=wer, cut_off=entry["cut_off"], tail_s=entry["tail_s"], silent=entry.get("silent", False))


def _wav_frames(data: bytes) -> int:
    """Samples in a clip's WAV, from its header (its size as 16-bit mono where the header is unreadable)."""
    try:
        return sf.info(io.BytesIO(data)).frames
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        return len(data) // 2


def _clip_audio(data: bytes | None, at: str) -> torch.Tensor:
    if data is None:
        raise ProjectError(f"{at}: its audio file is missing")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32")
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise ProjectError(f"{at}: its audio is unreadable ({e})") from e
    if rate != SAMPLE_RATE or samples.ndim != 1:
        raise ProjectError(f"{at}: its audio must be mono at {SAMPLE_RATE} Hz")
    return torch.from_numpy(samples)


def _clip_codes(data: bytes | None, at: str) -> torch.Tensor:
    if data is None:
        raise ProjectError(f"{at}: its codes file is missing")
    try:
        codes = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ProjectError(f"{at}: its codes are unreadable ({e})") from e
    if not isinstance(codes, np.ndarray) or codes.ndim != 2 or codes.dtype.kind not in "iu" or codes.shape[0] < 1:
        raise ProjectError(f"{at}: its codes must be a (codebooks, frames) integer array")
    if codes.size and (codes.min() < 0 or codes.max() >= CODEBOOK_SIZE):
        raise ProjectError(f"{at}: its codes are outside 0..{CODEBOOK_SIZE - 1}")
    return torch.from_numpy(codes.astype(np.int64))
