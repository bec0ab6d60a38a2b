"""csm-multi: multi-speaker conversational speech with Sesame's CSM-1B.

    from csm_multi import build_engine, Segment, SamplingConfig
    engine = build_engine("auto")            # csm-1b when reachable, else the offline tiny preset
    utt = engine.generate("Hello there.", speaker=0, sampling=SamplingConfig(seed=1))
"""

from .config import PRESETS, SamplingConfig, StreamConfig, get_preset
from .engine import AudioChunk, Engine, EngineInfo, Utterance
from .errors import (
    AudioInputError,
    CheckpointFormatError,
    ContextTooLongError,
    CsmError,
    ProfileError,
    ScriptError,
    TranscriptionError,
    WatermarkUnavailableError,
    WeightsUnavailableError,
)
from .frames import Segment
from .loaders import build_engine

__all__ = [
    "PRESETS", "SamplingConfig", "StreamConfig", "get_preset", "AudioChunk", "Engine", "EngineInfo", "Utterance",
    "AudioInputError", "CheckpointFormatError", "ContextTooLongError", "CsmError", "ProfileError", "ScriptError",
    "TranscriptionError", "WatermarkUnavailableError", "WeightsUnavailableError", "Segment", "build_engine",
]
