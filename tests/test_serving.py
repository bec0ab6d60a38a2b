"""Many testers at once through the scheduler: concurrent gradio_client visitors rendering and
streaming, the same audio for a seed whoever else is rendering, the wait place in the progress
line, and a clear busy answer beyond the queue's bound. Tiny preset, CPU."""

from __future__ import annotations

import json
import re
import threading
import time

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import launch

from csm_multi.codec import MimiCodec, build_mimi
from csm_multi.engine import Engine
from csm_multi.errors import CsmError
from csm_multi.render import RenderConfig
from csm_multi.studio import Studio
from csm_multi.text import ByteTokenizer

gradio_client = pytest.importorskip("gradio_client")
VISITORS = 6


def tone(path, seconds=1.2, hz=180):
    t = np.arange(int(24_000 * seconds)) / 24_000
    sf.write(str(path), 0.2 * np.sin(2 * np.pi * hz * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)), 24_000)
    return str(path)


@pytest.fixture(scope="module")
def codec():
    return MimiCodec(build_mimi(None))


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model, codec):
    """The app over an engine with a scheduler of 8 rows, 2 per visitor (as serve() sets it up)."""
    root = tmp_path_factory.mktemp("serving")
    engine = Engine(tiny_model, ByteTokenizer(), codec, watermark=False)
    engine.serve(max_rows=8, per_visitor=2)
    studio = Studio(engine, root / "profiles", outputs_root=root / "out")
    url, demo = launch(studio)
    yield url, studio, tone(root / "clip.wav")
    demo.close()
    engine.stop_serving()


def at_once(n, visit):
    """`visit(i)` for i in range(n), all started together on threads: their results by i. Fails with the
    errors any of them raised."""
    results, errors = {}, []

    def run(i):
        try:
            results[i] = visit(i)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return results


def mapping(name):
    return {"headers": ["speaker", "profile"], "data": [[name, name]]}


def render(client, key, name, seed):
    out = client.predict(key, f"{name}: Hello there, line for {name}.", mapping(name), 0.9, 50, seed, 1.5, 0,
                         "conversational", api_name="/render_script")
    assert str(out[1]).startswith("Done: 1 line,"), out[1]
    return sf.read(out[2] if isinstance(out[2], str) else out[3][0])[0]


def test_visitors_render_at_once_in_one_batch_and_get_the_audio_of_their_seed(served):
    url, studio, clip = served
    keys = [f"serving-visitor-{i:02d}" for i in range(VISITORS)]
    clients = [gradio_client.Client(url, verbose=False) for _ in keys]
    for i, (client, key) in enumerate(zip(clients, keys)):
        client.predict(key, gradio_client.handle_file(clip), "a short test clip", f"V{i}", api_name="/add_profile")
    before = studio.engine.scheduler.stats()["batch_sizes"]
    together = at_once(VISITORS, lambda i: render(clients[i], keys[i], f"V{i}", seed=40 + i))
    after = studio.engine.scheduler.stats()["batch_sizes"]
    assert max(b for b, n in after.items() if n > before.get(b, 0)) > 1  # lines of different visitors shared steps
    for i in (0, VISITORS - 1):  # alone, later: the same audio for the same seed
        np.testing.assert_array_equal(render(clients[i], keys[i], f"V{i}", seed=40 + i), together[i])


def test_quick_streams_from_several_visitors_at_once(served):
    url, _, _ = served

    def say(i):
        client = gradio_client.Client(url, verbose=False)
        return client.predict(f"serving-quick-{i:02d}", f"Quick line number {i}.", None, 0.9, 50, 5 + i, 1.0,
                              api_name="/say")

    for out in at_once(3, say).values():
        assert "seed" in str(out[-1]) and sf.read(out[1])[0].size > 0


