"""Named voice profiles on disk, and a bounded LRU of their Mimi codes.

One job: keep reference voices (a prepared clip + its transcript) as named profiles and hand them
out as CSM context `Segment`s. Knows no model: `codes()` takes an encoder callable
((S,) float 24 kHz -> (K, T) codes) and an id naming it, so tests pass a fake.

Layout, one folder per profile under `root`:

    <root>/.lock                      advisory lock file (fcntl.flock) taken around every mutation
    <root>/<slug>/profile.json        metadata, written last (its presence means "complete")
    <root>/<slug>/reference.wav       prepared reference: 24 kHz mono 16-bit PCM
    <root>/<slug>/codes-<encoder>.pt  persisted codes {"codes", "audio_sha256", "encoder_id"}

Durability: every file is written to a temp file in its folder, fsynced and `os.replace`d; a new
profile is built in `<root>/.tmp-<random>/` and renamed into place only when complete, so readers
(which take no lock) never see half a profile and a writer killed mid-save leaves only a `.tmp-*`
leftover. Every `.tmp-*` entry is made while holding the lock, so the next `ProfileStore` opened
on the folder (holding the lock) removes all of them at once. Two processes mutating one store
serialize on the lock and lose nothing. A full disk (ENOSPC, EDQUOT) raises ProfileError saying
so, and leaves the store as it was. On storage without working `flock`
(Hugging Face storage buckets and other FUSE/network mounts, Windows) the store logs a warning
and runs unlocked: concurrent writers are then last-writer-wins, and only `.tmp-*` leftovers
older than STALE_TMP_S are removed.

Limits (a public link must not fill the server's disk; the app's `Studio` sets them, the command
line's own store has none: it is your disk, and a full one is already reported as such):
`max_profiles` caps the voices of one store (`create`, `import_file`, and so project import);
`StorageQuota` is a byte budget for every store under one folder (the app's profiles root), checked
before anything is written against an estimate of what will be (`_disk_bytes` of the clip, JSON,
expected codes and folders). A store with a quota makes its folder on its first write, so a
visitor who only looks costs no disk and a full server makes no new folders. A refusal is a
ProfileError naming the limit, the numbers and what to do, raised before the first byte is written.

Schema (`profile.json`): 1 = {"schema": 1, name, slug, transcript, speaker_id, created, updated,
duration_s, audio_sha256}. 0 = the pre-release format {"name", "transcript", "speaker"} with no
"schema" key; it still loads (timestamps from the file's mtime, duration and hash from the audio)
and is rewritten as schema 1 by the next change to that profile.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from cachetools import LRUCache

from .audio import from_array, load_audio, load_upload, prepare_reference
from .config import SAMPLE_RATE
from .errors import AudioInputError, ProfileError, kind_words, value_words
from .frames import Segment
from .script import drop_controls, speaker_key, unreadable

try:
    import fcntl
except ImportError:  # Windows: no flock; the store runs unlocked (see the module docstring)
    fcntl = None

log = logging.getLogger(__name__)

SCHEMA = 1
PROFILE_FILE = "profile.json"
REFERENCE_FILE = "reference.wav"
EXPORT_SUFFIX = ".csmvoice"
DEFAULT_SPEAKER_IDS = 10  # new profiles get the lowest free id in 0..9
MAX_NAME_CHARS = 100
MAX_SLUG_CHARS = 64
MAX_TRANSCRIPT_CHARS = 5000
MAX_JSON_BYTES = 64 * 1024
MAX_IMPORT_BYTES = 20 * 1024 * 1024  # a whole .csmvoice file
MAX_IMPORT_WAV_BYTES = 16 * 1024 * 1024  # its reference.wav, uncompressed
STALE_TMP_S = 60.0  # without a working lock, a younger `.tmp-*` may belong to a live writer
FS_BLOCK = 4096  # quota estimates count whole blocks (+1 per file), as disks allocate them
CODES_BYTES_PER_S = 32 * 8 * 1000 // 80  # the codes file of a clip: CSM's 32 codebooks of int64, 12.5 frames/s
CODES_FILE_OVERHEAD = 2048  # torch.save's zip container around them (1.7 KB measured)
QUOTA_FILE = ".quota"  # in the quota's root: its lock, holding "<bytes used> <time of the last full count>"
RECOUNT_S = 600.0  # the quota's count is redone from the tree when older than this
NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # errnos of a full disk or quota
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_SLUG_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")  # can disguise a name
_SPACE_CONTROLS = "".join(c for c in map(chr, range(0x86)) if c.isspace() and unicodedata.category(c) == "Cc")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_ENCODER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NAME_RULES = (f"use 1-{MAX_NAME_CHARS} characters with at least one letter or digit, and no '/', '\\', "
               "control or invalid characters (unpaired surrogates) or Windows device names (CON, PRN, AUX, NUL, "
               "COM1-9, LPT1-9)")

AudioSource = str | Path | bytes | tuple  # a path, file bytes, or (samples, sample_rate)
Encoder = Callable[[torch.Tensor], torch.Tensor]  # (S,) float 24 kHz -> (K, T) codes


@dataclass(frozen=True)
class VoiceProfile:
    """One saved voice. `slug` is its folder name; `schema` the format it was read from."""

    name: str
    slug: str
    transcript: str
    speaker_id: int
    created: float
    updated: float
    duration_s: float
    audio_sha256: str
    schema: int = SCHEMA

    def to_json(self) -> dict:
        return {**asdict(self), "schema": SCHEMA}


# ---- names -------------------------------------------------------------------------------------
def quoted(text, limit: int = 60) -> str:
    """`text` in single quotes for a message, as typed, except that characters that do not print
    (controls, bidi and zero-width marks, lone surrogates) show as escapes (`\\u202e`); cut to `limit`
    characters. (Not repr: it doubles every backslash, so `C:\\Ann` read as `C:\\\\Ann`.)"""
    text = str(text)
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[:limit])
    return f"'{shown}'" if len(text) <= limit else f"'{shown}'... ({len(text):,} characters)"


def clean_name(name: str) -> str:
    """Validate a display name; returns it stripped, inner whitespace collapsed. ProfileError if bad."""
    if not isinstance(name, str):
        raise ProfileError(f"a profile name must be text, got {type(name).__name__}")
    if any(c in "/\\" or c in _BIDI_CONTROLS or unreadable(c) for c in name):
        raise ProfileError(f"{quoted(name)} is not a valid profile name: {_NAME_RULES}")
    name = " ".join(name.split())
    if not name or name in (".", "..") or len(name) > MAX_NAME_CHARS or not any(c.isalnum() for c in name):
        raise ProfileError(f"{quoted(name)} is not a valid profile name: {_NAME_RULES}")
    if name.split(".")[0].strip().upper() in _WINDOWS_RESERVED:
        raise ProfileError(f"{quoted(name)} is a reserved device name on Windows: {_NAME_RULES}")
    return name


def looks_like(name: str) -> str:
    """What a name looks like on the page, for telling names apart: without invisible format characters
    (direction marks, zero-width spaces and joiners), in Unicode's compatibility form, case-folded. Two
    names with the same value cannot be told apart by a reader (a right-to-left mark inside a Hebrew
    name, say), so a library holds only one of them."""
    visible = "".join(c for c in name if unicodedata.category(c) != "Cf")
    return " ".join(unicodedata.normalize("NFKC", visible).casefold().split())


def slugify(name: str) -> str:
    """A valid display name -> its folder name: lowercase ASCII letters, digits, '-' and '_'.

    Accents are dropped ("José" -> "jose"), other characters become '-', runs of '-' collapse,
    the result is at most 64 characters. A name with no ASCII letter or digit ("日本") gets
    "voice-<hash>". Raises ProfileError where the slug is a Windows device name ("con!").
    """
    ascii_name = unicodedata.normalize("NFKD", clean_name(name)).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9_-]", "-", ascii_name))
    slug = slug[:MAX_SLUG_CHARS].strip("-_")
    if not slug:
        slug = "voice-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    if slug.upper() in _WINDOWS_RESERVED:
        raise ProfileError(f"{name!r} would be stored as {slug!r}, a reserved device name on Windows: {_NAME_RULES}")
    return slug


def _encoder_file(encoder_id: str) -> str:
    """encoder_id -> `codes-<id>.pt`; ids that are not plain file names are hashed."""
    if not isinstance(encoder_id, str) or not encoder_id:
        raise ProfileError("encoder_id must be a non-empty string naming the codec (e.g. 'mimi-32')")
    safe = encoder_id if _ENCODER_ID_RE.fullmatch(encoder_id) else hashlib.sha256(encoder_id.encode()).hexdigest()[:16]
    return f"codes-{safe}.pt"


# ---- files -------------------------------------------------------------------------------------
@contextmanager
def disk_full_errors(error: type[Exception] = ProfileError) -> Iterator[None]:
    """Turn ENOSPC / EDQUOT raised inside into `error` with a message that says what to do."""
    try:
        yield
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        raise error("the server's disk is full (no space left on the device), so nothing was saved: "
                    "free some space and try again") from e


def _fsync_dir(folder: Path) -> None:
    with suppress(OSError):  # not every filesystem lets a directory be opened or fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _stage(path: Path, data: bytes) -> str:
    """Write `data` to a fsynced temp file beside `path` and return its name (`path` is untouched)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + path.name, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    tmp = _stage(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _quantize(audio: torch.Tensor) -> np.ndarray:
    """(S,) float -> (S,) int16, the stored form; reading it back as float gives exactly q / 32768."""
    return np.clip(np.round(audio.detach().cpu().numpy().astype(np.float64) * 32768), -32768, 32767).astype(np.int16)


def _pcm_sha256(pcm: np.ndarray) -> str:
    return hashlib.sha256(pcm.astype("<i2").tobytes()).hexdigest()


def _wav_bytes(pcm: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, pcm, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _read_json(path: Path) -> dict:
    with open(path, "rb") as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise ProfileError(f"{path} is larger than {MAX_JSON_BYTES} bytes")
    return _parse_json(raw, str(path))


def _parse_json(raw: bytes, where: str) -> dict:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProfileError(f"{where} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ProfileError(f"{where} must hold a JSON object")
    return data


def _field(data: dict, key: str, kind: type | tuple, where: str):
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProfileError(f"{where}: field {key!r} must be {kind_words(kind)}, found {value_words(value)}")
    return value


# ---- storage limits ----------------------------------------------------------------------------
def _disk_bytes(nbytes: int) -> int:
    """What a file of `nbytes` may take on disk: rounded up to whole blocks, and a block more when
    it fills its last one exactly (a margin)."""
    return (nbytes // FS_BLOCK + 1) * FS_BLOCK


def _tree_bytes(path: Path) -> int:
    """What `path` and everything under it take on disk (0 if it is gone): per entry its allocated
    blocks, at least its size (for filesystems that report no blocks). Symlinks are not followed."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    total, stack = _entry_bytes(st), [path] if stat.S_ISDIR(st.st_mode) else []
    while stack:
        with suppress(OSError), os.scandir(stack.pop()) as entries:  # OSError: removed meanwhile
            for entry in entries:
                with suppress(OSError):
                    total += _entry_bytes(entry.stat(follow_symlinks=False))
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
    return total


def _entry_bytes(st: os.stat_result) -> int:
    return max(getattr(st, "st_blocks", 0) * 512, st.st_size)


def _size_text(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} bytes"


def _cap_message(held: int, adding: int, cap: int) -> str:
    extra = held + adding - cap
    what = "this voice" if adding == 1 else f"these {adding} voices"
    return (f"your voice library holds {held} voice{'s' * (held != 1)} and this server keeps at most {cap} in one "
            f"library, so {what} cannot be added: delete {'one' if extra == 1 else extra} first")


class _Ledger:
    """The quota's count while it is held: `need` refuses what would cross it, `settle` books a change."""

    def __init__(self, quota: StorageQuota, used: int):
        self.quota, self.used, self.pending = quota, used, 0

    def need(self, nbytes: int, reserve: bool = True) -> None:
        """ProfileError unless `nbytes` more fit; else they are reserved until `settle`."""
        if nbytes <= 0:
            return
        limit = self.quota.max_bytes
        if self.used + self.pending + nbytes > limit:
            raise ProfileError(f"the server's voice storage is full ({_size_text(self.used)} of its "
                               f"{_size_text(limit)} in use; this needs {_size_text(nbytes)} more), so nothing "
                               "was saved: delete voices you no longer need, try again later, or tell whoever "
                               "runs this demo")
        if reserve:
            self.pending += nbytes

    def settle(self, delta: int) -> None:
        """Book a measured change (which replaces what `need` reserved for it)."""
        self.used, self.pending = max(0, self.used + delta), 0


class StorageQuota:
    """A byte budget for every store under `root` (the app's profiles folder), checked before writes.

    Usage is what `root`'s tree takes on disk (`_tree_bytes`). It is counted once (`recount`, at
    start-up) and then kept in `<root>/.quota`, read and written under an flock on that file, so
    processes sharing `root` share one number and nobody walks the tree per request: a store
    mutation holds the quota, measures its own folder before and after, and books the difference.
    The count is redone when the file is missing, unreadable or older than `recount_s`, which also
    catches writers that bypass the quota (the command line, a person). Without a working flock
    (see the module docstring) processes may each cross the quota by one save; one process cannot.
    Lock order: the studio's lock, then this, then a store's `.lock`.
    """

    def __init__(self, root: str | Path, max_bytes: int, recount_s: float = RECOUNT_S):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.root = Path(root).resolve()
        self.max_bytes = max_bytes
        self.recount_s = recount_s
        self._mutex = threading.RLock()
        self._active: _Ledger | None = None

    def used(self) -> int:
        """Bytes in use now (from the shared count; no walk unless it is stale)."""
        with self.held() as ledger:
            return ledger.used

    def recount(self) -> int:
        """Walk the whole tree and store the count; returns it."""
        with self.held(recount=True) as ledger:
            return ledger.used

    @contextmanager
    def held(self, recount: bool = False) -> Iterator[_Ledger]:
        """Hold the quota (re-entrant in this thread) and yield its ledger; the count is stored on exit."""
        with self._mutex:
            if self._active is not None:
                yield self._active
                return
            with disk_full_errors():
                self.root.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.root / QUOTA_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    with suppress(OSError):  # FUSE and network mounts: unlocked, as the stores are
                        fcntl.flock(fd, fcntl.LOCK_EX)
                stored = None if recount else self._read(fd)
                if stored is None:
                    self._write(fd, 0, 0.0)  # first, so that the file's own block is in the count
                    stored = _tree_bytes(self.root), time.time()
                self._active = _Ledger(self, stored[0])
                try:
                    yield self._active
                finally:
                    self._write(fd, self._active.used, stored[1])
                    self._active = None
            finally:
                os.close(fd)  # releases the flock

    def _read(self, fd: int) -> tuple[int, float] | None:
        with suppress(OSError, ValueError):
            used, counted = os.pread(fd, 64, 0).decode("ascii").split()
            if 0 <= time.time() - float(counted) < self.recount_s:
                return int(used), float(counted)
        return None

    @staticmethod
    def _write(fd: int, used: int, counted: float) -> None:
        data = f"{used} {counted:.3f}\n".encode("ascii")
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        except OSError as e:  # a count that cannot be kept is dropped, so the next holder recounts
            log.warning("could not store the storage quota's count: %s", e)
            with suppress(OSError):
                os.ftruncate(fd, 0)


def remove_library(folder: str | Path, quota: StorageQuota | None = None, idle_since: float | None = None) -> bool:
    """Delete a whole store folder (a visitor's library), holding `quota` (whose count drops) and
    the store's `.lock` without waiting: False, and nothing removed, if a writer holds it, the
    folder is gone, or (with `idle_since`) its mtime says it was touched after that time."""
    folder = Path(folder)
    with quota.held() if quota is not None else nullcontext() as ledger, disk_full_errors():
        if not folder.is_dir() or folder.is_symlink():
            return False
        fd = None
        if fcntl is not None:
            with suppress(FileNotFoundError):  # no .lock: no writer ever locked it (never create one here)
                fd = os.open(folder / ".lock", os.O_RDWR)
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
                except OSError:  # no working flock: see the module docstring
                    pass
            if idle_since is not None and folder.stat().st_mtime > idle_since:
                return False
            size = _tree_bytes(folder)
            trash = folder.with_name(f".expired-{secrets.token_hex(6)}")
            os.rename(folder, trash)  # gone from view at once (and from the next open); the rest is cleanup
            _fsync_dir(folder.parent)
        finally:
            if fd is not None:
                os.close(fd)
        shutil.rmtree(trash, ignore_errors=True)
        if ledger is not None:
            ledger.settle(_tree_bytes(trash) - size)
    return True


# ---- the cache ---------------------------------------------------------------------------------
class _CountingLRU(LRUCache):
    """`LRUCache` that counts the entries it drops to make room (explicit `pop`s are not counted)."""

    def __init__(self, maxsize: int):
        super().__init__(maxsize=maxsize)
        self.evictions = 0

    def popitem(self):
        item = super().popitem()
        self.evictions += 1
        return item


def resolve_voices(store: ProfileStore, speakers: Iterable[str], given: Mapping[str, str | None] | None = None,
                   notice: Callable[[str], None] | None = None) -> tuple[dict[str, str | None], list[str]]:
    """Script speakers -> profile names: an explicit `given` entry first (None = no reference voice;
    a name is looked up by `find_profile`, ProfileError naming the speaker if unknown), else the profile of the same
    name (case-insensitive). Returns the mapping and the speakers that matched nothing. `notice`
    hears when a given name matched only by its folder name (default: logged)."""
    given = {speaker_key(str(k)): v for k, v in (given or {}).items()}
    known = {speaker_key(p.name): p.name for p in store.list()}
    voices: dict[str, str | None] = {}
    missing: list[str] = []
    for speaker in speakers:
        key = speaker_key(str(speaker))
        if key in given:
            try:
                voices[speaker] = find_profile(store, str(given[key]), notice).name if given[key] else None
            except ProfileError as e:
                raise ProfileError(f"the voice chosen for speaker {speaker!r}: {e}") from None
        elif key in known:
            voices[speaker] = known[key]
        else:
            missing.append(speaker)
    return voices, missing


def find_profile(store: ProfileStore, name: str, notice: Callable[[str], None] | None = None) -> VoiceProfile:
    """`store.get(name)`, announcing through `notice` when only the folder name (slug) matched:
    "Alice" finding "Ålice" is a guess worth saying."""
    found = store.get(name)
    wanted = " ".join(str(name).split())
    if found.name.casefold() != wanted.casefold():
        (notice or log.info)(f"no profile is named {wanted!r}; using {found.name!r}, whose folder name {found.slug!r} "
                             f"is the same (give the exact name to choose it without this note)")
    return found


def _slug_or_none(name: str) -> str | None:
    try:
        return slugify(name)
    except ProfileError:
        return None


class ProfileStore:
    """Voice profiles in folders under `root`, with an LRU of up to `cache_size` encoded references.

    Read methods take no lock (writes are atomic); mutations hold `<root>/.lock`. Methods that take
    a `name` accept a display name or a slug, case-insensitively. `max_profiles` (None: no cap) and
    `quota` are the limits of the module docstring; with a quota, `root` is made by the first write.
    """

    def __init__(self, root: str | Path = "profiles", cache_size: int = 32, *, max_profiles: int | None = None,
                 quota: StorageQuota | None = None):
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        if max_profiles is not None and max_profiles < 1:
            raise ValueError(f"max_profiles must be >= 1 or None, got {max_profiles}")
        if quota is None:
            try:
                with disk_full_errors():
                    Path(root).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ProfileError(f"cannot create the profile folder {root} ({e.strerror})") from e
        self.root = Path(root).resolve()
        self.max_profiles = max_profiles
        self._quota = quota
        self._ledger: _Ledger | None = None  # the quota's, while a mutation holds it
        self.touched_at = time.time()  # last use (see `touch`)
        self._marked_at = 0.0
        self._cache = _CountingLRU(cache_size)
        self._cache_lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._hits = self._misses = self._encodes = 0
        self._mutex = threading.RLock()
        self._lock_depth = 0
        self._lock_fd: int | None = None
        self._warned_unlocked = False
        if self.root.is_dir():
            with self._locked():
                self._clean_stale()

    def touch(self, every_s: float = 60.0) -> None:
        """Mark the store as used now: `touched_at`, and its folder's mtime (what expiry of idle
        libraries reads, also after a restart) at most every `every_s`."""
        self.touched_at = now = time.time()
        if now - self._marked_at >= every_s:
            self._marked_at = now
            with suppress(OSError):  # not made yet (nothing to expire), or a read-only mount
                os.utime(self.root)

    def check_room(self, voices: int = 1, held: int | None = None) -> None:
        """ProfileError if `voices` more profiles would pass `max_profiles`; `held`: how many there are."""
        if self.max_profiles is None or voices <= 0:
            return
        held = len(self.list()) if held is None else held
        if held + voices > self.max_profiles:
            raise ProfileError(_cap_message(held, voices, self.max_profiles))

    # ---- reading ---------------------------------------------------------------------------
    def list(self) -> list[VoiceProfile]:
        """Every readable profile, sorted by name; broken folders are logged and skipped."""
        found = []
        try:
            with os.scandir(self.root) as entries:
                folders = sorted(e.name for e in entries
                                 if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))
        except FileNotFoundError:  # not made yet (a store with a quota), or expired
            return []
        for slug in folders:
            try:
                found.append(self._load(slug))
            except (ProfileError, AudioInputError, OSError) as e:
                log.warning("skipping profile folder %s: %s", self.root / slug, e)
        return sorted(found, key=lambda p: (p.name.casefold(), p.slug))

    def get(self, name: str) -> VoiceProfile:
        """The profile named `name` (exactly, else ignoring case), else the one whose slug is `name`'s
        or `name` itself; ProfileError if none. (`find_profile` also says when the slug decided.)"""
        wanted = " ".join(str(name).split())
        key = wanted.casefold()
        with suppress(ProfileError, AudioInputError, OSError):  # fast path: the folder `name` maps to
            profile = self._load(slugify(name))
            if profile.name == wanted:
                return profile
        profiles = self.list()
        matches = ([p for p in profiles if p.name == wanted] or [p for p in profiles if p.name.casefold() == key]
                   or [p for p in profiles if p.slug in (key, _slug_or_none(wanted))])
        if matches:
            return matches[0]
        existing = ", ".join(p.name for p in profiles) or "none yet; create one first"
        raise ProfileError(f"no profile named {quoted(name)}; existing: {existing}")

    def audio(self, name: str) -> torch.Tensor:
        """The prepared reference of `name`: (S,) float32 at 24 kHz."""
        return self._read_audio(self.get(name).slug)

    # ---- codes -----------------------------------------------------------------------------
    def codes(self, name: str, encoder: Encoder, encoder_id: str) -> torch.Tensor:
        """(K, T) int64 codes of `name`'s reference: from the LRU, else its codes file, else encoded
        once with `encoder` and persisted. `encoder_id` names the codec (and its settings): codes of
        different encoders never mix."""
        profile = self.get(name)
        key = (profile.slug, profile.audio_sha256, encoder_id)
        if (codes := self._cache_get(key)) is not None:
            return codes.clone()
        with self._encode_lock:  # one encode at a time; a thread that waited may find it done
            if (codes := self._cache_get(key, count=False)) is not None:
                return codes.clone()
            codes, sha = self._persisted_or_encode(profile, encoder, encoder_id)
            with self._cache_lock:  # keyed by the audio actually read: an edit racing this read misses later
                self._cache[(profile.slug, sha, encoder_id)] = codes
        return codes.clone()

    def segment(self, name: str, encoder: Encoder, encoder_id: str) -> Segment:
        """`name` as CSM context: Segment(speaker=speaker_id, text=transcript, codes=(K, T))."""
        profile = self.get(name)
        return Segment(speaker=profile.speaker_id, text=profile.transcript,
                       codes=self.codes(profile.slug, encoder, encoder_id))

    def stats(self) -> dict:
        with self._cache_lock:
            return {"hits": self._hits, "misses": self._misses, "evictions": self._cache.evictions,
                    "size": len(self._cache), "maxsize": self._cache.maxsize, "encodes": self._encodes}

    # ---- changing --------------------------------------------------------------------------
    def create(self, name: str, audio: AudioSource, transcript: str, speaker_id: int | None = None) -> VoiceProfile:
        """Save a new profile. `audio`: a file path, file bytes, or (samples, sample_rate).

        The clip goes through `prepare_reference` (trim, normalise, checks). ProfileError if the
        name is invalid or taken (same name or same slug, case-insensitive): nothing is overwritten.
        """
        name, slug = clean_name(name), slugify(name)
        transcript = self._clean_transcript(transcript)
        if speaker_id is not None:
            self._check_speaker_id(speaker_id)
        pcm = _quantize(prepare_reference(self._coerce_audio(audio)))
        return self._create(name, slug, transcript, speaker_id, pcm)

    def rename(self, old: str, new: str) -> VoiceProfile:
        new_name, new_slug = clean_name(new), slugify(new)
        with self._locked():
            profile = self.get(old)
            self._check_free(new_name, new_slug, ignore=profile.slug)
            updated = _replace(profile, name=new_name, slug=new_slug, updated=time.time())
            self._need_growth(profile, updated)
            if new_slug != profile.slug:
                os.rename(self._dir(profile.slug), self._dir(new_slug))
                self._forget(profile.slug)
            try:
                self._write_json(updated)
            except BaseException:  # e.g. disk full: move the folder back, so nothing changed
                if new_slug != profile.slug:
                    os.rename(self._dir(new_slug), self._dir(profile.slug))
                raise
            _fsync_dir(self.root)
        return updated

    def update_transcript(self, name: str, text: str) -> VoiceProfile:
        text = self._clean_transcript(text)
        with self._locked():
            profile = self.get(name)
            updated = _replace(profile, transcript=text, updated=time.time())
            self._need_growth(profile, updated)
            self._write_json(updated)
        return updated

    def set_audio(self, name: str, audio: AudioSource) -> VoiceProfile:
        """Replace the reference clip; persisted and cached codes of the old clip are dropped."""
        pcm = _quantize(prepare_reference(self._coerce_audio(audio)))
        wav = _wav_bytes(pcm)
        with self._locked():
            profile = self.get(name)
            folder = self._dir(profile.slug)
            self._need(_disk_bytes(len(wav)) + _disk_bytes(len(_json_bytes(profile))))  # both clips for a moment
            for stale in folder.glob("codes-*.pt"):  # first, so no crash can pair old codes with new audio
                stale.unlink(missing_ok=True)
            # The clip is staged first and swapped in by a rename (needs no space) after profile.json
            # is written, so a full disk at either write leaves the old clip with its own metadata.
            staged = _stage(folder / REFERENCE_FILE, wav)
            updated = _replace(profile, audio_sha256=_pcm_sha256(pcm), duration_s=round(len(pcm) / SAMPLE_RATE, 3),
                               updated=time.time())
            try:
                self._write_json(updated)
            except BaseException:
                with suppress(OSError):
                    os.unlink(staged)
                raise
            os.replace(staged, folder / REFERENCE_FILE)
            _fsync_dir(folder)
            self._forget(profile.slug)
        return updated

    def delete(self, name: str) -> None:
        with self._locked():
            slug = self.get(name).slug
            trash = self.root / f".tmp-del-{secrets.token_hex(6)}"
            os.rename(self._dir(slug), trash)  # gone from view at once; the rest is cleanup
            _fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)
            self._forget(slug)

    # ---- sharing ---------------------------------------------------------------------------
    def export(self, name: str, dest: str | Path) -> Path:
        """Write `name` as one `.csmvoice` zip (profile.json + reference.wav); returns its path.

        `dest` is a folder (the file is named after the slug) or a file path."""
        profile = self.get(name)
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / f"{profile.slug}{EXPORT_SUFFIX}"
        elif not dest.suffix:
            dest = dest.with_suffix(EXPORT_SUFFIX)
        elif dest.suffix.lower() != EXPORT_SUFFIX:  # e.g. the clip's own .wav, typed by mistake
            raise ProfileError(f"cannot export to {dest}: a voice file ends in {EXPORT_SUFFIX}")
        if dest.exists():
            raise ProfileError(f"cannot export to {dest}: the file exists; choose another name or remove it first")
        if not dest.parent.is_dir():
            raise ProfileError(f"cannot export to {dest}: folder {dest.parent} does not exist")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(PROFILE_FILE, json.dumps(profile.to_json(), indent=2, ensure_ascii=False))
            zf.writestr(REFERENCE_FILE, (self._dir(profile.slug) / REFERENCE_FILE).read_bytes())
        with disk_full_errors():
            _atomic_write(dest, buf.getvalue())
        return dest

    def import_file(self, path: str | Path, name: str | None = None) -> VoiceProfile:
        """Add the profile in a `.csmvoice` file, under `name` or the name it carries.

        The file is checked as untrusted: a zip of exactly profile.json and reference.wav, sizes
        bounded, no path-like member names; members are read into memory (nothing is extracted by
        name) and the audio goes through `prepare_reference` again; an unmodified export (its PCM
        matches the `audio_sha256` it carries) keeps its audio bit for bit, so renders with the
        imported voice repeat exactly. A taken name raises ProfileError; pass `name` to import
        under another one.
        """
        path = Path(path)
        label = path.name
        try:
            size = path.stat().st_size
        except OSError as e:
            raise ProfileError(f"cannot open {label} ({e.strerror})") from e
        if size > MAX_IMPORT_BYTES:
            raise ProfileError(f"{label} is {size / 2**20:.0f} MB; a voice file is at most {MAX_IMPORT_BYTES >> 20} MB")
        members = _read_voice_zip(path, label)
        meta = _parse_json(members[PROFILE_FILE], f"{label}/{PROFILE_FILE}")
        where = f"{label}/{PROFILE_FILE}"
        carried = _field(meta, "name", str, where)
        transcript = self._clean_transcript(_field(meta, "transcript", str, where))
        wanted = meta.get("speaker_id", meta.get("speaker"))
        try:
            samples = load_audio(members[REFERENCE_FILE])
        except AudioInputError as e:
            raise ProfileError(f"{label}: the reference audio is unusable: {e}") from e
        pcm = _quantize(prepare_reference(samples))  # checks the clip whichever PCM is kept
        if _pcm_sha256(exact := _quantize(samples)) == meta.get("audio_sha256"):
            pcm = exact
        final = clean_name(name if name is not None else carried)
        advice = f"pass a new name to import {label} under it" if name is None else None
        return self._create(final, slugify(final), transcript, None, pcm, prefer_speaker=wanted, advice=advice)

    # ---- internals -------------------------------------------------------------------------
    def _create(self, name: str, slug: str, transcript: str, speaker_id: int | None, pcm: np.ndarray,
                prefer_speaker: object = None, advice: str | None = None) -> VoiceProfile:
        wav = _wav_bytes(pcm)
        # its folder, clip and metadata, and the codes its first render will add
        need = (FS_BLOCK + _disk_bytes(len(wav)) + _disk_bytes(512 + len(json.dumps([name, transcript]).encode()))
                + _disk_bytes(CODES_FILE_OVERHEAD + len(pcm) * CODES_BYTES_PER_S // SAMPLE_RATE))
        with self._locked(upfront=need):
            existing = self._check_free(name, slug, **({"advice": advice} if advice else {}))
            self.check_room(1, held=len(existing))
            self._need(need)
            if speaker_id is None:
                speaker_id = _pick_speaker([p.speaker_id for p in existing], prefer_speaker)
            now = time.time()
            profile = VoiceProfile(name=name, slug=slug, transcript=transcript, speaker_id=speaker_id,
                                   created=now, updated=now, duration_s=round(len(pcm) / SAMPLE_RATE, 3),
                                   audio_sha256=_pcm_sha256(pcm))
            build = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
            try:
                _atomic_write(build / REFERENCE_FILE, wav)
                _atomic_write(build / PROFILE_FILE, _json_bytes(profile))  # last: marks the folder complete
                try:
                    os.rename(build, self._dir(slug))  # fails rather than replace a (non-empty) folder
                except OSError as e:  # only reachable without a working lock: another writer won
                    raise ProfileError(f"a profile stored as {slug!r} was just created by another writer; "
                                       "choose another name") from e
            except BaseException:
                shutil.rmtree(build, ignore_errors=True)
                raise
            _fsync_dir(self.root)
        return profile

    def _check_free(self, name: str, slug: str, ignore: str | None = None,
                    advice: str = "choose another name or delete that profile first") -> list[VoiceProfile]:
        """Raise ProfileError if `name` or `slug` is taken (by a profile other than `ignore`); else list()."""
        profiles = self.list()
        for p in profiles:
            if p.slug != ignore and p.name.casefold() == name.casefold():
                raise ProfileError(f"a profile named {p.name!r} already exists; {advice}")
            if p.slug != ignore and looks_like(p.name) == looks_like(name):
                raise ProfileError(f"the profile {p.name!r} looks the same as {name!r} (they differ only in invisible "
                                   f"characters, such as direction marks or zero-width spaces); {advice}")
        if slug != ignore and self._dir(slug).exists():
            other = next((f"the profile {p.name!r}" for p in profiles if p.slug == slug), "another profile")
            raise ProfileError(f"{name!r} is stored as {slug!r}, which {other} already uses (names are "
                               f"compared ignoring case and punctuation); {advice}")
        return profiles

    def _dir(self, slug: str) -> Path:
        """`<root>/<slug>`, refused unless it resolves to a direct child of root."""
        if not _SLUG_RE.fullmatch(slug) or len(slug) > MAX_SLUG_CHARS:
            raise ProfileError(f"{slug!r} is not a valid profile folder name")
        path = (self.root / slug).resolve()
        if path.parent != self.root:
            raise ProfileError(f"profile folder {slug!r} resolves outside {self.root}; refusing to use it")
        return path

    def _load(self, slug: str) -> VoiceProfile:
        folder = self._dir(slug)
        where = str(folder / PROFILE_FILE)
        if not (folder / PROFILE_FILE).is_file():
            raise ProfileError(f"{folder} has no {PROFILE_FILE}")
        data = _read_json(folder / PROFILE_FILE)
        name, transcript = _field(data, "name", str, where), _field(data, "transcript", str, where)
        if data.get("schema") == SCHEMA:
            number = (int, float)
            return VoiceProfile(name=name, slug=slug, transcript=transcript,
                                speaker_id=_field(data, "speaker_id", int, where),
                                created=float(_field(data, "created", number, where)),
                                updated=float(_field(data, "updated", number, where)),
                                duration_s=float(_field(data, "duration_s", number, where)),
                                audio_sha256=_sha_field(data, where), schema=SCHEMA)
        if "schema" not in data:  # schema 0, pre-release: {"name", "transcript", "speaker"}
            pcm = _quantize(self._read_audio(slug))
            mtime = (folder / PROFILE_FILE).stat().st_mtime
            return VoiceProfile(name=name, slug=slug, transcript=transcript,
                                speaker_id=_field(data, "speaker", int, where), created=mtime, updated=mtime,
                                duration_s=round(len(pcm) / SAMPLE_RATE, 3), audio_sha256=_pcm_sha256(pcm), schema=0)
        raise ProfileError(f"{where} has schema {data['schema']!r}; this version reads schemas 0-{SCHEMA} "
                           "(upgrade csm_multi)")

    def _read_audio(self, slug: str) -> torch.Tensor:
        try:
            return load_audio(self._dir(slug) / REFERENCE_FILE)
        except AudioInputError as e:
            raise ProfileError(f"the reference audio of profile {slug!r} is unreadable ({e}); "
                               "give it new audio with set_audio or delete it") from e

    def _write_json(self, profile: VoiceProfile) -> None:
        _atomic_write(self._dir(profile.slug) / PROFILE_FILE, _json_bytes(profile))

    def _persisted_or_encode(self, profile: VoiceProfile, encoder: Encoder, encoder_id: str) -> tuple[torch.Tensor, str]:
        """(codes, SHA-256 of the audio they were made from)."""
        audio = self._read_audio(profile.slug)
        sha = _pcm_sha256(_quantize(audio))  # of the audio actually read, not of what the json claims
        path = self._dir(profile.slug) / _encoder_file(encoder_id)
        try:
            saved = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
            if saved["audio_sha256"] == sha and saved["encoder_id"] == encoder_id:
                return saved["codes"], sha
        except FileNotFoundError:
            pass
        except Exception as e:  # a damaged codes file is a cache miss, never an error
            log.warning("ignoring unreadable codes file %s: %s", path, e)
        codes = encoder(audio)
        if not isinstance(codes, torch.Tensor) or codes.ndim != 2 or codes.is_floating_point():
            raise ProfileError(f"encoder {encoder_id!r} must return (K, T) integer codes, got "
                               f"{getattr(codes, 'shape', type(codes))}")
        codes = codes.detach().to("cpu", torch.long).contiguous()
        with self._cache_lock:
            self._encodes += 1
        buf = io.BytesIO()
        torch.save({"codes": codes, "audio_sha256": sha, "encoder_id": encoder_id}, buf)
        try:
            with self._locked():  # temp files only under the lock (see _clean_stale)
                self._need(_disk_bytes(len(buf.getvalue())))
                _atomic_write(path, buf.getvalue())
        except (OSError, ProfileError) as e:  # deleted meanwhile, disk full: the codes are still right
            log.warning("could not persist codes for %s: %s", profile.slug, e)
        return codes, sha

    def _cache_get(self, key: tuple, count: bool = True) -> torch.Tensor | None:
        with self._cache_lock:
            codes = self._cache.get(key)
            if count:
                if codes is None:
                    self._misses += 1
                else:
                    self._hits += 1
            return codes

    def _forget(self, slug: str) -> None:
        with self._cache_lock:
            for key in [k for k in self._cache if k[0] == slug]:
                del self._cache[key]

    @staticmethod
    def _coerce_audio(audio: AudioSource) -> torch.Tensor:
        if isinstance(audio, str | Path | bytes):
            return load_upload(audio)
        if isinstance(audio, tuple) and len(audio) == 2:
            samples, rate = audio
            if isinstance(samples, int) and not isinstance(rate, int):  # Gradio's (rate, samples)
                samples, rate = rate, samples
            return from_array(samples, rate)
        raise AudioInputError("audio must be a file path, file bytes, or a (samples, sample_rate) pair")

    @staticmethod
    def _clean_transcript(text: str) -> str:
        if not isinstance(text, str):
            raise ProfileError(f"the transcript must be text, got {type(text).__name__}")
        if len(text) > MAX_TRANSCRIPT_CHARS:
            raise ProfileError(f"the transcript is {len(text)} characters; the limit is {MAX_TRANSCRIPT_CHARS}: "
                               "use a shorter clip (5-15 s) and type just what it says")
        # control characters (NUL, ESC, ...) are invisible and unspeakable: dropped, like in scripts
        text = " ".join(drop_controls(text, keep=_SPACE_CONTROLS).split())
        if not text:
            raise ProfileError("the transcript is empty: type exactly what is said in the reference clip")
        return text

    @staticmethod
    def _check_speaker_id(speaker_id: object) -> None:
        if not isinstance(speaker_id, int) or isinstance(speaker_id, bool) or speaker_id < 0:
            raise ProfileError(f"speaker_id must be a non-negative integer, got {speaker_id!r}")

    # ---- locking and cleanup -----------------------------------------------------------------
    @contextmanager
    def _locked(self, upfront: int = 0) -> Iterator[None]:
        """Hold `<root>/.lock` (re-entrant within this store; threads of it serialize on a mutex),
        making `root` if it is missing. A full disk inside becomes a ProfileError that says so.

        With a quota: hold it too (first: see StorageQuota), refuse to make a missing `root` unless
        it and `upfront` bytes fit, and book the change in the folder's size on the way out. The
        body refuses its writes with `_need` before making them."""
        with self._mutex, disk_full_errors():
            if self._lock_depth:
                self._lock_depth += 1
                try:
                    yield
                finally:
                    self._lock_depth -= 1
                return
            with self._quota.held() if self._quota is not None else nullcontext() as ledger:
                made = not self.root.is_dir()
                if made:
                    if ledger is not None:
                        ledger.need(FS_BLOCK + upfront, reserve=False)
                        ledger.need(FS_BLOCK)
                    self._make_root()
                before = 0 if made or ledger is None else _tree_bytes(self.root)
                try:
                    self._lock_fd = self._acquire_file_lock()
                    self._lock_depth, self._ledger = 1, ledger
                    yield
                finally:
                    self._lock_depth, self._ledger = 0, None
                    if ledger is not None:
                        ledger.settle(_tree_bytes(self.root) - before)
                    if self._lock_fd is not None:
                        os.close(self._lock_fd)  # closing releases the flock
                        self._lock_fd = None

    def _need(self, nbytes: int) -> None:
        """Inside `_locked`: ProfileError (the quota's) unless `nbytes` more fit; a no-op without one."""
        if self._ledger is not None:
            self._ledger.need(nbytes)

    def _need_growth(self, old: VoiceProfile, new: VoiceProfile) -> None:
        self._need(_disk_bytes(len(_json_bytes(new))) - _disk_bytes(len(_json_bytes(old))))

    def _make_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if e.errno in NO_SPACE:
                raise
            # the app's wording (Studio.library): a store with a quota is a visitor's library
            raise ProfileError(f"the server cannot open your voice library ({e.strerror}): try again later, "
                               "or tell whoever runs this demo") from e

    def _acquire_file_lock(self) -> int | None:
        if fcntl is None:
            self._warn_unlocked("this platform has no fcntl.flock")
            return None
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # ENOLCK/EOPNOTSUPP on FUSE and network mounts
            os.close(fd)
            self._warn_unlocked(f"flock failed ({e.strerror})")
            return None
        return fd

    def _warn_unlocked(self, why: str) -> None:
        if not self._warned_unlocked:
            self._warned_unlocked = True
            log.warning("profile store %s runs without a lock (%s): concurrent writers are last-writer-wins",
                        self.root, why)

    def _clean_stale(self) -> None:
        """Remove `.tmp-*` leftovers of killed writers (in root and in profile folders). Called with
        the lock held: writers make temp entries only while holding it, so every one left is dead.
        Without a working lock, only those older than STALE_TMP_S are."""
        cutoff = float("inf") if self._lock_fd is not None else time.time() - STALE_TMP_S
        folders = [self.root] + [Path(e.path) for e in os.scandir(self.root)
                                 if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
        for folder in folders:
            for entry in os.scandir(folder):
                if not entry.name.startswith(".tmp-"):
                    continue
                with suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime > cutoff:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
                    log.info("removed stale %s", entry.path)


def _replace(profile: VoiceProfile, **changes) -> VoiceProfile:
    return VoiceProfile(**{**asdict(profile), **changes, "schema": SCHEMA})


def _json_bytes(profile: VoiceProfile) -> bytes:
    return json.dumps(profile.to_json(), indent=2, ensure_ascii=False).encode("utf-8")


def _sha_field(data: dict, where: str) -> str:
    sha = _field(data, "audio_sha256", str, where)
    if not _SHA_RE.fullmatch(sha):
        raise ProfileError(f"{where}: audio_sha256 is not a SHA-256 hex digest")
    return sha


def _pick_speaker(taken: list[int], preferred: object = None) -> int:
    """The preferred id if free, else the lowest free id in 0..9, else the least used of 0..9."""
    if isinstance(preferred, int) and not isinstance(preferred, bool) and preferred >= 0 and preferred not in taken:
        return preferred
    counts = [taken.count(i) for i in range(DEFAULT_SPEAKER_IDS)]
    return counts.index(min(counts))


def read_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, label: str,
                    error: type[Exception] = ProfileError) -> bytes:
    """One member's bytes, refused (`error`) when its header or its actual content exceeds `limit`."""
    if info.file_size > limit:
        raise error(f"{label}: {info.filename} is too large ({info.file_size:,} bytes; the limit is {limit:,})")
    with zf.open(info) as f:
        data = f.read(limit + 1)  # the header's size may lie
    if len(data) > limit:
        raise error(f"{label}: {info.filename} is too large (over {limit:,} bytes, although its header says less)")
    return data


def _read_voice_zip(path: Path, label: str) -> dict[str, bytes]:
    """The two members of a `.csmvoice` file, read into memory after checking names and sizes."""
    limits = {PROFILE_FILE: MAX_JSON_BYTES, REFERENCE_FILE: MAX_IMPORT_WAV_BYTES}
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            for info in infos:
                member = info.filename
                if member.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", member) or ":" in member:
                    raise ProfileError(f"{label} holds an unsafe member path {member!r}; refusing to import it")
                if member not in limits:
                    raise ProfileError(f"{label} holds an unexpected member {member!r}; a voice file holds only "
                                       f"{PROFILE_FILE} and {REFERENCE_FILE}")
                if info.file_size > limits[member]:
                    raise ProfileError(f"{label}: {member} is too large ({info.file_size:,} bytes; the limit is "
                                       f"{limits[member]:,}): is it a voice file exported by csm-multi?")
            if sorted(i.filename for i in infos) != sorted(limits):
                raise ProfileError(f"{label} must hold exactly {PROFILE_FILE} and {REFERENCE_FILE} once each")
            return {info.filename: read_zip_member(zf, info, limits[info.filename], label) for info in infos}
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as e:
        raise ProfileError(f"{label} is not a readable {EXPORT_SUFFIX} file ({e}); export the voice again") from e
    except OSError as e:
        raise ProfileError(f"cannot read {label} ({e})") from e

