"""Every API endpoint x every argument x hostile values, over plain HTTP against the running app.

For each endpoint the app lists in `/gradio_api/info`, each argument in turn is left out, sent as
null, as the wrong type, NaN, +-infinity, huge, empty, and with control characters and an unpaired
surrogate, the others being a call that works. The answer is always either a result or an error whose message names
that argument (by its API name or its label on the page) - never Gradio's message-less error -
and afterwards the server still serves, nothing was written outside the profile store, and the
process grew by less than MAX_GROWTH_MB.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
import uuid

import httpx
import numpy as np
import pytest
import soundfile as sf

pytestmark = pytest.mark.slow

SR = 24_000
KEY = "hostile-arguments-template"
MAPPING = {"headers": ["speaker", "profile"], "data": [["Alice", "Alice"]]}
SCRIPT = "Alice: Hi."
MAX_GROWTH_MB = 1024
NAN, INF = float("nan"), float("inf")


def _post(url: str, api: str, data: list, session: str | None = None, timeout: float = 120.0):
    """One call through `/gradio_api/call/<api>`: ("complete", outputs) or ("error", message or None).

    The body is written by `json.dumps`, which sends NaN and Infinity as bare words, as JavaScript
    and hand-written clients can."""
    body = {"data": data, **({"session_hash": session} if session else {})}
    r = httpx.post(f"{url}gradio_api/call/{api}", content=json.dumps(body), timeout=timeout,
                   headers={"content-type": "application/json"})
    assert r.status_code == 200, (api, r.status_code, r.text[:300])
    event, last = None, None
    with httpx.stream("GET", f"{url}gradio_api/call/{api}/{r.json()['event_id']}", timeout=timeout) as s:
        for line in s.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                last = json.loads(line[5:].strip() or "null")
                break
    if event == "error":
        return "error", (last or {}).get("error") if isinstance(last, dict) else last
    return event, last


def _upload(url: str, path) -> dict:
    with open(path, "rb") as f:
        r = httpx.post(f"{url}gradio_api/upload", files={"files": (path.name, f)}, timeout=60)
    r.raise_for_status()
    return {"path": r.json()[0], "meta": {"_type": "gradio.FileData"}}


def _clip(path, seconds=2.0, freq=220.0):
    t = np.arange(int(SR * seconds)) / SR
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(6 * t))).astype(np.float32), SR)
    return path


def _hostile(value):
    """The hostile stand-ins for an argument whose working value is `value`."""
    wrong = "abc" if isinstance(value, (int, float, dict)) else 12345
    huge = "x" * 200_000 if isinstance(value, str) else 1e308 if isinstance(value, (int, float)) else (
        {"headers": ["speaker", "profile"], "data": [["A", "B"]] * 100_000} if isinstance(value, dict)
        and "headers" in value else {"path": "x" * 100_000, "meta": {"_type": "gradio.FileData"}})
    control = ("\x00\x1b[31m\u202e\ud800" + value) if isinstance(value, str) else "\x00\x07"
    cases = {"null": None, "wrong type": wrong, "NaN": NAN, "+inf": INF, "-inf": -INF, "huge": huge,
             "empty": "" if not isinstance(value, dict) else {}, "control characters": control}
    if isinstance(value, dict) and "path" in value:  # a file: one never uploaded, and one without Gradio's "meta"
        cases["a server path"] = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}
        cases["no meta"] = {"path": value["path"]}
    return cases


def _tree(root, *skip):
    """Everything under `root` but the folders `skip` and what they hold."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not any(s == p or s in p.parents for s in skip))


@pytest.fixture(scope="module")
def app(running_app, tmp_path_factory):
    """The app, a template library (Alice, Bob) and working arguments for every endpoint."""
    url, studio = running_app
    d = tmp_path_factory.mktemp("hostile-args")
    for name, freq in (("Alice", 200.0), ("Bob", 260.0)):
        studio.add_profile(KEY, name, _clip(d / f"{name}.wav", freq=freq), f"{name} says hello")
    voice = studio.library(KEY).export("Alice", d)
    project = studio.save_project(KEY, SCRIPT, {"Alice": "Alice"}, _config())
    files = {"clip": _upload(url, _clip(d / "clip.wav")), "voice": _upload(url, voice),
             "project": _upload(url, project)}
    return url, studio, files


def _config():
    from csm_multi.render import RenderConfig

    return RenderConfig(pause_ms=0, temperature=0.9, topk=50, seed=1, max_line_ms=1000)


