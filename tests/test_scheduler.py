"""The continuous-batching scheduler: rows join and leave at frame boundaries, each request's codes
equal its solo run with the same seed, cancel / EOS / frame limits per row, fair admission, a bounded
queue, and memory-pressure shrinking. Tiny preset, CPU float32 (where equality is exact)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from csm_multi import SamplingConfig, StreamConfig
from csm_multi.codec import MimiCodec, build_mimi
from csm_multi.config import get_preset
from csm_multi.engine import Engine
from csm_multi.errors import BusyError
from csm_multi.frames import Segment
from csm_multi.fused import fuse_layers
from csm_multi.model import CSM
from csm_multi.scheduler import GenerationRequest, Scheduler, as_visitor
from csm_multi.text import ByteTokenizer

TEXTS = ["A fairly long first line of text, long enough.", "Short.", "Third one here.", "And a fourth, medium.",
         "Five.", "Six is a bit longer than five."]


@pytest.fixture(scope="module")
def codec():
    return MimiCodec(build_mimi(None))


@pytest.fixture(scope="module", params=["torchtune", "fused"])
def model(request):
    m = CSM(get_preset("tiny")).init_random_(seed=1).eval()
    return fuse_layers(m) if request.param == "fused" else m


@pytest.fixture
def engine(model, codec):
    e = Engine(model, ByteTokenizer(), codec, watermark=False)
    yield e
    e.stop_serving()


def solo(engine: Engine, text: str, speaker: int, sampling: SamplingConfig) -> torch.Tensor:
    assert engine.scheduler is None
    return engine.generate_codes(text, speaker, (), sampling)[0].cpu()


def request(engine: Engine, text: str, sampling: SamplingConfig, seed: int, visitor=None, speaker=0,
            context=()) -> GenerationRequest:
    tokens, mask = engine.build_prompt(text, speaker, context)
    return GenerationRequest(tokens, mask, sampling.temperature, sampling.topk, seed, sampling.max_frames, visitor)


def test_rows_joining_and_leaving_at_different_frames_get_their_solo_codes(engine):
    """Six sampled requests with different seeds, limits and settings, submitted while others run
    (so they join at different frames and leave at different frames): each equals its solo run."""
    plans = [(TEXTS[i], i % 2, SamplingConfig(temperature=0.9 if i % 3 else 0.7, topk=50 if i % 2 else 20,
                                             seed=100 + i, max_audio_length_ms=80 * (6 + 3 * i)))
             for i in range(len(TEXTS))]
    expected = [solo(engine, text, spk, s) for text, spk, s in plans]
    assert len({e.shape[1] for e in expected}) > 2  # they leave at different frames
    scheduler = engine.serve(max_rows=3)
    tickets, got = [], [None] * len(plans)

    def consume(i, ticket):
        got[i] = torch.stack(list(ticket), dim=1)

    threads = []
    for i, (text, spk, s) in enumerate(plans):
        tokens, mask = engine.build_prompt(text, spk)
        ticket = scheduler.submit(GenerationRequest(tokens, mask, s.temperature, s.topk, s.seed, s.max_frames))
        tickets.append(ticket)
        threads.append(threading.Thread(target=consume, args=(i, ticket)))
        threads[-1].start()
        time.sleep(0.05 * (i % 3))  # later requests arrive while earlier rows are mid-utterance
    for t in threads:
        t.join(60)
    for e, g in zip(expected, got):
        assert torch.equal(g, e)
    stats = scheduler.stats()
    assert stats["peak_rows"] == 3 and max(stats["batch_sizes"]) == 3  # rows really shared steps
    assert len(stats["batch_sizes"]) > 1  # and the batch size changed as rows came and went


def test_engine_calls_from_many_threads_share_the_batch_and_keep_their_codes(engine):
    greedy = SamplingConfig(topk=1, seed=0, max_audio_length_ms=400)
    sampled = SamplingConfig(topk=30, temperature=0.8, seed=7, max_audio_length_ms=400)
    expected = {(t, s.topk): solo(engine, t, 0, s) for t in TEXTS[:4] for s in (greedy, sampled)}
    engine.serve(max_rows=8)
    got = {}

    def call(text, s):
        with as_visitor(f"v-{text[:3]}"):
            got[(text, s.topk)] = engine.generate(text, 0, (), s).codes

    threads = [threading.Thread(target=call, args=(t, s)) for t in TEXTS[:4] for s in (greedy, sampled)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got.keys() == expected.keys()
    for key, codes in expected.items():
        assert torch.equal(got[key], codes), key
    assert max(engine.scheduler.stats()["batch_sizes"]) > 1


def test_generate_batch_and_stream_through_the_scheduler_match_solo(engine):
    s = SamplingConfig(topk=40, temperature=0.9, seed=3, max_audio_length_ms=480)
    reqs = [(TEXTS[0], 0, []), (TEXTS[1], 1, []), (TEXTS[2], 0, [])]
    alone = engine.generate_batch(reqs, s)
    streamed_alone = torch.cat([c.audio for c in engine.stream(TEXTS[3], 0, (), s)])
    engine.serve(max_rows=2)
    batch = engine.generate_batch(reqs, s)
    assert [u.seed for u in batch] == [3, 4, 5]
    for a, b in zip(alone, batch):
        assert torch.equal(a.codes, b.codes)
        torch.testing.assert_close(a.audio, b.audio)
    streamed = torch.cat([c.audio for c in engine.stream(TEXTS[3], 0, (), s)])
    torch.testing.assert_close(streamed, streamed_alone)


def test_a_batch_longer_than_a_visitors_queue_runs_through_a_window_with_solo_codes(engine):
    """A fast-mode script hands every line at once. Submitted all at once, a script of more lines than
    the visitor's place in the queue was refused (on the app: any fast script over 24 lines), while the
    lines submitted before the refusal went on generating. Now at most `max_rows` are in at a time."""
    s = SamplingConfig(topk=40, temperature=0.9, seed=11, max_audio_length_ms=80 * 4)
    reqs = [(TEXTS[i % len(TEXTS)], i % 2, []) for i in range(9)]
    alone = engine.generate_batch(reqs, s)
    scheduler = engine.serve(max_rows=2, waiting_per_visitor=1)  # 2 rows + 1 waiting: a 4th at once is refused
    with as_visitor("fast-script"):
        batch = engine.generate_batch(reqs, s)
    for a, b in zip(alone, batch, strict=True):
        assert torch.equal(a.codes, b.codes)
    assert scheduler.stats()["peak_rows"] == 2  # and the window kept both rows busy
    tickets = []  # what submitting them all at once met
    with pytest.raises(BusyError):
        for i, (text, _, _) in enumerate(reqs):
            tickets.append(scheduler.submit(request(engine, text, s, seed=i, visitor="fast-script")))
    assert len(tickets) == 3
    for t in tickets:
        t.cancel()


def test_a_refused_batch_starts_nothing_and_a_stopped_one_leaves_nothing_behind(engine):
    """The first request of a batch that finds no place: BusyError, and none of the batch is queued or
    generating. A batch stopped by its caller (a cancelled render: `on_frame` raises) cancels all its
    requests, those it had not started to read included."""
    s = SamplingConfig(topk=50, temperature=0.9, max_audio_length_ms=80 * 200)
    scheduler = engine.serve(max_rows=1, max_waiting=1)
    hog = [scheduler.submit(request(engine, TEXTS[i], s, seed=i, visitor="hog")) for i in range(2)]
    running = iter(hog[0])
    next(running)  # one row busy, one request waiting: the queue is full
    with as_visitor("late"), pytest.raises(BusyError, match="busy"):
        engine.generate_batch([(TEXTS[2], 0, []), (TEXTS[3], 0, [])], s)
    stats = scheduler.stats()
    assert stats["active"] == 1 and stats["waiting"] == 1  # the hog's two, nothing of the refused batch
    for t in hog:
        t.cancel()

    scheduler = engine.serve(max_rows=2)

    class Stop(Exception):
        pass

    def stop_after_two():
        if scheduler.stats()["frames"] >= 2:
            raise Stop
    with pytest.raises(Stop):
        engine.generate_batch([(TEXTS[i], 0, []) for i in range(4)], s, on_frame=stop_after_two)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(scheduler.stats()[k] for k in ("active", "prefilling", "waiting")):
        time.sleep(0.02)
    stats = scheduler.stats()
    assert stats["active"] == stats["prefilling"] == stats["waiting"] == 0


def test_cancel_end_frame_and_limit_per_row(engine):
    s = SamplingConfig(topk=50, temperature=0.9, max_audio_length_ms=80 * 40)
    scheduler = engine.serve(max_rows=4)
    long_a = scheduler.submit(request(engine, TEXTS[0], s, seed=1))
    long_b = scheduler.submit(request(engine, TEXTS[2], s, seed=2))
    limited = scheduler.submit(request(engine, TEXTS[1], s.with_(max_audio_length_ms=80 * 3), seed=3))
    it_a = iter(long_a)
    first = [next(it_a) for _ in range(3)]
    long_a.cancel()
    rest = list(it_a)  # at most the frames already queued before the cancel reached the loop
    assert len(first) == 3 and len(rest) < 5
    assert len(list(limited)) == 3  # its limit, while the others go on
    b = list(long_b)
    assert 3 < len(b) <= 40
    # a request that ends at once (the end frame first) yields nothing and frees its row
    eos = scheduler.submit(request(engine, TEXTS[4], s.with_(max_audio_length_ms=80), seed=4))
    assert len(list(eos)) <= 1
    deadline = time.monotonic() + 10
    while scheduler.stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scheduler.stats()["active"] == 0


def test_breaking_out_of_a_ticket_cancels_it(engine):
    s = SamplingConfig(topk=50, temperature=0.9, max_audio_length_ms=80 * 200)
    scheduler = engine.serve(max_rows=2)
    ticket = scheduler.submit(request(engine, TEXTS[0], s, seed=5))
    for _ in ticket:
        break
    assert ticket.cancelled
    deadline = time.monotonic() + 10
    while scheduler.stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scheduler.stats()["active"] == 0 and scheduler.frames < 50


def test_bounded_queue_busy_answer_and_wait_places(engine):
    s = SamplingConfig(topk=50, temperature=0.9, max_audio_length_ms=80 * 300)
    scheduler = engine.serve(max_rows=1, max_waiting=2, waiting_per_visitor=8)
    running = scheduler.submit(request(engine, TEXTS[0], s, seed=1, visitor="a"))
    it = iter(running)
    next(it)  # it holds the only row now
    w1 = scheduler.submit(request(engine, TEXTS[1], s, seed=2, visitor="b"))
    w2 = scheduler.submit(request(engine, TEXTS[2], s, seed=3, visitor="c"))
    assert (w1.waiting, w2.waiting) == (1, 2)
    with pytest.raises(BusyError, match="2 requests are already waiting"):
        scheduler.submit(request(engine, TEXTS[3], s, seed=4, visitor="d"))
    places = []
    w2_frames = threading.Thread(target=lambda: list(w2.frames(on_wait=places.append, poll_s=0.05)))
    w2_frames.start()
    time.sleep(0.3)
    w1.cancel()  # a waiting request cancelled: the one behind it moves up
    deadline = time.monotonic() + 5
    while w2.waiting != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert w2.waiting == 1
    # the listener hears the new place on its next poll (a loaded machine may take a while to wake it)
    while 1 not in places and time.monotonic() < deadline + 10:
        time.sleep(0.02)
    running.cancel()
    w2_frames.join(2)
    w2.cancel()
    w2_frames.join(30)
    assert places and places[0] == 2 and 1 in places


def test_one_visitor_cannot_fill_the_batch_while_others_wait(engine):
    """Alone, a visitor's requests take every free row; once another visitor waits, a freed row goes
    to that visitor although the first one asked earlier."""
    s = SamplingConfig(topk=50, temperature=0.9, max_audio_length_ms=80 * 100)
    scheduler = engine.serve(max_rows=3, per_visitor=1)
    hog = [scheduler.submit(request(engine, TEXTS[i], s, seed=i, visitor="hog")) for i in range(5)]
    iters = [iter(t) for t in hog[:3]]
    for it in iters:
        next(it)
    assert scheduler.stats()["active"] == 3 and [t.waiting for t in hog[3:]] == [1, 2]
    other = scheduler.submit(request(engine, TEXTS[5], s, seed=9, visitor="other"))
    assert other.waiting == 3
    hog[0].cancel()
    others = iter(other)  # kept: a stream dropped is a request cancelled
    next(others)  # the freed row went to "other", not to the hog's fourth request
    assert other.waiting == 0 and hog[3].waiting == 1
    for t in [*hog, other]:
        t.cancel()


def test_alone_a_visitor_uses_every_free_row(engine):
    s = SamplingConfig(topk=50, temperature=0.9, max_audio_length_ms=80 * 100)
    scheduler = engine.serve(max_rows=4, per_visitor=1)
    tickets = [scheduler.submit(request(engine, TEXTS[i], s, seed=i, visitor="solo")) for i in range(4)]
    iters = [iter(t) for t in tickets]
    for it in iters:
        next(it)
    assert scheduler.stats()["active"] == 4 and all(t.waiting == 0 for t in tickets)
    for t in tickets:
        t.cancel()


def test_memory_pressure_shrinks_admission_and_running_rows_finish(engine):
    budget = {"rows": 4}
    s = SamplingConfig(topk=50, temperature=0.9, max_audio_length_ms=80 * 60)
    scheduler = engine.serve(max_rows=4, row_budget=lambda active: budget["rows"])
    first = [scheduler.submit(request(engine, TEXTS[i], s, seed=i)) for i in range(3)]
    iters = [iter(t) for t in first]
    for it in iters:
        next(it)
    assert scheduler.stats()["active"] == 3
    budget["rows"] = 1  # memory got short: nobody new joins until the running rows are below it
    late = scheduler.submit(request(engine, TEXTS[4], s, seed=8))
    time.sleep(0.3)
    assert late.waiting == 1 and scheduler.stats()["limit"] == 1
    for t in first:
        t.cancel()
    assert len(list(late)) > 0  # admitted once the rows left


def test_a_failing_step_reaches_its_requests_and_the_loop_goes_on(engine, monkeypatch):
    s = SamplingConfig(topk=1, seed=0, max_audio_length_ms=240)
    scheduler = engine.serve(max_rows=2)
    import csm_multi.scheduler as sched

    real = sched.depth_frame
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(sched, "depth_frame", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        list(scheduler.submit(request(engine, TEXTS[1], s, seed=0)))
    monkeypatch.setattr(sched, "depth_frame", real)
    assert len(list(scheduler.submit(request(engine, TEXTS[1], s, seed=0)))) == 3


def test_closing_answers_waiting_requests_busy(engine):
    s = SamplingConfig(topk=50, temperature=0.9, max_audio_length_ms=80 * 300)
    scheduler = engine.serve(max_rows=1)
    running = scheduler.submit(request(engine, TEXTS[0], s, seed=1))
    waiting = scheduler.submit(request(engine, TEXTS[1], s, seed=2))
    first = iter(running)  # kept: a stream dropped is a request cancelled
    next(first)
    engine.stop_serving()
    with pytest.raises(BusyError, match="shutting down"):
        list(waiting)
    with pytest.raises(BusyError):
        scheduler.submit(request(engine, TEXTS[1], s, seed=2))
    assert engine.scheduler is None
    assert engine.generate(TEXTS[1], 0, (), s.with_(max_audio_length_ms=160)).codes.shape[1] <= 2  # alone again


@pytest.mark.parametrize("kwargs, message", [({"max_rows": 0}, "max_rows"), ({"per_visitor": True}, "per_visitor"),
                                             ({"max_waiting": -1}, "max_waiting")])
def test_bad_limits_are_refused(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Scheduler(model, **kwargs)


def test_a_fast_mode_script_through_the_scheduler_renders_the_same_lines(engine):
    """Fast mode hands every line to the scheduler at once (it refills rows as lines end): the
    clips are those of the fixed batches rendered without it."""
    from csm_multi.render import RenderConfig, ScriptRenderer
    from csm_multi.script import parse_script

    lines = parse_script("A: One line here.\nB: Another one.\nA: A third, longer line of the script.\nB: Four.\n"
                         "A: Five and done.")
    voices = {"A": None, "B": None}
    config = RenderConfig(mode="fast", batch_size=2, seed=21, temperature=0.9, topk=40, max_line_ms=640)
    renderer = ScriptRenderer(engine, lambda name: None)
    alone = renderer.render(lines, voices, config)
    scheduler = engine.serve(max_rows=2)
    shared = renderer.render(lines, voices, config)
    assert [c.codes.tolist() for c in shared.clips] == [c.codes.tolist() for c in alone.clips]
    torch.testing.assert_close(shared.audio, alone.audio)
    assert scheduler.stats()["peak_rows"] == 2


def test_the_loop_thread_uses_one_intra_op_thread_for_small_products_and_all_for_big_ones(codec):
    from csm_multi.fused import large_products, pack_linears

    small = CSM(get_preset("tiny")).init_random_(seed=1).eval()
    assert not large_products(small)
    with Scheduler(small) as scheduler:
        assert scheduler.threads == 1
    with Scheduler(small, threads=2) as scheduler:
        assert scheduler.threads == 2
    packed = pack_linears(fuse_layers(CSM(get_preset("tiny")).init_random_(seed=1).eval()), min_elements=0)
    assert packed.packed and large_products(packed)
    with Scheduler(packed) as scheduler:
        assert scheduler.threads == torch.get_num_threads()


def test_long_prompts_join_in_chunks_while_running_rows_keep_making_frames(engine):
    """prefill_chunk=8: a prompt of ~80 positions takes ~10 steps to join; meanwhile the running row
    gets a frame every step (batch size 1 steps), two long prompts queue in order, a cancelled one
    leaves mid-prefill, and every request's codes equal its solo run."""
    context = [Segment(speaker=1, text="A voice prompt with some words in it.",
                       codes=torch.randint(1, 2048, (32, 30), generator=torch.Generator().manual_seed(4)))]
    s = SamplingConfig(topk=50, temperature=0.9, seed=21, max_audio_length_ms=80 * 30)
    short = SamplingConfig(topk=50, temperature=0.9, seed=22, max_audio_length_ms=80 * 40)
    want_long = [engine.generate_codes(t, 0, context, s)[0].cpu() for t in TEXTS[:2]]
    want_short = solo(engine, TEXTS[2], 0, short)
    scheduler = engine.serve(max_rows=4, prefill_chunk=8)
    first = scheduler.submit(request(engine, TEXTS[2], short, short.seed))
    frames = iter(first)
    got_short = [next(frames)]  # running before the long prompts arrive
    longs, cancelled = [], None
    for i, text in enumerate(TEXTS[:2]):
        tokens, mask = engine.build_prompt(text, 0, context)
        assert tokens.size(0) > 60
        longs.append(scheduler.submit(GenerationRequest(tokens, mask, s.temperature, s.topk, s.seed, s.max_frames)))
        if i == 0:
            tokens, mask = engine.build_prompt(TEXTS[4], 0, context)
            cancelled = scheduler.submit(GenerationRequest(tokens, mask, 0.9, 50, 1, 20))
    while cancelled.waiting:  # admitted: now prefilling behind the first long prompt (ten chunks)
        time.sleep(0.005)
    cancelled.cancel()
    got_short += list(frames)
    got_long = [torch.stack(list(t), dim=1) for t in longs]
    assert torch.equal(torch.stack(got_short, dim=1), want_short)
    for got, want in zip(got_long, want_long):
        assert torch.equal(got, want)
    assert list(cancelled) == []
    deadline = time.monotonic() + 10
    while scheduler.stats()["active"] and time.monotonic() < deadline:  # the last row leaves after its end frame
        time.sleep(0.01)
    stats = scheduler.stats()
    assert stats["batch_sizes"].get(1, 0) >= 8  # the short row stepped alone while a long prompt prefilled
    assert stats["prefilling"] == 0 and stats["active"] == 0
    with pytest.raises(ValueError, match="prefill_chunk"):
        Scheduler(engine.model, prefill_chunk=0)


