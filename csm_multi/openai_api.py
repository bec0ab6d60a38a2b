"""An OpenAI-compatible speech API over a Studio, so the `openai` client, Open WebUI and SillyTavern
can use csm-multi unchanged: POST /v1/audio/speech, GET /v1/models, /v1/audio/voices, /v1/audio/models.

It is a FastAPI router (no Gradio): `add_openai_routes(app, studio)` puts it ahead of an app's own
routes. The API key is the voice library key (`Authorization: Bearer <key>`); with a shared
library a key is optional. Errors use OpenAI's JSON shape; no path or traceback reaches a caller.

Formats, all 24 kHz mono: pcm (raw 16-bit little-endian), wav (16-bit, streamed with its sizes
set to 0xFFFFFFFF, "unknown", as OpenAI does), mp3 (CBR 64 kbps) and opus (Ogg) stream while
the audio is generated; flac is buffered, so its header carries the length every reader needs.
Generation runs in a thread of its own, off the event loop, counted against the caller
(`scheduler.as_visitor`); a client that disconnects stops it at the next chunk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import io
import json
import logging
import math
import secrets
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import fastapi
import numpy as np
import soundfile as sf
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from . import scheduler
from .config import FRAME_MS, MAX_SEED, SAMPLE_RATE, SamplingConfig, StreamConfig
from .errors import BusyError, ContextTooLongError, CsmError
from .frames import Segment
from .script import clean_utterance
from .studio import LIBRARY_KEY, Studio

log = logging.getLogger(__name__)

MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")  # accepted so clients that hard-code them work
NO_VOICE_NAMES = ("none", "(none)")  # the voice for "no reference voice", unless a profile has the name
RETRY_AFTER_S = 5  # what a 429 tells the caller to wait
STALL_S = 120.0  # a streaming client that reads nothing for this long is given up on (see _Pump)
MAX_BODY_BYTES = 64 * 1024  # a speech request is text of at most max_line_chars; more is not one


@dataclass(frozen=True)
class AudioFormat:
    media_type: str
    streams: bool  # False: the whole utterance is encoded at the end


FORMATS = {
    "mp3": AudioFormat("audio/mpeg", True),
    "opus": AudioFormat("audio/ogg; codecs=opus", True),
    "wav": AudioFormat("audio/wav", True),
    "pcm": AudioFormat("audio/pcm", True),
    "flac": AudioFormat("audio/flac", False),
}
UNSUPPORTED_FORMATS = ("aac",)  # OpenAI's, that libsndfile cannot write


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _busy(e: BusyError) -> ApiError:
    return ApiError(429, f"{e} (retry after {RETRY_AFTER_S} s)", type="rate_limit_exceeded",
                    code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})


def _as_api_error(e: BaseException) -> ApiError:
    """What the caller hears about an exception: typed errors say their message, others nothing of theirs."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, BusyError):
        return _busy(e)
    if isinstance(e, ContextTooLongError):
        return ApiError(400, str(e), "input", "context_length_exceeded")
    if isinstance(e, (CsmError, ValueError)):
        return ApiError(400, str(e))
    log.error("the speech API failed", exc_info=e)
    return ApiError(500, "the server failed to make the audio: try again, or tell whoever runs it",
                    type="server_error", code="server_error")


