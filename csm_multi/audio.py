"""Audio I/O and checks: load any file soundfile reads, mix to mono, resample to 24 kHz, save.

Knows no model. Waveforms are (S,) float32 torch tensors in [-1, 1] at `SAMPLE_RATE` unless a
function says otherwise. Problems raise `AudioInputError` with a message a person can act on.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from .config import SAMPLE_RATE
from .errors import AudioInputError

READ_FORMATS = ("wav", "flac", "ogg", "mp3")
MAX_UPLOAD_S = 600  # longer files are refused from their header, before decoding
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 4_000, 384_000  # beyond these a header is broken, not unusual
WHOLE_READ_S = 60  # longer files are read and resampled in blocks of this many seconds (same samples)
MAX_DECODED_SAMPLES = MAX_UPLOAD_S * 48_000 * 2  # frames x channels: 10 min of 48 kHz stereo (230 MB as float32)
_MAX_SINC_KERNEL = 1 << 20  # torchaudio's resampling table size (elements) we accept, see `resample`


def to_mono(audio: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(S,) or (S, C) samples (soundfile's layout) -> (S,) float32, channels averaged."""
    x = torch.as_tensor(np.asarray(audio), dtype=torch.float32)
    if x.ndim == 2:
        if x.shape[1] == 0:
            raise AudioInputError("the audio has no channels: export it again as mono or stereo")
        x = x.mean(dim=1)
    elif x.ndim != 1:
        raise AudioInputError(f"expected (samples,) or (samples, channels) audio, got shape {tuple(x.shape)}")
    return x