def test_visitors_with_the_same_voice_share_its_prefill_while_the_first_still_generates(model, codec):
    """Two visitors render with the same voice prompt at once, a third joins while they generate:
    the voice is prefilled once (the prompt's state is kept when its prefill is done, not when its
    row ends), every later prompt prefills only its own text, and every request keeps its solo codes."""
    voice = [Segment(speaker=0, text="How this voice sounds, in a few words.",
                     codes=torch.randint(1, 2048, (32, 40), generator=torch.Generator().manual_seed(8)))]
    plans = [(TEXTS[i], SamplingConfig(topk=50, temperature=0.9, seed=40 + i, max_audio_length_ms=80 * 12))
             for i in range(3)]
    solo_engine = Engine(model, ByteTokenizer(), codec, watermark=False, prefix_cache_mb=0)
    want = [solo_engine.generate_codes(text, 0, voice, s)[0].cpu() for text, s in plans]
    engine = Engine(model, ByteTokenizer(), codec, watermark=False, prefix_cache_mb=64)
    scheduler = engine.serve()
    try:
        tickets = [scheduler.submit(request(engine, text, s, s.seed, f"v{i}", context=voice))
                   for i, (text, s) in enumerate(plans[:2])]
        first = iter(tickets[0])
        got = [[next(first)]]  # the first two are generating now
        text, s = plans[2]
        tickets.append(scheduler.submit(request(engine, text, s, s.seed, "v2", context=voice)))
        got[0] += list(first)
        got += [list(ticket) for ticket in tickets[1:]]
        stats = scheduler.stats()
    finally:
        engine.stop_serving()
    for frames, expected in zip(got, want, strict=True):
        assert torch.equal(torch.stack(frames, dim=1), expected)
    voice_positions = engine.segment_positions(voice[0])
    sizes = [engine.build_prompt(text, 0, voice)[0].size(0) for text, _ in plans]
    assert stats["prefilled_positions"] <= sizes[0] + sum(n - voice_positions for n in sizes[1:])
    assert engine.prefix.hits >= 2