# ---- the request ---------------------------------------------------------------------------
class VoiceId(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str


class SpeechRequest(BaseModel):
    """OpenAI's body, plus csm's own sampling settings (seed, temperature, topk, max_audio_length_ms)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    input: str
    voice: str | VoiceId
    response_format: str = "mp3"
    speed: float | None = None
    instructions: str | None = None
    stream_format: str | None = None
    seed: int | None = None
    temperature: float | None = None
    topk: int | None = None
    max_audio_length_ms: float | None = None


_EXPECTED = {
    "model": 'a string: "csm-1b"', "input": "a string: the text to speak",
    "voice": 'a string: a voice of your library or "none" (or {"id": name})',
    "response_format": "a string: " + ", ".join(FORMATS), "speed": "a number: 1.0 (the only speed)",
    "instructions": "a string (left empty: CSM takes no instructions)", "stream_format": 'a string: "audio"',
    "seed": f"a whole number from 0 to {MAX_SEED}", "temperature": "a number", "topk": "a whole number",
    "max_audio_length_ms": "a number of milliseconds",
}


def _json_type(value) -> str:
    if type(value) in (int, float) and math.isfinite(value) and len(repr(value)) <= 24:
        return f"the number {_number(value)}"  # "expected a whole number, got the number 1.5"
    return {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _validation_error(e: ValidationError) -> ApiError:
    errors = e.errors()
    unknown = [err for err in errors if err["type"] == "extra_forbidden" and len(err["loc"]) == 1]
    if unknown:
        name = str(unknown[0]["loc"][0])[:60]
        return ApiError(400, f"unknown field {name!r}: this endpoint takes {', '.join(SpeechRequest.model_fields)}",
                        name, "unknown_parameter")
    err = errors[0]
    field = str(err["loc"][0]) if err["loc"] else None
    if err["type"] == "missing" and len(err["loc"]) == 1:
        return ApiError(400, f"{field}: required, {_EXPECTED.get(field, 'a value')}", field, "missing_required_parameter")
    got = _json_type(err.get("input"))
    return ApiError(400, f"{field}: expected {_EXPECTED.get(field, 'another value')}, got {got}", field,
                    "invalid_type")


@dataclass(frozen=True)
class Speech:
    """A checked request: what to say, how, and in which format."""

    text: str
    voice: str  # a profile name, or "none" (see _voice_context)
    format: str
    sampling: SamplingConfig


def check_request(body: object, studio: Studio, models: tuple[str, ...]) -> Speech:
    """`body` (parsed JSON) -> Speech, or ApiError naming the field. The voice is not looked up here."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object like {{\"model\": \"csm-1b\", \"input\": \"Hello.\", "
                            f"\"voice\": \"none\"}}, got {_json_type(body)}")
    try:
        req = SpeechRequest.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None
    lim = studio.limits
    if req.model is not None and req.model not in models:
        raise ApiError(400, f"model: {req.model[:60]!r} is not served here; use {models[0]!r} "
                            f"(also accepted: {', '.join(models[1:])})", "model", "model_not_found")
    text = clean_utterance(req.input)
    if not text:
        why = "it is empty" if not req.input.strip() else "it holds only invisible, control or invalid characters"
        raise ApiError(400, f"input: write the text to speak ({why})", "input")
    if len(text) > lim.max_line_chars:
        raise ApiError(400, f"input: {len(text)} characters, the limit is {lim.max_line_chars} on this server: "
                            "split the text and ask for each part", "input", "string_above_max_length")
    fmt = req.response_format
    if fmt not in FORMATS:
        why = "is not supported" if fmt in UNSUPPORTED_FORMATS else "is not a format"
        raise ApiError(400, f"response_format: {fmt[:20]!r} {why}; choose one of {', '.join(FORMATS)}",
                       "response_format", "unsupported_value")
    if req.speed is not None and req.speed != 1.0:
        raise ApiError(400, f"speed: {req.speed:g} is not supported, CSM speaks at one speed: leave speed out "
                            "or send 1.0", "speed", "unsupported_value")
    if req.instructions:
        raise ApiError(400, "instructions: not supported, CSM takes no instructions: leave them out (a voice's "
                            "reference clip sets how it sounds)", "instructions", "unsupported_value")
    if req.stream_format not in (None, "audio"):
        why = "server-sent events are not supported" if req.stream_format == "sse" else "not a stream format"
        raise ApiError(400, f"stream_format: {req.stream_format[:20]!r}: {why}; leave it out or send \"audio\" "
                            "(the audio bytes, streamed)", "stream_format", "unsupported_value")
    voice = req.voice.id if isinstance(req.voice, VoiceId) else req.voice
    if not voice.strip():
        raise ApiError(400, 'voice: name a voice of your library, or "none" for no reference voice', "voice")
    return Speech(text, voice, fmt, _sampling(req, studio))