def resample(audio: torch.Tensor, orig_sr: int, new_sr: int = SAMPLE_RATE) -> torch.Tensor:
    if orig_sr == new_sr:
        return audio
    if not MIN_SAMPLE_RATE <= orig_sr <= MAX_SAMPLE_RATE:
        raise AudioInputError(f"the audio's sample rate is {orig_sr} Hz; export it at "
                              f"{MIN_SAMPLE_RATE // 1000}-{MAX_SAMPLE_RATE // 1000} kHz (e.g. 48 kHz)")
    g = math.gcd(int(orig_sr), int(new_sr))
    if (orig_sr // g) * (new_sr // g) <= _MAX_SINC_KERNEL:
        return AF.resample(audio, orig_freq=int(orig_sr), new_freq=int(new_sr))
    # torchaudio builds a (new/g, orig/g) sinc table: for a rate like 44101 Hz that is ~10^9
    # numbers (GBs). scipy's polyphase filter is exact too and its memory grows with the rates' sum.
    from scipy.signal import resample_poly

    out = resample_poly(audio.detach().cpu().numpy(), int(new_sr) // g, int(orig_sr) // g)
    return torch.from_numpy(out.astype(np.float32, copy=False))


def prepare(audio: np.ndarray | torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Samples at any rate/channel count -> checked (S,) float32 mono at 24 kHz."""
    x = to_mono(audio)
    if x.numel() == 0:
        raise AudioInputError("the audio is empty (0 samples): record or upload a clip with speech in it")
    if not torch.isfinite(x).all():
        raise AudioInputError("the audio contains NaN or infinite samples: the file is damaged; export it again")
    return resample(x, sample_rate).contiguous()


def load_audio(source: str | Path | bytes) -> torch.Tensor:
    """A file path or its bytes -> (S,) float32 mono at 24 kHz.

    The header is checked before anything is decoded: more than `MAX_UPLOAD_S` seconds or
    `MAX_DECODED_SAMPLES` samples (all channels) raises `AudioInputError`, so a small compressed
    file cannot make us decode an hour of audio. Rates outside `MIN_SAMPLE_RATE`..`MAX_SAMPLE_RATE`
    are refused by `resample`.
    """
    name = "the upload" if isinstance(source, bytes) else Path(source).name
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise AudioInputError(f"{name} does not exist or is not a file")
    try:
        with sf.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as f:
            _check_header(name, f.samplerate, f.channels, f.frames)
            long = f.frames > WHOLE_READ_S * f.samplerate
            data, sr = (None if long else _read_mono(f)), f.samplerate
        if long:  # in blocks: resampling a whole long file at once takes several times its size in memory
            with _open_spans(source, name) as (length, read):
                block = WHOLE_READ_S * SAMPLE_RATE
                return torch.cat([read(i, min(block, length - i)) for i in range(0, length, block)])
    except FileNotFoundError as e:
        raise AudioInputError(f"{name} does not exist") from e
    except (RuntimeError, TypeError, ValueError) as e:
        raise _unreadable(name, e) from e
    return prepare(data, sr)


def _unreadable(name: str, e: Exception) -> AudioInputError:
    """The error for a file that could not be read: the OS's reason, or libsndfile's words for its content."""
    if isinstance(e, OSError):
        return AudioInputError(f"could not read {name} ({e}); check that the file is readable")
    detail = getattr(e, "error_string", None) or str(e)  # libsndfile's words, without the handle's repr
    return AudioInputError(f"could not read {name} as audio ({detail}); use a WAV, FLAC, OGG or MP3 file")


def _read_mono(f: sf.SoundFile, block: int = 1 << 20) -> np.ndarray:
    """All of an open file as (S,) float32, channels averaged block by block, so a long many-channel
    file is never held whole (10 min of 48 kHz stereo: 115 MB, not 230 MB plus its mix)."""
    if f.channels == 1:
        return f.read(dtype="float32")
    out = np.empty(max(f.frames, 0), dtype=np.float32)
    n = 0
    for part in f.blocks(blocksize=block, dtype="float32", always_2d=True):
        part = part.mean(axis=1)
        if n + part.size > out.size:  # a header that undercounts: grow rather than drop samples
            out = np.concatenate([out[:n], np.empty(part.size + n - out.size + block, dtype=np.float32)])
        out[n:n + part.size] = part
        n += part.size
    return out[:n]


def _check_header(name: str, sample_rate: int, channels: int, frames: int) -> None:
    seconds = frames / max(sample_rate, 1)
    if seconds > MAX_UPLOAD_S:
        raise AudioInputError(f"{name} is {seconds:,.0f} s long; the limit is {MAX_UPLOAD_S} s ({MAX_UPLOAD_S // 60} "
                              "min): trim it to the part you need")
    if frames * max(channels, 1) > MAX_DECODED_SAMPLES:
        raise AudioInputError(f"{name} holds too much audio to decode ({channels} channels at {sample_rate} Hz for "
                              f"{seconds:.0f} s): trim it, or export it as mono at 48 kHz")


WRITE_FORMATS = ("wav", "flac", "mp3")


def save_audio(path: str | Path, audio: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write (S,) or (S, C) float audio by extension: WAV/FLAC as 16-bit PCM, MP3 (libsndfile's
    encoder); WAV if there is no extension.

    Encoded in memory and written by Python, so a full disk surfaces as OSError(ENOSPC) (libsndfile
    reports write failures only as "System error.").
    """
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".wav")
    kind = path.suffix.lower().lstrip(".")
    if kind not in WRITE_FORMATS:
        raise AudioInputError(f"cannot write .{kind} files: choose one of {', '.join(WRITE_FORMATS)}")
    data = audio.detach().float().cpu().clamp(-1, 1).numpy()
    buf = io.BytesIO()
    if kind == "mp3":
        sf.write(buf, data, sample_rate, format="MP3")
    else:
        sf.write(buf, data, sample_rate, format=kind.upper(), subtype="PCM_16")
    path.write_bytes(buf.getvalue())
    return path


# ---- uploads and voice-reference clips ------------------------------------------------------
MAX_UPLOAD_BYTES = 50 * 1024 * 1024  # an upload larger than this is refused before it is read
MIN_REFERENCE_S = 1.0  # a reference clip shorter than this (after trimming) carries too little voice
MAX_REFERENCE_S = 30  # ... and a longer one wastes the context window (375 Mimi frames at most)
REFERENCE_RMS_DBFS = -20.0  # loudness target of a prepared reference (RMS over its active frames)
REFERENCE_PEAK_DBFS = -1.0  # ... unless that would push a peak above this: then the peak decides
SILENCE_DBFS = -55.0  # a clip whose loudest 20 ms frame is quieter than this is silent
TRIM_DB = 40.0  # frames more than this below the loudest frame count as silence when trimming
TRIM_MARGIN_S = 0.15  # silence kept before the first and after the last active frame
CLIPPED_FRACTION = 0.05  # more than this share of samples pinned at a full-scale peak: unusable
_FRAME = SAMPLE_RATE // 50  # 20 ms analysis frames


def load_upload(source: str | Path | bytes) -> torch.Tensor:
    """An uploaded file (path or bytes) -> (S,) float32 mono at 24 kHz, with upload checks first.

    A path must end in .wav/.flac/.ogg/.mp3 (the content decides the decoder); empty or larger than
    `MAX_UPLOAD_BYTES` is refused before reading; unreadable or corrupt content raises
    `AudioInputError`. Any rate and channel count is converted (see `load_audio`).
    """
    name = _check_upload(source)
    try:
        return load_audio(source)
    except OSError as e:  # e.g. permission denied; soundfile's own errors are mapped by load_audio
        raise _unreadable(name, e) from e


def from_array(samples: np.ndarray | torch.Tensor, sample_rate: int) -> torch.Tensor:
    """In-memory samples (S,) or (S, C), float or integer PCM, any rate -> checked (S,) at 24 kHz.

    Integer PCM (e.g. a browser recording as int16) is scaled to [-1, 1) by its type's range.
    """
    array = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
    if np.issubdtype(array.dtype, np.unsignedinteger):  # offset binary, e.g. 8-bit WAV: 128 is silence
        half = float(np.iinfo(array.dtype).max // 2 + 1)
        array = (array.astype(np.float64) - half) / half
    elif np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float64) / float(-np.iinfo(array.dtype).min)
    elif not np.issubdtype(array.dtype, np.floating):
        raise AudioInputError(f"expected numeric audio samples, got dtype {array.dtype}")
    return prepare(array, int(sample_rate))


def _frame_rms(audio: np.ndarray) -> np.ndarray:
    """(S,) -> (ceil(S / 20 ms),) float64 RMS of each 20 ms frame (the last one zero-padded)."""
    frames = np.pad(audio, (0, (-audio.size) % _FRAME)).reshape(-1, _FRAME)
    return np.sqrt(np.square(frames, dtype=np.float64).mean(axis=1))


def _db(x: float) -> float:
    return 20 * math.log10(max(x, 1e-12))


def prepare_reference(audio: torch.Tensor) -> torch.Tensor:
    """A voice reference (S,) float at 24 kHz -> trimmed, loudness-normalised (S',) float32.

    Steps: reject non-finite input; remove any DC offset (a constant shift carries no sound but
    would pass for loudness); reject silent input; trim leading/trailing silence (20 ms frames more than
    `TRIM_DB` below the loudest frame), keeping `TRIM_MARGIN_S` on each side; require
    `MIN_REFERENCE_S` <= length <= `MAX_REFERENCE_S`; reject heavy clipping; scale so the active
    frames' RMS is `REFERENCE_RMS_DBFS`, lowered where needed so no peak exceeds
    `REFERENCE_PEAK_DBFS`. Every rejection is an `AudioInputError` saying what to do.
    """
    # numpy, not torch: clips are small, and torch's thread pool only adds overhead here
    x = torch.as_tensor(audio).detach().to("cpu", torch.float32).flatten().numpy()
    if x.size == 0:
        raise AudioInputError("the audio is empty (0 samples): record or upload a clip with speech in it")
    if not np.isfinite(x).all():
        raise AudioInputError("the audio contains NaN or infinite samples: the file is damaged; export it again")
    offset = float(x.mean(dtype=np.float64))
    x = x - np.float32(offset)
    rms = _frame_rms(x)
    loudest = float(rms.max())
    if _db(loudest) < SILENCE_DBFS:
        what = (f"holds no sound, only a constant offset of {offset:+.2f} of full scale"
                if abs(offset) >= 10 ** (SILENCE_DBFS / 20) else f"is silent (loudest part {_db(loudest):.0f} dBFS)")
        raise AudioInputError(f"the audio {what}: check the microphone and record again")
    active = np.flatnonzero(rms >= loudest * 10 ** (-TRIM_DB / 20))
    margin = round(TRIM_MARGIN_S * SAMPLE_RATE)
    start = max(0, int(active[0]) * _FRAME - margin)
    end = min(x.size, (int(active[-1]) + 1) * _FRAME + margin)
    x = x[start:end]
    seconds = x.size / SAMPLE_RATE
    if seconds < MIN_REFERENCE_S:
        short_ms = math.ceil((MIN_REFERENCE_S - seconds) * 1000)
        raise AudioInputError(
            f"the clip holds only {math.floor(seconds * 1000) / 1000:.3f} s of sound after trimming silence, "
            f"{short_ms} ms short of the {MIN_REFERENCE_S:g} s minimum; "
            f"record at least {MIN_REFERENCE_S:g} s of speech (5-15 s works best)"
        )
    if seconds > MAX_REFERENCE_S:
        raise AudioInputError(
            f"the clip is {seconds:.1f} s long after trimming silence; trim it to under {MAX_REFERENCE_S} s "
            "(5-15 s of clear speech works best)"
        )
    # Flat tops at the loudest level are what clipping leaves; a pure sine spends ~3% of its time
    # within 0.1% of its peak, so 5% separates ruined recordings from loud clean ones. Judged on the
    # samples as recorded (offset included): the converter clips at its own full scale.
    recorded = np.abs(x + offset)
    recorded_peak = float(recorded.max())
    pinned = float((recorded >= 0.999 * recorded_peak).mean())
    peak = float(np.abs(x).max())
    if recorded_peak >= 0.9 and pinned > CLIPPED_FRACTION:
        raise AudioInputError(
            f"the recording is heavily clipped ({pinned:.0%} of samples at full scale); "
            "record again with the microphone gain lowered"
        )
    active_rms = float(np.sqrt((rms[active] ** 2).mean()))
    gain = min(10 ** (REFERENCE_RMS_DBFS / 20) / active_rms, 10 ** (REFERENCE_PEAK_DBFS / 20) / peak)
    return torch.from_numpy((x * gain).astype(np.float32))


# ---- parts of an upload ---------------------------------------------------------------------
_SPAN_MARGIN_S = 0.01  # read this much more either side of a span, so the resampler's edges fall outside it


def _check_upload(source: str | Path | bytes) -> str:
    """The checks of an upload before reading it (extension, existence, size); returns the name to show."""
    limit_mb = MAX_UPLOAD_BYTES // (1024 * 1024)
    if isinstance(source, bytes):
        name, size = "the upload", len(source)
    else:
        path = Path(source)
        name = path.name
        ext = path.suffix.lower().lstrip(".")
        if ext not in READ_FORMATS:
            kind = f"'.{ext}' files are" if ext else "files without an extension are"
            raise AudioInputError(f"{name}: {kind} not accepted; use a WAV, FLAC, OGG or MP3 file")
        try:
            if not path.is_file():
                raise AudioInputError(f"{name} does not exist or is not a file")
            size = path.stat().st_size
        except OSError as e:
            raise AudioInputError(f"could not open {name} ({e.strerror}); check the path and permissions") from e
    if size == 0:
        raise AudioInputError(f"{name} is empty (0 bytes): upload the recording again")
    if size > MAX_UPLOAD_BYTES:
        raise AudioInputError(
            f"{name} is {size / 2**20:.0f} MB; the limit is {limit_mb} MB: upload a shorter or compressed clip"
        )
    return name


def probe_upload(source: str | Path) -> float:
    """An upload's length in seconds from its header alone (nothing is decoded), after the checks every
    upload gets (extension, size, a readable header, the length limit): AudioInputError naming the problem.
    For a first answer while the visitor is still filling in the form."""
    name = _check_upload(source)
    try:
        info = sf.info(str(source))
    except (RuntimeError, TypeError, ValueError) as e:
        raise _unreadable(name, e) from e
    _check_header(name, info.samplerate, info.channels, info.frames)
    return info.frames / max(info.samplerate, 1)


@contextmanager
def open_upload_spans(source: str | Path | bytes) -> Iterator[tuple[int, Callable[[int, int], torch.Tensor]]]:
    """An upload opened for reading parts of it, for work that needs a few seconds of a long file
    (the watermark check): yields `(length, read)`, decoding nothing yet.

    `length` is the upload's length in samples at `SAMPLE_RATE`. `read(start, n)` returns samples
    `start .. start + n` of what `load_upload` would return: (n,) float32 mono at `SAMPLE_RATE`, equal
    to within float rounding, zeros past the end. Only that span of the file is decoded, plus a margin
    for the resampler (`_SPAN_MARGIN_S`; up to 1 s at a rate sharing no factor with 24 kHz, where the
    span must start on the resampler's phase), so memory follows `n`, not the file.
    `load_upload`'s checks come first (name, size, header), and each span is checked by `prepare`.
    """
    with _open_spans(source, _check_upload(source)) as spans:
        yield spans


@contextmanager
def _open_spans(source: str | Path | bytes, name: str) -> Iterator[tuple[int, Callable[[int, int], torch.Tensor]]]:
    """`open_upload_spans` without the upload checks (`name` names the file in messages)."""

    try:
        f = sf.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except (RuntimeError, TypeError, ValueError, OSError) as e:
        raise _unreadable(name, e) from e
    with f:
        rate, channels, frames = f.samplerate, f.channels, f.frames
        _check_header(name, rate, channels, frames)
        length = math.ceil(frames * SAMPLE_RATE / rate) if frames else 0  # what `resample` returns

        def read(start: int, n: int) -> torch.Tensor:
            if start < 0 or n < 0:
                raise ValueError(f"a span starts at a sample >= 0 and has n >= 0 samples, got ({start}, {n})")
            ratio = rate / SAMPLE_RATE  # file samples per output sample
            step = rate // math.gcd(rate, SAMPLE_RATE)  # file samples that map to whole output samples
            first = (math.floor(start * ratio) - math.ceil(_SPAN_MARGIN_S * rate)) // step * step  # < 0: zeros
            last = math.ceil((start + n) * ratio) + math.ceil(_SPAN_MARGIN_S * rate)
            data = np.zeros((last - first, channels), dtype=np.float32)
            lo, hi = max(first, 0), min(last, frames)
            if hi > lo:
                try:
                    f.seek(lo)
                    got = f.read(hi - lo, dtype="float32", always_2d=True)  # fewer if the header's count is high
                except (RuntimeError, TypeError, ValueError, OSError) as e:
                    raise _unreadable(name, e) from e
                data[lo - first: lo - first + len(got)] = got
            x = prepare(data, rate)
            x = x[start - first * SAMPLE_RATE // rate:][:max(0, min(n, length - start))]  # exact: see `step`
            return torch.nn.functional.pad(x, (0, n - x.numel()))

        yield length, read
