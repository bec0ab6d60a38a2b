"""The OpenAI-compatible speech API on the tiny preset, served by uvicorn on 127.0.0.1 and driven
by the real `openai` client, as Open WebUI or a script would."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time

import fastapi
import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import torch
import uvicorn

from csm_multi import scheduler
from csm_multi.codec import MimiCodec, build_mimi
from csm_multi.engine import AudioChunk, Engine
from csm_multi.errors import BusyError
from csm_multi.openai_api import MODEL_ALIASES, add_openai_routes, wav_header
from csm_multi.studio import Studio
from csm_multi.text import ByteTokenizer

KEY = "api-visitor-1234"
SHORT = {"max_audio_length_ms": 480}  # 6 frames: one chunk
TWO_CHUNKS = {"max_audio_length_ms": 1040}  # 13 frames: chunks of 11 and 2


def _clip(freq: float = 220.0, seconds: float = 1.5, sr: int = 16_000) -> bytes:
    t = np.arange(int(sr * seconds)) / sr
    audio = 0.3 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    out = io.BytesIO()
    sf.write(out, audio.astype(np.float32), sr, format="WAV")
    return out.getvalue()


def _serve(app: fastapi.FastAPI):
    """`app` on a free port of 127.0.0.1 in a thread: (url, stop)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started

    def stop():
        server.should_exit = True
        thread.join(5)
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model, ByteTokenizer(), MimiCodec(build_mimi(None, seed=0)), watermark=False)