def _number(value: float) -> str:
    """A limit or value as written: whole numbers in full (a seed's 9223372036854775807, not 9.22337e+18)."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def _sampling(req: SpeechRequest, studio: Studio) -> SamplingConfig:
    lim, default = studio.limits, SamplingConfig()
    longest = lim.max_line_s * 1000
    t_lo, t_hi = lim.temperature
    checks = (
        ("seed", req.seed, 0, MAX_SEED), ("temperature", req.temperature, t_lo, t_hi),
        ("topk", req.topk, 1, lim.max_topk), ("max_audio_length_ms", req.max_audio_length_ms, FRAME_MS, longest))
    for field, value, lo, hi in checks:
        if value is not None and not lo <= value <= hi:
            raise ApiError(400, f"{field}: {_number(value)} is out of range; this server takes {_number(lo)} to "
                                f"{_number(hi)}", field)
    # the whole text is wanted (the model stops when it is said): the longest line this server makes
    return SamplingConfig(
        temperature=default.temperature if req.temperature is None else req.temperature,
        topk=default.topk if req.topk is None else req.topk,
        seed=secrets.randbits(31) if req.seed is None else req.seed,  # drawn here, so X-Seed can say it
        max_audio_length_ms=longest if req.max_audio_length_ms is None else req.max_audio_length_ms)


# ---- encoders: float32 (S,) chunks in, bytes out --------------------------------------------
def _int16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


class PcmEncoder:
    def feed(self, audio: np.ndarray) -> bytes:
        return _int16(audio)

    def finish(self) -> bytes:
        return b""


class WavEncoder(PcmEncoder):
    """16-bit WAV whose RIFF and data sizes say 0xFFFFFFFF (unknown): it can be sent as it grows."""

    def __init__(self):
        self.started = False

    def feed(self, audio: np.ndarray) -> bytes:
        head = b"" if self.started else wav_header()
        self.started = True
        return head + _int16(audio)

    def finish(self) -> bytes:
        return b"" if self.started else wav_header()


def wav_header(rate: int = SAMPLE_RATE) -> bytes:
    unknown = 0xFFFFFFFF
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)  # PCM, mono, rate, bytes/s, block, bits
    return b"RIFF" + struct.pack("<I", unknown) + b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt + \
        b"data" + struct.pack("<I", unknown)


class SoundFileEncoder:
    """libsndfile writing into memory; what it has written is handed on after each chunk. Bytes it
    rewrites at the end (a header's totals) were sent already: only for formats that decode without
    those totals (Ogg, and MP3 as below)."""

    def __init__(self, format: str, subtype: str | None = None, **options):
        self._buffer = io.BytesIO()
        self._file = sf.SoundFile(self._buffer, "w", SAMPLE_RATE, 1, format=format, subtype=subtype, **options)
        self._sent = 0

    def _new_bytes(self) -> bytes:
        data = self._buffer.getbuffer()[self._sent:].tobytes()
        self._sent += len(data)
        return data

    def feed(self, audio: np.ndarray) -> bytes:
        self._file.write(audio)
        return self._new_bytes()

    def finish(self) -> bytes:
        self._file.close()
        return self._new_bytes()


class FlacEncoder:
    """Buffered: libsndfile writes FLAC's totals (length, MD5) into its header at the end, and a
    FLAC without them (length 0, "unknown") is valid but some readers (libsndfile's) refuse it."""

    def __init__(self):
        self._chunks: list[np.ndarray] = []

    def feed(self, audio: np.ndarray) -> bytes:
        self._chunks.append(audio)
        return b""

    def finish(self) -> bytes:
        out = io.BytesIO()
        samples = np.frombuffer(_int16(np.concatenate(self._chunks)), "<i2")  # the samples pcm and wav send
        sf.write(out, samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        return out.getvalue()


class Mp3Encoder(SoundFileEncoder):
    """Constant bitrate: a stream has no Xing/LAME tag (its totals are known only at the end), and
    without one readers such as libsndfile's tell the length from the size and the first frame's
    bitrate, which is right only for CBR. libsndfile begins with a zeroed frame, filled with that
    tag at the end: it is left out (it would play as 576 samples of silence)."""

    _KBPS = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160, 0)  # MPEG-2 layer III; 15: invalid

    def __init__(self):
        # libsndfile 1.2 maps compression_level linearly onto LAME's bitrates: 0.6 is 64 kbps CBR
        super().__init__("MP3", compression_level=0.6, bitrate_mode="CONSTANT")
        self._head = b""  # bytes held back until the first frame is known

    def _new_bytes(self) -> bytes:
        data = super()._new_bytes()
        if self._head is None:
            return data
        self._head += data
        if len(self._head) < 4:
            return b""
        h = self._head
        size = 72 * 1000 * self._KBPS[h[2] >> 4] // SAMPLE_RATE + (h[2] >> 1 & 1)  # 24 kHz is MPEG-2
        if h[0] != 0xFF or h[1] & 0xE0 != 0xE0 or size <= 4:  # not a frame: hand it on unchanged
            data, self._head = h, None
            return data
        if len(h) < size:
            return b""
        placeholder = not any(h[4:size])
        data, self._head = (h[size:] if placeholder else h), None
        return data

    def finish(self) -> bytes:
        data = super().finish()
        data, self._head = data + (self._head or b""), None  # a file shorter than one frame, as it is
        return data


def make_encoder(fmt: str):
    if fmt == "pcm":
        return PcmEncoder()
    if fmt == "wav":
        return WavEncoder()
    if fmt == "mp3":
        return Mp3Encoder()
    if fmt == "opus":  # Opus takes 24 kHz input as it is; decoders play it at 48 kHz
        return SoundFileEncoder("OGG", "OPUS")
    return FlacEncoder()


# ---- generation in a thread of its own, its bytes awaited on the event loop ----------------
class _Pump:
    """Runs a blocking iterator of bytes in one thread (the engine's generator must start, run and
    close in the same thread: torch's inference mode and the visitor are per thread) and hands its
    items to the event loop through a short queue, so a slow client slows generation down. A client
    that takes nothing for `stall_s` while the queue is full is given up on: the generation stops at its
    next frame and the thread ends (it would otherwise wait as long as the connection stays open, one
    thread per such connection)."""

    def __init__(self, produce: Callable[[Callable[[], bool]], Iterator[bytes]], depth: int = 4,
                 stall_s: float = STALL_S):
        self._produce = produce
        self._stall_s = stall_s
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue(depth)
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="openai-speech", daemon=True).start()

    def _put(self, item) -> bool:
        try:
            future = asyncio.run_coroutine_threadsafe(self._queue.put(item), self._loop)
        except RuntimeError:  # the loop is closed: the server is stopping
            return False
        since = time.monotonic()
        while True:
            try:
                future.result(timeout=0.25)
                return True
            except concurrent.futures.TimeoutError:
                stalled = time.monotonic() - since > self._stall_s
                if stalled:
                    log.warning("a speech client took nothing for %.0f s: its stream is stopped", self._stall_s)
                    self._stop.set()
                if self._stop.is_set():
                    future.cancel()
                    return False
            except concurrent.futures.CancelledError:
                return False

    def _run(self) -> None:
        try:
            items = self._produce(self._stop.is_set)
            try:
                for item in items:
                    if self._stop.is_set() or not self._put(("bytes", item)):
                        return
            finally:
                getattr(items, "close", lambda: None)()
            self._put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting side
            self._put(("error", e))

    async def next(self) -> bytes | None:
        """The next bytes, None at the end; re-raises what the producer raised."""
        kind, value = await self._queue.get()
        if kind == "error":
            raise value
        return value if kind == "bytes" else None

    def stop(self) -> None:
        self._stop.set()


def _speech_bytes(studio: Studio, speech: Speech, context: list[Segment], visitor: str,
                  cancel: Callable[[], bool] | None = None) -> Iterator[bytes]:
    """The encoded audio of `speech`, as it is generated (buffered formats: once, at the end); `cancel`
    (the client went away) ends it at the next frame."""
    with scheduler.as_visitor(visitor):
        speaker = context[0].speaker if context else 0
        encoder = make_encoder(speech.format)
        generated = 0
        for chunk in studio.engine.stream(speech.text, speaker, context, speech.sampling, StreamConfig(),
                                          cancel=cancel):
            generated += chunk.audio.numel()
            data = encoder.feed(chunk.audio.numpy())
            if data:
                yield data
        if not generated:
            raise ApiError(500, f"the model ended the utterance at once (seed {speech.sampling.seed}): "
                                "try again with another seed", type="server_error", code="empty_audio")
        yield encoder.finish()


# ---- the router ----------------------------------------------------------------------------
def _bearer(request: fastapi.Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def _visitor(key: str) -> str:
    """The scheduler's name for a caller: its key hashed, so no secret sits in its state or logs."""
    return "api-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def openai_router(studio: Studio, *, model_name: str = "csm-1b") -> fastapi.APIRouter:
    """The routes, for `app.include_router` (or `add_openai_routes`, which also puts them first)."""
    router = fastapi.APIRouter()
    models = tuple(dict.fromkeys((model_name, "csm-1b", *MODEL_ALIASES)))
    created = int(time.time())

    def caller(request: fastapi.Request) -> tuple[str | None, str]:
        """(library key, visitor id for the scheduler); ApiError 401 without a usable key."""
        key = _bearer(request)
        valid = key is not None and LIBRARY_KEY.fullmatch(key) is not None
        if studio.shared:  # any key is fine (many clients insist on one); a valid one identifies the caller
            host = request.client.host if request.client else "unknown"
            return None, _visitor(key) if valid else f"api-anonymous-{host}"
        if key is None:
            raise ApiError(401, "no API key: send your voice library key as the API key (Authorization: Bearer "
                                "<key>), 8-64 letters, digits, '-' or '_'", type="authentication_error",
                           code="invalid_api_key")
        if not valid:
            raise ApiError(401, "the API key is not a voice library key: use 8-64 letters, digits, '-' or '_' "
                                "(a new key opens a new, empty library)", type="authentication_error",
                           code="invalid_api_key")
        return key, _visitor(key)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "csm-multi"}

    def answers_errors(handler):
        """`handler`'s ApiError (and any other exception) as OpenAI's error JSON."""
        @functools.wraps(handler)  # FastAPI reads the parameters of `handler` through __wrapped__
        async def wrapped(*args, **kwargs):
            try:
                return await handler(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - every failure is answered in OpenAI's shape
                return _as_api_error(e).response()

        return wrapped

    @router.get("/v1/models")
    @answers_errors
    async def list_models(request: fastapi.Request):
        caller(request)
        return {"object": "list", "data": [model_card(m) for m in models]}

    @router.get("/v1/models/{model_id}")
    @answers_errors
    async def get_model(model_id: str, request: fastapi.Request):
        caller(request)
        if model_id not in models:
            raise ApiError(404, f"model {model_id[:60]!r} is not served here; the models are {', '.join(models)}",
                           "model", "model_not_found")
        return model_card(model_id)

    @router.get("/v1/audio/models")
    @answers_errors
    async def audio_models():
        """Open WebUI asks this (without a key) for its model list."""
        return {"models": [{"id": m} for m in models]}

    @router.get("/v1/audio/voices")
    @answers_errors
    async def list_voices(request: fastapi.Request):
        key, _ = caller(request)
        return {"voices": await run_in_threadpool(studio.profile_names, key)}

    @router.post("/v1/audio/speech")
    @answers_errors
    async def speech(request: fastapi.Request):
        key, visitor = caller(request)
        wanted = check_request(await _json_body(request), studio, models)
        context = await run_in_threadpool(_voice_context, studio, key, wanted.voice)
        pump = _Pump(lambda stopped: _speech_bytes(studio, wanted, context, visitor, stopped))
        try:
            first = await pump.next()  # errors before any audio are still HTTP errors
        except BaseException:
            pump.stop()
            raise
        headers = {"X-Seed": str(wanted.sampling.seed)}
        fmt = FORMATS[wanted.format]
        if not fmt.streams:
            pump.stop()
            return Response(first, media_type=fmt.media_type, headers=headers)
        return StreamingResponse(_rest(pump, first), media_type=fmt.media_type, headers=headers)

    @router.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def not_served(path: str, request: fastapi.Request):
        served = {"audio/speech": "POST", "models": "GET", "audio/models": "GET", "audio/voices": "GET"}
        method = served.get(path.strip("/")) or ("GET" if path.startswith("models/") else None)
        if method:  # a served path asked with another method: 405, with the one it takes
            return ApiError(405, f"{request.method} /v1/{path[:80]}: use {method} /v1/{path.strip('/')[:80]}",
                            code="method_not_allowed", headers={"Allow": method}).response()
        return ApiError(404, f"{request.method} /v1/{path[:80]} is not served here; this server offers "
                             "POST /v1/audio/speech, GET /v1/models, GET /v1/audio/voices", code="unknown_url"
                        ).response()

    return router


async def _json_body(request: fastapi.Request) -> object:
    size, parts = 0, []
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is over {MAX_BODY_BYTES // 1024} KiB; a speech request is a short "
                                "JSON object", code="request_too_large")
        parts.append(part)
    try:
        return json.loads(b"".join(parts))
    except ValueError as e:
        raise ApiError(400, f"the body is not JSON ({e}): send a JSON object like "
                            '{"model": "csm-1b", "input": "Hello.", "voice": "none"}') from None


def _voice_context(studio: Studio, key: str | None, voice: str) -> list[Segment]:
    """The reference voice as CSM context ([] for none); 400 naming the voice and the library's voices.
    A profile named "none" wins over the no-voice meaning."""
    store = studio.library(key)
    try:
        store.get(voice)
    except CsmError:
        if voice.strip().casefold() in NO_VOICE_NAMES:
            return []
        names = studio.profile_names(key)
        have = f"its voices: {', '.join(names)}" if names else "it has no voices yet (add one on the page)"
        raise ApiError(400, f"voice: no voice {voice[:80]!r} in your library; {have}, or \"none\" for no "
                            "reference voice", "voice", "voice_not_found") from None
    return [store.segment(voice, studio.engine.encode_reference, studio.engine.codec_id)]


async def _rest(pump: _Pump, first: bytes) -> AsyncIterator[bytes]:
    """`first`, then the pump's bytes; an error mid-stream can only end it (the status was sent)."""
    try:
        yield first
        while (data := await pump.next()) is not None:
            if data:
                yield data
    except Exception as e:  # noqa: BLE001 - logged; the client sees the stream end
        log.warning("the speech stream ended early: %s", _as_api_error(e).message)
    finally:
        pump.stop()  # also when the client went away (this generator is cancelled or closed)


def unavailable_router(reason: str) -> fastapi.APIRouter:
    """Every /v1 request answered 503 in OpenAI's error shape, saying `reason` (e.g. on ZeroGPU)."""
    router = fastapi.APIRouter()

    @router.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def unavailable(path: str):
        return ApiError(503, reason, type="server_error", code="unavailable").response()

    return router


def openai_routes(studio: Studio, *, unavailable: str | None = None, **kw) -> list:
    """The API's routes, to hand to a FastAPI app as it is made (`FastAPI(routes=...)`; Gradio's
    `launch(app_kwargs={"routes": ...})`), so they exist before the server answers its first request
    and come before the app's own. `unavailable`: every /v1 request answered 503 with this reason."""
    return list((unavailable_router(unavailable) if unavailable else openai_router(studio, **kw)).routes)


def add_openai_routes(app: fastapi.FastAPI, studio: Studio, *, unavailable: str | None = None, **kw) -> None:
    """Include `openai_router(studio, **kw)` into `app` ahead of its existing routes (so no catch-all
    or mount of the app's can shadow /v1). Works on a running app: routes are looked up per request.
    `unavailable`: serve no API, answer every /v1 request 503 with this reason instead."""
    routes = app.router.routes
    before = len(routes)
    # include_router appends (FastAPI 0.165: one route for the router)
    app.include_router(unavailable_router(unavailable) if unavailable else openai_router(studio, **kw))
    routes[:] = routes[before:] + routes[:before]