def _working(api: str, files: dict) -> list:
    """Arguments (the API-visible ones, in order) that make `api` succeed on a fresh copy of the template."""
    render = [SCRIPT, MAPPING, 0.9, 50, 1, 1, 0, "conversational"]
    return {
        "new_take": [1],
        "edit_line": [1, "New words."],
        "choose_take": [1, 1],
        "set_pause": [1, 0.5],
        "rerender_stale": [],
        "reopen_last": [],
        "check_last_render": [],
        "add_profile": [files["clip"], "Carol says hello", "Carol"],
        "list_profiles": [],
        "preview_profile": ["Alice"],
        "rename_profile": ["Alice", "Alicia"],
        "update_transcript": ["Alice", "Alice says hi"],
        "delete_profile": ["Bob", True],
        "export_profile": ["Alice"],
        "import_profile": [files["voice"], "Imported"],
        "render_script": [*render, 1],
        "regenerate_line": [1, 7],
        "save_project": [*render, 1],
        "open_project": [files["project"]],
        "say": ["Hello.", "Alice", 0.9, 50, 1, 1],
        "check_watermark": [files["clip"]],
        "status": [],
    }[api]


ON_LAST_RENDERING = {"regenerate_line", "new_take", "edit_line", "choose_take", "set_pause", "rerender_stale"}


def _fresh_key(studio) -> str:
    """A new library holding a copy of the template's voices."""
    key = f"hostile-{uuid.uuid4().hex[:12]}"
    shutil.copytree(studio.library(KEY).root, studio.profiles_root / f"visitor-{key}")
    return key


def _names_it(message: str, param: dict) -> bool:
    """The message names the argument: by its API name, or by its label on the page (the words
    before any bracketed explanation, e.g. "Reference clip" of "Reference clip (1-30 s of one voice)")."""
    text = message.casefold()
    label = param["label"].split(" (")[0].casefold()
    return param["parameter_name"].casefold() in text or label in text


def test_every_argument_of_every_endpoint_gets_a_named_answer(app):
    url, studio, files = app
    info = httpx.get(f"{url}gradio_api/info", timeout=30).json()["named_endpoints"]
    endpoints = {name.lstrip("/"): spec["parameters"] for name, spec in info.items()}
    assert set(endpoints) == {"add_profile", "list_profiles", "preview_profile", "rename_profile", "update_transcript",
                              "delete_profile", "export_profile", "import_profile", "render_script",
                              "regenerate_line", "save_project", "open_project", "say", "check_watermark", "status",
                              "new_take", "edit_line", "choose_take", "set_pause", "rerender_stale", "reopen_last",
                              "check_last_render"}
    app_root = studio.profiles_root.parent
    before = _tree(app_root, studio.profiles_root, studio.outputs_root)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    unnamed, answered, t0 = [], 0, time.perf_counter()
    for api, params in endpoints.items():
        has_key = params[0]["parameter_name"] == "key"
        assert has_key or api == "check_watermark", api
        template = ([KEY] if has_key else []) + _working(api, files)
        assert len(template) == len(params), api
        for i, param in enumerate(params):
            for case, value in [("missing", None), *_hostile(template[i]).items()]:
                key = _fresh_key(studio)
                args = [key if has_key and j == 0 else v for j, v in enumerate(template)]
                session = uuid.uuid4().hex
                if api in ON_LAST_RENDERING:  # these act on this session's last rendering
                    assert _post(url, "render_script", [key, *_working("render_script", files)], session)[0] == "complete"
                args = args[:i] if case == "missing" else [*args[:i], value, *args[i + 1:]]
                kind, out = _post(url, api, args, session)
                answered += 1
                if kind == "error" and not (isinstance(out, str) and _names_it(out, param)):
                    unnamed.append((api, param["parameter_name"], case, out))
                assert kind in ("complete", "error"), (api, param["parameter_name"], case, kind, out)
    took = time.perf_counter() - t0
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    print(f"{answered} hostile calls in {took:.0f} s; {len(unnamed)} unnamed; peak RSS grew {grown_mb:.0f} MB")
    assert not unnamed, "\n".join(map(repr, unnamed))
    assert _post(url, "status", [KEY])[0] == "complete"  # still serving
    # nothing written outside the profile store and the folder of fresh response files
    assert _tree(app_root, studio.profiles_root, studio.outputs_root) == before
    assert grown_mb < MAX_GROWTH_MB


@pytest.mark.parametrize("key", ["abcdefgh\n", "abcdefgh\r\n", " abcdefgh", "abcdefgh\x00", "ab/../cdefgh", "a" * 65, "short"])
def test_a_library_key_must_match_in_full(app, key):
    url, studio, _ = app
    kind, message = _post(url, "list_profiles", [key])
    assert kind == "error" and "library key" in message and "library_key" in message
    assert not [p for p in studio.profiles_root.iterdir() if "\n" in p.name or "\x00" in p.name or p.name.endswith("short")]


def test_errors_reach_api_callers_as_plain_text(app):
    url, _, _ = app
    kind, message = _post(url, "rename_profile", [KEY, "<b>Nobody</b>", "x"])
    assert kind == "error" and "'<b>Nobody</b>'" in message and "&lt;" not in message