def test_visitors_making_the_same_audio_at_once_all_get_it(served, monkeypatch):
    """Testers trying the same script with the same seed at once make the same audio, and every
    script's pauses are the same silence. Gradio stored an array yielded to a live player in its shared
    cache under the samples' hash, writing and reading the file in place: with 8 such renders at once a
    reader caught another's half-written file and the render failed ("Decoding the streamed audio
    chunk failed"). The live pieces bypass that cache, and every visitor gets the whole dialogue."""
    import gradio.processing_utils as pu

    import app

    url, _, _ = served
    cached = []
    real = pu.save_audio_to_cache
    monkeypatch.setattr(pu, "save_audio_to_cache", lambda *a, **k: cached.append(a[0].shape) or real(*a, **k))
    script = "A: The same words for everyone.\nB: And the same second line."

    def visit(i):
        client = gradio_client.Client(url, verbose=False)
        job = client.submit(f"serving-same-{i:02d}", script, {"headers": ["speaker", "profile"], "data": []},
                            0.9, 50, 11, 1.0, 300, "conversational", api_name="/render_script")
        out = job.result(timeout=300)
        assert str(out[1]).startswith("Done: 2 lines"), out[1]
        assert any(isinstance(o[0], str) and o[0].endswith(".m3u8") for o in job.outputs())  # it streamed
        return sf.read(out[2])[0]

    results = at_once(VISITORS, visit)
    live = [shape for shape in cached if shape[0] <= app.LIVE_PIECE_SAMPLES]  # the rest: whole dialogues
    assert not live, f"{len(live)} live pieces went through Gradio's shared audio cache"
    for audio in results.values():
        np.testing.assert_array_equal(audio, results[0])


def test_status_shows_the_generation_rows(served):
    url, _, _ = served
    text = gradio_client.Client(url, verbose=False).predict("serving-status-00", api_name="/status")
    assert "**Generation:**" in text and "rows busy" in text
    assert re.search(r"\*\*Prefix cache:\*\* \d+ prompts started from a kept state .* \d+ states, [\d.]+/512 MB", text), text


def test_one_action_at_a_time_changes_a_sessions_rendering(served, monkeypatch):
    """Each action answers with the rendering it started from, changed. A take switch or a pause set
    while a New take ran came back undone when the New take finished, and of two New takes on
    different lines the first was lost (found by a hostile-visitor pass). A second action of the same
    session (page, or gradio_client Client) is now refused while one runs; other sessions are not held."""
    url, studio, _ = served
    client = gradio_client.Client(url, verbose=False)
    key = "visitor-one-action-01"
    mapping = {"headers": ["speaker", "profile"], "data": [["A", "(none)"], ["B", "(none)"]]}
    out = client.predict(key, "A: One short line.\nB: And another.", mapping, 0.9, 50, 5, 3, 0, "conversational",
                         api_name="/render_script")
    assert out[1].startswith("Done: 2 lines")
    real = studio.new_takes

    def crawling(*a, progress=None, **kw):
        def crawl(item):
            time.sleep(0.3)
            progress(item)
        return real(*a, progress=crawl, **kw)

    monkeypatch.setattr(studio, "new_takes", crawling)  # a 3 s line: ~15 s
    job = client.submit(key, 1, api_name="/new_take")
    time.sleep(1.5)
    assert not job.done()
    for args, name in (((key, 2, 1), "/choose_take"), ((key, 2), "/new_take"), ((key, 2, 1.5), "/set_pause"),
                       ((key,), "/reopen_last")):
        with pytest.raises(Exception, match="^The new take of line 1 is still running on this page"):
            client.predict(*args, api_name=name)
    other = gradio_client.Client(url, verbose=False)  # another session is not held by this one's action
    assert other.predict("visitor-one-action-02", "A: Hi.", mapping, 0.9, 50, 5, 1, 0, "conversational",
                         api_name="/render_script")[1].startswith("Done: 1 line,")
    assert job.result()[0].startswith("New take of line 1")
    out = client.predict(key, 2, 1.5, api_name="/set_pause")  # free again, and on the rendering with the take
    manifest = json.loads(next(Path(f).read_text(encoding="utf-8") for f in out[2] if f.endswith("dialogue.json")))
    assert manifest["lines"][0]["takes"] == 2 and manifest["lines"][1]["pause_before_s"] == 1.5


