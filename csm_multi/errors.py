"""Typed, readable errors. Each message says what went wrong and what to do about it.

The UI and CLI show `str(error)` to people; nothing here may carry a stack trace's worth of detail.
"""


class CsmError(Exception):
    """Base class of every error csm-multi raises on purpose."""


class WeightsUnavailableError(CsmError):
    """Model weights, tokenizer or codec files could not be obtained (token, gating, network, file)."""


class CheckpointFormatError(CsmError):
    """A checkpoint file is not in a layout we can read, or its shapes do not match the preset."""


class WatermarkUnavailableError(CsmError):
    """The watermark model could not be loaded and the caller did not explicitly disable watermarking."""


class ContextTooLongError(CsmError):
    """Context + text + frames to generate do not fit the model's window."""


class AudioInputError(CsmError):
    """An audio file or array is unreadable, empty, silent, too short/long or otherwise unusable."""


class ScriptError(CsmError):
    """A dialogue script could not be parsed or refers to unknown speakers (carries line numbers)."""


class ProfileError(CsmError):
    """A voice profile is missing, badly named, or could not be saved/loaded."""


class TranscriptionError(CsmError):
    """Automatic transcription is unavailable (model not loadable) or heard no words: type the transcript.

    `operator_hint`: what whoever runs the server or the command line can change (flags, environment);
    the command line prints it, the web page only logs it."""

    def __init__(self, message: str, operator_hint: str = ""):
        super().__init__(message)
        self.operator_hint = operator_hint


class BusyError(CsmError):
    """The generation queue is full (or this visitor has too many requests waiting): try again later."""


# ---- JSON fields in words (a hand-edited project or profile file) ------------------------------
_KIND_WORDS = {str: "text", int: "a whole number", float: "a number", bool: "true or false", list: "a list",
               dict: "an object", type(None): "null"}


def kind_words(kind: type | tuple) -> str:
    """A JSON type (or a tuple of them) as a reader names it: "text", "a whole number or null"."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(dict.fromkeys(_KIND_WORDS.get(k, getattr(k, "__name__", str(k))) for k in kinds))


def value_words(value: object) -> str:
    """What a JSON field holds, in words, without echoing long text back."""
    if value is None:
        return "nothing (missing or null)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (true or false)"
    if isinstance(value, int):
        digits = len(str(abs(value)))
        return f"a whole number of {digits} digits" if digits > 19 else f"{value} (a whole number)"
    if isinstance(value, float):
        return f"{value!r} (a number)"
    if isinstance(value, str):
        return f"text of {len(value)} characters" if value else "empty text"
    return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)
