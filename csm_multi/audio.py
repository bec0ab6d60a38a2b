"""Audio I/O and checks: load any file soundfile reads, mix to mono, resample to 24 kHz, save.

Knows no model. Waveforms are (S,) float32 torch tensors in [-1, 1] at `SAMPLE_RATE` unless a
function says otherwise. Problems raise `AudioInputError` with a message a person can act on.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from .config import SAMPLE_RATE
from .errors import AudioInputError

READ_FORMATS = ("wav", "flac", "ogg", "mp3")


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
    if orig_sr <= 0:
        raise AudioInputError(f"invalid sample rate {orig_sr}")
    return AF.resample(audio, orig_freq=int(orig_sr), new_freq=int(new_sr))


def prepare(audio: np.ndarray | torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Samples at any rate/channel count -> checked (S,) float32 mono at 24 kHz."""
    x = to_mono(audio)
    if x.numel() == 0:
        raise AudioInputError("the audio is empty (0 samples): record or upload a clip with speech in it")
    if not torch.isfinite(x).all():
        raise AudioInputError("the audio contains NaN or infinite samples: the file is damaged; export it again")
    return resample(x, sample_rate).contiguous()


def load_audio(source: str | Path | bytes) -> torch.Tensor:
    """A file path or its bytes -> (S,) float32 mono at 24 kHz."""
    name = "upload" if isinstance(source, bytes) else Path(source).name
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
        data, sr = sf.read(handle, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioInputError(
            f"could not read {name} as audio ({e}); use a WAV, FLAC, OGG or MP3 file"
        ) from e
    except FileNotFoundError as e:
        raise AudioInputError(f"{name} does not exist") from e
    return prepare(data, sr)


def save_audio(path: str | Path, audio: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write (S,) float audio as 16-bit PCM (WAV/FLAC by extension, WAV if none)."""
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".wav")
    data = audio.detach().float().cpu().clamp(-1, 1).numpy()
    sf.write(str(path), data, sample_rate, subtype="PCM_16")
    return path