# before the tests below: their engines share the tiny model (its caches) with `served`'s
def test_a_fast_mode_script_longer_than_the_queue_renders_and_leaves_nothing_running(served):
    """Fast mode handed every line to the scheduler at once: a script of more lines than a visitor's
    rows plus places in the queue (8 + 16) was refused ("you already have 16 requests waiting") on an
    idle server, while the 24 lines submitted before the refusal went on generating unseen. It now
    keeps at most a batch's rows of them in the scheduler at a time."""
    url, studio, _ = served
    client = gradio_client.Client(url, verbose=False)
    script = "\n".join(f"{'AB'[i % 2]}: Line number {i + 1}." for i in range(30))
    out = client.predict("visitor-fast-30-01", script, {"headers": ["speaker", "profile"], "data": []}, 0.9, 50, 5,
                         1, 0, "fast", api_name="/render_script")
    assert out[1].startswith("Done: 30 lines")
    deadline = time.monotonic() + 5
    while studio.engine.scheduler.stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = studio.engine.scheduler.stats()
    assert stats["active"] == stats["waiting"] == stats["prefilling"] == 0  # nothing of it left running


@pytest.fixture
def one_row_studio(tmp_path, tiny_model, codec):
    engine = Engine(tiny_model, ByteTokenizer(), codec, watermark=False)
    engine.serve(max_rows=1, max_waiting=1)
    studio = Studio(engine, tmp_path / "profiles", outputs_root=tmp_path / "out")
    clip = tone(tmp_path / "clip.wav")
    for key in ("first-visitor", "second-visitor", "third-visitor"):
        studio.add_profile(key, "A", clip, "a short test clip")
    yield studio
    engine.stop_serving()


def test_a_waiting_render_shows_its_place_and_beyond_the_bound_the_answer_is_busy(one_row_studio):
    studio = one_row_studio
    long = RenderConfig(max_line_ms=20_000, seed=1, temperature=0.9, topk=50)
    stop = threading.Event()
    first = threading.Thread(target=lambda: _render_quietly(studio, "first-visitor", long, stop))
    first.start()
    deadline = time.monotonic() + 30
    while not studio.engine.scheduler.stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.02)
    stages, outcome = [], {}

    def second():
        try:
            outcome["result"] = studio.render("second-visitor", "A: Waiting in line.", {"A": "A"},
                                              RenderConfig(max_line_ms=1000, seed=2),
                                              progress=lambda p: stages.append(getattr(p, "stage", "")))
        except CsmError as e:
            outcome["error"] = e

    waiter = threading.Thread(target=second)
    waiter.start()
    while studio.engine.scheduler.stats()["waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(CsmError, match="the server is busy: 1 requests are already waiting"):
        studio.render("third-visitor", "A: No room.", {"A": "A"}, RenderConfig(max_line_ms=1000, seed=3))
    time.sleep(1.2)  # the waiting render reports its place every half second
    stop.set()
    first.join(60)
    waiter.join(60)
    assert "result" in outcome, outcome
    assert any(s.startswith("waiting for a free generation row") for s in stages), stages


def _render_quietly(studio, key, config, stop):
    try:
        studio.render(key, "A: A long line that keeps the only row busy for a while.", {"A": "A"}, config,
                      cancel=stop.is_set)
    except CsmError:
        pass  # cancelled


def test_the_served_app_answers_the_openai_client_beside_the_page(tmp_path):
    """`python app.py` itself (main(), its queue and scheduler): /v1 answers the official client and
    the page still loads."""
    import urllib.request

    openai = pytest.importorskip("openai")
    from csm_multi.stress import AppServer

    with AppServer(tmp_path / "profiles", tmp_path / "tmp") as server:
        client = openai.OpenAI(base_url=server.url + "v1", api_key="served-app-key-01", max_retries=0)
        assert "csm-1b" in [m.id for m in client.models.list()]
        speech = client.audio.speech.create(model="csm-1b", voice="none", input="Hello from the API.",
                                            response_format="pcm", extra_body={"max_audio_length_ms": 800, "seed": 3})
        assert speech.content and len(speech.content) % 2 == 0
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "v1", api_key="not a key!", max_retries=0).models.list()
        with urllib.request.urlopen(server.url, timeout=10) as page:
            assert page.status == 200 and b"gradio" in page.read().lower()