def test_a_burst_is_bounded_even_when_rows_are_free(engine):
    """Requests that arrive together all sit in the queue until the loop admits them, free rows or
    not: the bounds count only those beyond the free rows. Before, a burst of 100 API calls from one
    key was accepted whole while rows were free (each holding a server thread)."""
    s = SamplingConfig(topk=50, temperature=0.9, max_audio_length_ms=80 * 300)
    scheduler = engine.serve(max_rows=2, max_waiting=6, per_visitor=2, waiting_per_visitor=3)
    with scheduler._cond:  # the loop admits nothing meanwhile: every request of the burst arrives "at once"
        accepted, refused = [], []
        for i in range(12):
            try:
                accepted.append(scheduler.submit(request(engine, TEXTS[i % len(TEXTS)], s, seed=i, visitor="burst")))
            except BusyError as e:
                refused.append(str(e))
        assert len(accepted) == 2 + 3  # the two free rows, then this visitor's 3 places in the queue
        assert refused and all("you already have 3 requests waiting" in m for m in refused)
        for i in range(8):  # other visitors: the queue's 6 places in all
            try:
                accepted.append(scheduler.submit(request(engine, TEXTS[i % len(TEXTS)], s, seed=i, visitor=f"v{i}")))
            except BusyError as e:
                refused.append(str(e))
        assert len(accepted) == 2 + 6
        assert "6 requests are already waiting" in refused[-1]
    for t in accepted:
        t.cancel()