@pytest.fixture(scope="module")
def studio(engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    studio = Studio(engine, root / "profiles", outputs_root=root / "out")
    studio.add_profile(KEY, "Alice", _clip(), transcript="Hello there, this is Alice.")
    return studio


@pytest.fixture(scope="module")
def url(studio):
    app = fastapi.FastAPI()

    @app.get("/{path:path}")
    def page(path: str):  # a catch-all of the app's own, like a web page's, which the API must come before
        return "the page"

    add_openai_routes(app, studio)
    url, stop = _serve(app)
    assert httpx.get(url + "/somewhere").json() == "the page"
    yield url
    stop()


def client(url: str, key: str | None = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def say(url, fmt="pcm", voice="Alice", key=KEY, **extra):
    """(bytes, headers) of one request; `extra` goes into the JSON body (csm's own fields)."""
    raw = client(url, key).audio.speech.with_raw_response.create(
        model="csm-1b", voice=voice, input="Hello there.", response_format=fmt, extra_body={"seed": 3, **extra})
    return raw.content, raw.headers


def test_every_format_decodes_at_24_khz_with_the_pcm_samples(url):
    pcm, headers = say(url, "pcm", **SHORT)
    assert headers["content-type"] == "audio/pcm" and headers["x-seed"] == "3"
    assert len(pcm) == 2 * 6 * 1920  # 16-bit samples of 6 frames
    samples = len(pcm) // 2
    for fmt, media_type in (("wav", "audio/wav"), ("flac", "audio/flac"), ("mp3", "audio/mpeg"),
                            ("opus", "audio/ogg; codecs=opus")):
        data, headers = say(url, fmt, **SHORT)
        assert headers["content-type"] == media_type, fmt
        audio, rate = sf.read(io.BytesIO(data), dtype="int16")
        assert rate == 24_000, fmt
        if fmt in ("mp3", "opus"):  # lossy: their encoder delay and padding come on top
            assert samples <= len(audio) <= samples + 3000, fmt
        else:  # lossless: the same samples
            assert audio.tobytes() == pcm, fmt
        if fmt == "wav":  # streamed: its sizes say "unknown"
            assert data[:44] == wav_header()


def test_same_seed_same_bytes_and_the_seed_is_reported(url):
    a, _ = say(url, voice="none", seed=11, **SHORT)
    b, _ = say(url, voice="none", seed=11, **SHORT)
    c, _ = say(url, voice="none", seed=12, **SHORT)
    assert a == b and a != c
    _, headers = say(url, voice={"id": "Alice"}, seed=None, **SHORT)  # OpenAI's voice object; a drawn seed
    assert int(headers["x-seed"]) >= 0


def test_audio_streams_while_it_is_generated_and_the_server_keeps_serving(url, studio, monkeypatch):
    """The engine is held after its first chunk until the client has that chunk's bytes (and another
    request was answered meanwhile): only a streamed response can get there."""
    real, received, held = studio.engine.stream, threading.Event(), []

    def stream(*args, **kwargs):
        chunks = real(*args, **kwargs)
        yield next(chunks)
        held.append(received.wait(20))
        yield from chunks

    monkeypatch.setattr(studio.engine, "stream", stream)
    api = client(url)
    pieces = []
    with api.audio.speech.with_streaming_response.create(
            model="tts-1", voice="Alice", input="Hello there.", response_format="pcm",
            extra_body={"seed": 3, **TWO_CHUNKS}) as response:
        for piece in response.iter_bytes():
            pieces.append(piece)
            if not received.is_set():
                assert api.models.list().data[0].id == "csm-1b"  # answered while the generation waits
                received.set()
    assert held == [True]
    assert len(pieces) > 1 and len(b"".join(pieces)) == 13 * 1920 * 2


def test_generation_runs_in_a_thread_of_its_own_as_the_caller(url, studio, monkeypatch):
    seen = []

    def stream(text, speaker, context, sampling, chunks, cancel):
        assert not cancel()  # true once the client has gone (the engine asks it after every frame)
        seen.append((scheduler.current_visitor(), threading.current_thread().name, text, speaker, len(context)))
        yield AudioChunk(audio=torch.zeros(1920), frames=1, seed=sampling.seed, watermarked=False)

    monkeypatch.setattr(studio.engine, "stream", stream)
    pcm, _ = say(url, voice="alice")  # voices are found ignoring case
    assert pcm == bytes(2 * 1920)
    [(visitor, thread, text, speaker, n_context)] = seen
    assert visitor.startswith("api-") and KEY not in visitor  # counted per caller, the key itself not kept
    assert thread == "openai-speech" and text == "Hello there." and n_context == 1
    assert speaker == studio.library(KEY).get("Alice").speaker_id


def test_a_client_that_goes_away_stops_the_generation(url, studio, monkeypatch):
    real, received, pulled, closed = studio.engine.stream, threading.Event(), [], threading.Event()

    def stream(*args, **kwargs):
        try:
            for chunk in real(*args, **kwargs):
                pulled.append(chunk)
                yield chunk
                received.wait(20)
        finally:
            closed.set()

    monkeypatch.setattr(studio.engine, "stream", stream)
    with httpx.stream("POST", url + "/v1/audio/speech", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"input": "Hello there.", "voice": "none", "response_format": "pcm", "seed": 3,
                            "max_audio_length_ms": 8000}) as response:
        assert response.status_code == 200
        next(response.iter_raw())
    time.sleep(0.5)  # the server sees the disconnect
    received.set()
    assert closed.wait(10)
    assert len(pulled) < 8000 // 80 // 11  # it stopped before the last of its 10 chunks


def test_models_and_voices(url, studio):
    api = client(url)
    assert [m.id for m in api.models.list()] == ["csm-1b", *MODEL_ALIASES]
    model = api.models.retrieve("tts-1")
    assert model.owned_by == "csm-multi" and model.object == "model"
    with pytest.raises(openai.NotFoundError, match="whisper-1"):
        api.models.retrieve("whisper-1")
    voices = httpx.get(url + "/v1/audio/voices", headers={"Authorization": f"Bearer {KEY}"})
    assert voices.json() == {"voices": ["Alice"]}
    other = httpx.get(url + "/v1/audio/voices", headers={"Authorization": "Bearer another-visitor-5678"})
    assert other.json() == {"voices": []}  # each key is its own library
    assert httpx.get(url + "/v1/audio/models").json()["models"][0] == {"id": "csm-1b"}  # Open WebUI's, keyless


@pytest.mark.parametrize("key", [None, "short", "has spaces in it!"])
def test_a_missing_or_malformed_key_is_an_authentication_error(url, key):
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    r = httpx.post(url + "/v1/audio/speech", headers=headers, json={"input": "Hi.", "voice": "none"})
    assert r.status_code == 401
    error = r.json()["error"]
    assert error["type"] == "authentication_error" and "library key" in error["message"]
    if key is not None:
        with pytest.raises(openai.AuthenticationError):
            client(url, key).models.list()


@pytest.mark.parametrize("change, param, words", [
    ({"voice": "Bob"}, "voice", ["'Bob'", "Alice", '"none"']),
    ({"extra_body": {"colour": "blue"}}, "colour", ["unknown field 'colour'", "input"]),
    ({"response_format": "aac"}, "response_format", ["not supported", "mp3, opus, wav, pcm, flac"]),
    ({"speed": 1.5}, "speed", ["1.5", "not supported"]),
    ({"instructions": "Speak like a pirate."}, "instructions", ["no instructions"]),
    ({"stream_format": "sse"}, "stream_format", ["not supported"]),
    ({"model": "whisper-1"}, "model", ["'whisper-1'", "csm-1b"]),
    ({"input": " "}, "input", ["empty"]),
    ({"input": "x" * 1001}, "input", ["1001 characters", "1000"]),
    ({"extra_body": {"seed": "seven"}}, "seed", ["whole number", "got a string"]),
    ({"extra_body": {"seed": -5}}, "seed", ["-5 is out of range", "0 to 9223372036854775807"]),  # not 9.22337e+18
    ({"extra_body": {"temperature": 9.0}}, "temperature", ["0.1 to 1.5"]),
    ({"extra_body": {"max_audio_length_ms": 60_000}}, "max_audio_length_ms", ["30000"]),
])
def test_refusals_name_the_field(url, change, param, words):
    request = {"model": "csm-1b", "voice": "Alice", "input": "Hello.", "response_format": "wav", **change}
    with pytest.raises(openai.BadRequestError) as e:
        client(url).audio.speech.create(**request)
    assert e.value.param == param and e.value.type == "invalid_request_error"
    assert all(word in e.value.body["message"] for word in words), e.value.body["message"]


def test_wrong_types_and_bad_json_are_openai_errors_not_fastapi_details(url):
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/v1/audio/speech", headers=headers, json={"input": 42, "voice": "none"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input" and "got the number 42" in r.text
    r = httpx.post(url + "/v1/audio/speech", headers=headers, json={"input": "Hi.", "voice": "none", "topk": 1.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "topk" and "got the number 1.5" in r.text
    r = httpx.post(url + "/v1/audio/speech", headers=headers, content=b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/audio/speech", headers=headers, json={"voice": "none"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = httpx.post(url + "/v1/audio/speech", headers=headers, content=b"[" * 100_000)
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.get(url + "/v1/chat/completions", headers=headers)
    assert r.status_code == 404 and "POST /v1/audio/speech" in r.json()["error"]["message"]
    r = httpx.get(url + "/v1/audio/speech", headers=headers)  # a served path, the wrong method
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "use POST /v1/audio/speech" in r.text
    r = httpx.post(url + "/v1/models", headers=headers)
    assert r.status_code == 405 and r.headers["allow"] == "GET"


def test_control_characters_and_unpaired_surrogates_are_dropped_from_the_input(url):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    # JSON can carry an unpaired surrogate, and a browser can send one: written here as JSON escapes
    body = b'{"input": "\\u0000\\ud800\\u001b\\udfff", "voice": "none", "response_format": "pcm"}'
    r = httpx.post(url + "/v1/audio/speech", headers=headers, content=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    assert "only invisible, control or invalid characters" in r.json()["error"]["message"]
    body = b'{"input": "\\u200b\\u202e\\u200d ", "voice": "none", "response_format": "pcm"}'  # zero-width, bidi
    r = httpx.post(url + "/v1/audio/speech", headers=headers, content=body)
    assert r.status_code == 400 and "only invisible" in r.json()["error"]["message"]
    body = b'{"input": "Hel\\ud800lo\\u0007.", "voice": "none", "response_format": "pcm", "seed": 3}'
    spoken = httpx.post(url + "/v1/audio/speech", headers=headers, content=body, timeout=60)
    plain = httpx.post(url + "/v1/audio/speech", headers=headers, timeout=60,
                       json={"input": "Hello.", "voice": "none", "response_format": "pcm", "seed": 3})
    assert spoken.status_code == 200 and spoken.content == plain.content  # the same text once cleaned


def test_a_full_queue_is_a_rate_limit_error_with_retry_after(url, studio, monkeypatch):
    def busy(*args, **kwargs):
        raise BusyError("the server's generation queue is full")

    monkeypatch.setattr(studio.engine, "stream", busy)
    with pytest.raises(openai.RateLimitError) as e:
        client(url).audio.speech.create(model="csm-1b", voice="none", input="Hi.")
    assert e.value.response.headers["retry-after"] == "5" and "queue is full" in e.value.body["message"]


def test_a_failure_inside_says_nothing_of_the_server(url, studio, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError(f"CUDA error at {studio.profiles_root}/x.py line 3")

    monkeypatch.setattr(studio.engine, "stream", broken)
    with pytest.raises(openai.InternalServerError) as e:
        client(url).audio.speech.create(model="csm-1b", voice="none", input="Hi.")
    assert e.value.body["type"] == "server_error" and str(studio.profiles_root) not in str(e.value.body)


def test_a_shared_library_needs_no_key(engine, tmp_path):
    shared = Studio(engine, tmp_path / "profiles", outputs_root=tmp_path / "out", shared_library=True)
    shared.add_profile(None, "Narrator", _clip(180), transcript="This is the narrator speaking.")
    app = fastapi.FastAPI()
    add_openai_routes(app, shared)
    url, stop = _serve(app)
    try:
        assert httpx.get(url + "/v1/audio/voices").json() == {"voices": ["Narrator"]}
        r = httpx.post(url + "/v1/audio/speech", json={"input": "Hi.", "voice": "narrator", "response_format": "pcm",
                                                       "seed": 1, "max_audio_length_ms": 160})
        assert r.status_code == 200 and len(r.content) == 2 * 1920 * 2
        assert client(url, "sk-anything").models.list().data[0].id == "csm-1b"  # any key will do
    finally:
        stop()


def test_routes_added_to_a_running_gradio_app_come_first_and_answer(studio):
    gr = pytest.importorskip("gradio")
    with gr.Blocks() as demo:
        gr.Markdown("page")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        add_openai_routes(demo.app, studio)
        api = client(demo.local_url.rstrip("/"))
        assert api.models.list().data[0].id == "csm-1b"
        pcm = api.audio.speech.create(model="csm-1b", voice="Alice", input="Hi.", response_format="pcm",
                                      extra_body={"seed": 2, "max_audio_length_ms": 160}).content
        assert len(pcm) == 2 * 1920 * 2
        assert httpx.get(demo.local_url).status_code == 200  # the page is still there
    finally:
        demo.close()


def test_an_unavailable_api_says_why_in_openai_shape(studio):
    import fastapi
    from fastapi.testclient import TestClient

    from csm_multi.openai_api import add_openai_routes

    app = fastapi.FastAPI()
    add_openai_routes(app, studio, unavailable="this Space runs on ZeroGPU: not served here")
    client = TestClient(app)
    for method, path in (("post", "/v1/audio/speech"), ("get", "/v1/models")):
        r = getattr(client, method)(path)
        assert r.status_code == 503
        assert r.json()["error"]["message"] == "this Space runs on ZeroGPU: not served here"
        assert r.json()["error"]["code"] == "unavailable"


def test_a_client_that_stops_reading_frees_its_generation_thread():
    """A streaming client that stays connected but reads nothing: once the short queue is full and
    nothing is taken for `stall_s`, the generation is asked to stop and its thread ends, instead of
    waiting as long as the connection stays open."""
    from csm_multi.openai_api import _Pump

    made, closed = [], threading.Event()

    def produce(stopped):
        try:
            for i in range(1000):
                if stopped():
                    return
                made.append(i)
                yield b"audio"
        finally:
            closed.set()

    async def client_reads_once():
        pump = _Pump(produce, depth=2, stall_s=0.5)
        assert await pump.next() == b"audio"
        await asyncio.sleep(2.0)  # connected, reading nothing

    asyncio.run(client_reads_once())
    assert closed.wait(5) and len(made) <= 5
