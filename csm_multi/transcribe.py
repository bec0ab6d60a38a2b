"""Speech to text for reference clips: a Whisper model, loaded on first use, writes the transcript
a voice profile needs when the user leaves it empty.

Knows no profiles, UI or hub: `loaders.build_transcriber` supplies how the model is loaded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from .audio import resample
from .config import SAMPLE_RATE
from .errors import TranscriptionError

WHISPER_SAMPLE_RATE = 16_000  # Whisper's feature extractor expects 16 kHz


class Transcriber:
    """`transcriber(audio)`: (S,) float waveform at 24 kHz -> its text, stripped.

    `load()` returns (WhisperForConditionalGeneration, its processor); it runs once, at the first
    call, so building a Transcriber costs nothing. Calls are serialised: one model, one lock.
    """

    def __init__(self, name: str, load: Callable[[], tuple[Any, Any]], max_new_tokens: int = 200):
        self.name = name
        self.max_new_tokens = max_new_tokens  # Whisper's window holds 448 positions; 30 s of speech is ~100 tokens
        self._load = load
        self._model = self._processor = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def __call__(self, audio: torch.Tensor) -> str:
        speech = resample(audio.detach().to("cpu", torch.float32).flatten(), SAMPLE_RATE, WHISPER_SAMPLE_RATE)
        with self._lock:
            if self._model is None:  # a failed load raises and is retried at the next call
                self._model, self._processor = self._load()
            model, processor = self._model, self._processor
            features = processor(speech.numpy(), sampling_rate=WHISPER_SAMPLE_RATE, return_tensors="pt").input_features
            try:
                with torch.inference_mode():
                    ids = model.generate(features.to(model.device, model.dtype), max_new_tokens=self.max_new_tokens,
                                         do_sample=False, num_beams=1)
            except RuntimeError as e:  # e.g. out of memory
                raise TranscriptionError(f"automatic transcription with {self.name} failed ({e}): "
                                         "type what the clip says as its transcript") from e
        text = " ".join(processor.batch_decode(ids, skip_special_tokens=True)[0].split())
        if not text:
            raise TranscriptionError(f"the speech recognizer ({self.name}) heard no words in the clip: "
                                     "type what it says as its transcript, or upload a clearer recording")
        return text