@pytest.mark.parametrize("served", [True, False], ids=["scheduler", "alone"])
def test_a_stream_asked_to_cancel_stops_at_the_next_frame(engine, served):
    """`Engine.stream(cancel=...)` is asked after every frame: once it says True the stream ends there,
    before its chunk is full, and (served) its row is free at once."""
    s = SamplingConfig(topk=50, temperature=0.9, max_audio_length_ms=80 * 200, seed=3)
    scheduler = engine.serve(max_rows=2) if served else None
    if not served:
        engine.stop_serving()
    asked = []

    def cancel():
        asked.append(1)
        return len(asked) > 5

    chunks = list(engine.stream(TEXTS[0], 0, (), s, StreamConfig(first_chunk_frames=11, chunk_frames=11),
                                cancel=cancel))
    assert chunks == [] and len(asked) == 6  # 5 frames made, none decoded, the 6th ended it
    if served:
        deadline = time.monotonic() + 10
        while scheduler.stats()["active"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler.stats()["active"] == 0 and scheduler.frames < 20


def test_a_stream_asked_to_cancel_while_it_waits_leaves_the_queue(engine):
    """A stream waiting for a free row hears `cancel` every half second and leaves the queue, without
    ever taking a row (a tester who pressed Stop while waiting)."""
    s = SamplingConfig(topk=50, temperature=0.9, max_audio_length_ms=80 * 400, seed=3)
    scheduler = engine.serve(max_rows=1)
    hog = scheduler.submit(request(engine, TEXTS[1], s, seed=9, visitor="hog"))
    it = iter(hog)
    next(it)  # it holds the only row
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    chunks = list(engine.stream(TEXTS[0], 0, (), s, cancel=stop.is_set))
    assert chunks == [] and time.monotonic() - started < 3
    deadline = time.monotonic() + 5
    while scheduler.stats()["waiting"] and time.monotonic() < deadline:  # dropped at the loop's next step
        time.sleep(0.02)
    assert scheduler.stats()["waiting"] == 0 and scheduler.stats()["active"] == 1  # only the hog ran
    hog.cancel()