def test_a_mapping_that_leaves_out_a_speaker_uses_the_voice_of_the_same_name(app):
    """A non-empty speaker map is completed from the library: Bob is left out of the map, and a row
    with no speaker at all is skipped, so Bob still speaks with his own voice."""
    url, studio, _ = app
    key = _fresh_key(studio)
    mapping = {"headers": ["speaker", "profile"], "data": [["Alice", "Alice"], [None, None]]}
    kind, out = _post(url, "render_script", [key, "Alice: Hi.\nBob: Hello.", mapping, 0.9, 50, 1, 1, 0, "conversational"])
    assert kind == "complete", out
    manifest = out[4]["data"]
    assert [(row[1], row[2]) for row in manifest] == [("Alice", "Alice"), ("Bob", "Bob")]
    kind, out = _post(url, "render_script", [key, "Alice: Hi.", {"headers": ["speaker", "profile"],
                                              "data": [["Alice", "Nobody"]]}, 0.9, 50, 1, 1, 0, "conversational"])
    assert kind == "error" and "mapping" in out and "'Alice'" in out and "Nobody" in out


def test_an_argument_too_many_is_refused_with_the_count(app):
    """A surplus argument had been dropped without a word (a caller who put one in the wrong place never
    learnt it): now the endpoint says how many it takes."""
    url, _, _ = app
    kind, message = _post(url, "list_profiles", [KEY, "extra"])
    assert kind == "error" and message == "list_profiles takes 1 argument (key); got more than 1: leave out the extra"
    kind, message = _post(url, "render_script", [KEY, SCRIPT, MAPPING, 0.9, 50, 1, 1, 0, "conversational", 1, 99, 98])
    assert kind == "error" and message.startswith("render_script takes 10 arguments (key, script, mapping")
    assert message.endswith("got more than 10: leave out the extra")
    from gradio_client import Client

    with pytest.raises(Exception, match="got more than 10: leave out the extra"):  # the client adds the page's state
        Client(url, verbose=False).predict(KEY, SCRIPT, MAPPING, 0.9, 50, 1, 1, 0, "conversational", 1, 99,
                                           api_name="/render_script")


def test_a_missing_script_is_named_as_such(app):
    url, _, _ = app
    kind, message = _post(url, "render_script", [KEY, None, MAPPING, 0.9, 50, 1, 1, 0, "conversational"])
    assert kind == "error" and message.startswith("script:") and "longer than" not in message


def test_an_unforeseen_failure_still_answers_with_a_message(app, monkeypatch):
    """A bug in a handler answers "failed unexpectedly (its type)", without the exception's text
    (which may name server paths); the server keeps serving."""
    url, studio, _ = app

    def broken(key):
        raise RuntimeError("/srv/secret/path went missing")

    monkeypatch.setattr(studio, "status", broken)
    kind, message = _post(url, "status", [KEY])
    assert kind == "error" and "status failed unexpectedly (RuntimeError)" in message and "/srv" not in message
    monkeypatch.undo()
    assert _post(url, "status", [KEY])[0] == "complete"


@pytest.mark.parametrize("api", ["check_watermark", "add_profile"])
def test_a_file_that_was_not_uploaded_is_named_with_how_to_upload_it(app, api, tmp_path):
    """Raw HTTP callers naming a server path, or leaving out Gradio's "meta", got Gradio's empty
    {"error": null} (and a traceback in the log): the file was refused, but nothing said why."""
    url, studio, files = app
    key = [] if api == "check_watermark" else [KEY]
    rest = [] if api == "check_watermark" else ["Carol says hello", "Carol"]
    for path in ("/etc/passwd", str(studio.profiles_root / "x.wav")):
        kind, message = _post(url, api, [*key, {"path": path, "meta": {"_type": "gradio.FileData"}}, *rest])
        assert kind == "error" and message and "upload the file first" in message and "handle_file" in message, message
    kind, message = _post(url, api, [*key, {"path": files["clip"]["path"]}, *rest])
    assert kind == "error" and message and '"meta"' in message, message
    kind, out = _post(url, api, [*key, _upload(url, _clip(tmp_path / "clip.wav")), *rest])  # uploaded: taken
    assert kind == "complete" or "upload" not in str(out) and "meta" not in str(out), out  # (this app checks no marks)


def test_a_file_of_the_wrong_type_is_named_with_the_type_it_takes(app):
    """open_project takes a .csmproj: a WAV sent to it used to get Gradio's "Invalid file type..."
    (no argument named) with a traceback in the server's log."""
    url, studio, files = app
    kind, message = _post(url, "open_project", [_fresh_key(studio), files["clip"]])
    assert kind == "error" and message.startswith("path (Open project (.csmproj)): expected a .csmproj file; got '"), message
