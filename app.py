"""Gradio UI over the csm_multi core: build_demo(studio) and main(). No model code here.

    python app.py                       # csm-1b when the hub is reachable (HF_TOKEN), else the offline tiny preset
    python app.py --model tiny --share  # random weights, offline, with a public link

Every action has an api_name, so `gradio_client` can drive it (README has an example).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import html
import io
import itertools
import logging
import math
import os
import queue
import secrets
import sys
import threading
import time
import unicodedata
import wave
from collections.abc import Callable, Iterator
from functools import cache, partial
from pathlib import Path

import numpy as np

from csm_multi import CsmError, SamplingConfig, StreamConfig, build_engine, omp
from csm_multi.config import MAX_SEED
from csm_multi.errors import ProfileError, TranscriptionError, value_words
from csm_multi.loaders import ASR_HINT, ASR_MODEL, build_transcriber, whisper_unavailable
from csm_multi.pacing import LineLengths, Pacer, expected_seconds
from csm_multi.profiles import MAX_NAME_CHARS, clean_name, quoted
from csm_multi.render import MAX_LINES, RenderConfig, RenderResult
from csm_multi.script import clean_utterance, speaker_key, with_line_text
from csm_multi.settings import engine_flags, setting
from csm_multi.studio import EXAMPLE_SCRIPT, LIBRARY_KEY, Studio, StudioLimits, new_library_key
from csm_multi.takes import MAX_CANDIDATES, MAX_TAKES
from csm_multi.tempdirs import release_torch_scratch, start_sweeper
from csm_multi.views import TIMELINE_JS, context_bars_html, line_peaks, timeline_html

log = logging.getLogger("csm_multi.app")
NONE = "(none)"
MAX_UPLOAD = "20mb"
MAX_EDITOR_ROWS = 60  # lines the per-line editor shows (each is a dozen components); the rest are in the files


def ensure_ffmpeg() -> str | None:
    """Gradio's streaming audio output shells out to `ffmpeg`; use imageio-ffmpeg's binary if none is on PATH."""
    import shutil
    import tempfile

    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
    except ImportError:
        log.warning("no ffmpeg on PATH and imageio-ffmpeg is not installed: streaming playback will fail")
        return None
    bin_dir = Path(tempfile.gettempdir()) / "csm-multi-bin"
    bin_dir.mkdir(exist_ok=True)
    link = bin_dir / "ffmpeg"
    if not link.exists():
        link.symlink_to(imageio_ffmpeg.get_ffmpeg_exe())
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    return str(link)


def ensure_nodeps_packages() -> None:
    """On Hugging Face Spaces only requirements.txt is installed; moshi and silentcipher need
    `pip install --no-deps` (their pins are stale, see README), so do that once at start-up."""
    import importlib.util
    import subprocess
    import sys

    missing = [m for m in ("moshi", "silentcipher") if importlib.util.find_spec(m) is None]
    if missing:
        log.warning("installing %s without their stale pins (requirements-nodeps.txt)", ", ".join(missing))
        req = Path(__file__).with_name("requirements-nodeps.txt")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-r", str(req)], check=True)


def _int16(audio) -> np.ndarray:
    """Gradio peak-normalises float audio; int16 keeps the real level."""
    return (audio.clamp(-1, 1).numpy() * 32767).astype(np.int16)


# The live players stream over HLS. Gradio declares the playlist's target duration as its longest
# segment so far (rounded up), and the browser's player reloads the playlist about that often: a line
# handed over as one 10 s segment made the page look for the next audio only every ~10 s, so playback
# paused for seconds although the server had sent the audio in time. Pieces of at most 0.48 s keep
# the target at 1 s: Gradio's AAC encoder carries audio over from piece to piece, so a segment can run
# ~0.15 s past its piece (0.88 s pieces gave a 1.024 s segment and a target of 2 s).
LIVE_PIECE_SAMPLES = 11_520
# ...and so a piece reaches the player up to about a second after it was handed over, later for one
# piece than for the one before: the pacers hold that much more audio before playback starts.
LIVE_DELIVERY_S = 1.0
# Cancel (the button, a closed tab, gradio_client's job.cancel()) reaches a streaming handler only when
# it yields: Gradio retries closing the generator until then, holding its cancel lock. A Script render
# yields a no-change update at least this often, so a cancelled render frees its generation row within
# about this long, not when its current line ends (on two CPU cores at csm-1b, ~30 s).
HEARTBEAT_S = 0.5
EDITOR_OUTPUTS = 9  # what the per-line editor's actions answer: note, dialogue, files, ... (build_demo's `shown`)


def editor_overflow(lines: int) -> str:
    """What the per-line editor says under its last row when a rendering has more lines than it shows."""
    rest = (f"Line {MAX_EDITOR_ROWS + 1} is" if lines == MAX_EDITOR_ROWS + 1
            else f"Lines {MAX_EDITOR_ROWS + 1}–{lines} are")
    return f"{rest} in the manifest and the files; the editor shows the first {MAX_EDITOR_ROWS}."


def live_pieces(held: list[np.ndarray]) -> list[bytes]:
    """The int16 audio `held` for a live player, joined and cut in equal pieces of at most 0.48 s at
    24 kHz, each a complete 16-bit mono WAV file in memory.

    Bytes, not (rate, array): Gradio writes an array yielded to a streaming player to its shared cache
    under a name made from the samples' hash, in place, and reads it back for its encoder. Two renders
    making the same audio at once (the pause between lines is the same silence for everyone; testers
    who try the same text with the same seed) wrote and read one file together, and a reader that caught
    it half-written failed the whole render ("Decoding the streamed audio chunk failed", seen here with
    8 testers). Bytes are handed to the encoder as they are, with no file at all."""
    audio = np.concatenate(held)
    return [_wav_bytes(piece) for piece in np.array_split(audio, max(1, math.ceil(len(audio) / LIVE_PIECE_SAMPLES)))]


def _wav_bytes(pcm: np.ndarray, rate: int = 24_000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2").tobytes())
    return out.getvalue()


def beating(make: Callable[[Callable[[], bool]], Iterator], every_s: float) -> Iterator:
    """The items of `make(stopped)`, made on a worker thread (`on_worker`), with None in between at least
    every `every_s`, so a streaming handler can yield that often (Gradio closes a handler only at a yield:
    see HEARTBEAT_S). Closing this iterator makes `stopped()` true (for the maker to stop at once), stops
    the worker before its next item and closes `make`'s iterator on the worker's thread (where it was
    made: torch's modes and the visitor are per thread). What the worker raises is raised here."""
    def run(emit, stopped) -> None:
        made = make(stopped)
        try:
            for item in made:
                if stopped():
                    return
                emit(item)
        finally:
            getattr(made, "close", lambda: None)()

    yield from on_worker(run, every_s)


class StickyProgress:
    """A handler's `gr.Progress` that can show its last report `again()`. Gradio's page drops the
    progress text at every output of a streaming handler, a no-change update included, so after its
    heartbeat yields a render showed no progress at all while a line was decoded and watermarked
    (seconds at a time)."""

    def __init__(self, progress):
        self.progress, self.last = progress, None

    def __call__(self, *args, **kwargs):
        self.last = (args, kwargs)
        return self.progress(*args, **kwargs)

    def again(self) -> None:
        if self.last is not None:
            self.progress(*self.last[0], **self.last[1])


def on_worker(call: Callable[[Callable, Callable[[], bool]], object], every_s: float):
    """Run the blocking `call(emit, stopped)` on a worker thread: a generator of what it passes to
    `emit` (progress events, finished clips), with None whenever `every_s` has passed since the last
    None, events or not, so a handler that yields on None can be closed that often (HEARTBEAT_S).
    Returns what `call` returns (`result = yield from on_worker(...)`) and raises what it raises.
    Closing it makes `stopped()` true, so `call` stops at its next check (a render's next frame)."""
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    def run() -> None:
        try:
            events.put(("done", call(lambda item: events.put(("item", item)), stop.is_set)))
        except BaseException as e:  # noqa: BLE001 - raised on the caller's side
            events.put(("error", e))

    threading.Thread(target=run, name="csm-handler-worker", daemon=True).start()
    beat = time.monotonic()
    try:
        while True:
            try:
                kind, value = events.get(timeout=max(beat + every_s - time.monotonic(), 0.001))
            except queue.Empty:
                kind = None
            if time.monotonic() - beat >= every_s:
                beat = time.monotonic()
                yield None
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            elif kind == "done":
                return value
    finally:
        stop.set()


# ---- arguments from the page and from API callers, checked before Gradio reads them -----------
MAX_MAPPING_ROWS = 1000  # a speaker map longer than this is not a script's (200 lines at most)
MAX_PATH_CHARS = 4096  # Linux's PATH_MAX: an upload's path on this server is never longer


def _sent(value) -> str:
    """What a caller sent, in words, without echoing text back (it may hold markup)."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (int, float)):
        return "NaN" if math.isnan(value) else "infinity" if math.isinf(value) else _num(value)
    return value_words(value)  # text and containers as a project file's fields are described


def _num(x: float) -> str:
    return f"{int(x):d}" if float(x).is_integer() else f"{x:g}"


def _number_rule(block) -> str:
    kind = "a whole number" if getattr(block, "precision", None) == 0 else "a number"
    lo, hi = getattr(block, "minimum", None), getattr(block, "maximum", None)
    if lo is not None and hi is not None:
        return f"{kind} from {_num(lo)} to {_num(hi)}"
    return f"{kind} of at least {_num(lo)}" if lo is not None else f"{kind} up to {_num(hi)}" if hi is not None else kind


def _table_problem(value, width: int, headers) -> str | None:
    shape = (f'a table {{"headers": [{", ".join(map(repr, headers or []))}], "data": [[{width} text cells], ...]}} '
             f"of at most {MAX_MAPPING_ROWS} rows")
    rows = value.get("data") if isinstance(value, dict) else None
    if not isinstance(rows, list) or not isinstance(value.get("headers", []), list):
        return f"expected {shape}; got {_sent(value)}"
    if len(rows) > MAX_MAPPING_ROWS:
        return f"expected {shape}; got {len(rows)} rows"
    for i, row in enumerate(rows, 1):
        if not isinstance(row, list) or len(row) not in (0, width):
            return f"expected {shape}; row {i} is {_sent(row) if not isinstance(row, list) else f'{len(row)} cells'}"
        if any(c is not None and (isinstance(c, bool) or not isinstance(c, (str, int, float))) for c in row):
            return f"expected {shape}; row {i} has a cell that is not text"
    return None


def argument_problem(block, value) -> str | None:
    """Why `value` cannot be the input of component `block` ("expected ...; got ..."), or None.

    Stricter than Gradio's own preprocessing, whose failures reach API callers without a message.
    """
    import gradio as gr

    rule = None
    if isinstance(block, (gr.Slider, gr.Number)):
        if value is None and isinstance(block, gr.Number):
            return None
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        lo, hi = getattr(block, "minimum", None), getattr(block, "maximum", None)
        if (not number or (getattr(block, "precision", None) == 0 and value != int(value))
                or (lo is not None and value < lo) or (hi is not None and value > hi)):
            rule = _number_rule(block)
    elif isinstance(block, gr.Checkbox):
        rule = None if isinstance(value, bool) else "true or false"
    elif isinstance(block, (gr.Radio, gr.Dropdown)):
        allowed = [v for _, v in block.choices]
        custom = isinstance(block, gr.Dropdown) and block.allow_custom_value
        listed = any(value == v and type(value) is type(v) for v in allowed)  # 1 is not True, nor "1"
        if not (value is None and isinstance(block, gr.Dropdown)) and not (isinstance(value, str) and custom or listed):
            rule = "a name (text)" if custom else "one of " + ", ".join(repr(v) for v in allowed)
    elif isinstance(block, gr.Textbox):
        rule = None if value is None or isinstance(value, str) else "text"
    elif isinstance(block, gr.Dataframe):
        return _table_problem(value, block.column_count[0], block.headers)
    elif isinstance(block, (gr.File, gr.Audio)):
        path = value.get("path") if isinstance(value, dict) else None
        if value is not None and not (isinstance(path, str) and 0 < len(path) <= MAX_PATH_CHARS and "\x00" not in path):
            rule = "a file (gradio_client: handle_file(path); HTTP: an uploaded file's {\"path\": ...}), or null"
        elif value is not None and not _remote(path):
            if not isinstance(value.get("meta"), dict) or value["meta"].get("_type") != "gradio.FileData":
                return ('expected an uploaded file as {"path": ..., "meta": {"_type": "gradio.FileData"}} '
                        '(gradio_client: handle_file(path)); got an object without that "meta"')
            if not _uploaded(path):  # Gradio takes only files uploaded to this server (its upload folder)
                return ("upload the file first (POST /gradio_api/upload, or gradio_client's handle_file(path)); "
                        f"a path on the server is not accepted: got {quoted(path)}")
        if path and isinstance(block, gr.File) and block.file_types and not rule:
            from gradio_client import utils as client_utils

            if not client_utils.is_valid_file(path, block.file_types):
                return (f"expected a {' or '.join(block.file_types)} file; got {quoted(Path(path).name)}")
    return None if rule is None else f"expected {rule}; got {_sent(value)}"


def _remote(path: str) -> bool:
    from gradio_client import utils as client_utils

    return client_utils.is_http_url_like(path)


def _uploaded(path: str) -> bool:
    """Whether `path` lies in Gradio's upload folder, the only place it takes an input file from."""
    from gradio import utils as gr_utils

    try:
        return gr_utils.is_in_or_equal(gr_utils.abspath(path), gr_utils.get_upload_folder())
    except (OSError, ValueError):
        return False


def _parameters(block_fn) -> list[str]:
    """The handler's parameter names, one per input component (what the API page calls them)."""
    import inspect

    try:
        names = list(inspect.signature(block_fn.fn).parameters)[: len(block_fn.inputs)]
    except (TypeError, ValueError):
        names = []
    return names + [f"input {i + 1}" for i in range(len(names), len(block_fn.inputs))]


def _defaults(block_fn) -> dict[int, object]:
    """Input position -> the handler's default for it (`takes=1`: API callers may leave it out)."""
    import inspect

    try:
        params = list(inspect.signature(block_fn.fn).parameters.values())[: len(block_fn.inputs)]
    except (TypeError, ValueError):
        return {}
    return {i: p.default for i, p in enumerate(params) if p.default is not inspect.Parameter.empty}


@cache
def _player_class():
    """gr.Audio whose (rate, samples) values reach Gradio's cache whole: the page's players.

    Gradio writes such a value to `<cache>/<hash of the samples>/audio.wav` in place, so two events
    with the same samples (two testers previewing one voice of a shared library, or rendering the same
    script with the same seed) write one file at once, and either may then serve or copy it half
    written. Here the file is written under a temporary name and renamed into place, and one already
    there (the same samples, hence the same bytes) is kept. The page draws it as an ordinary Audio.

    Made without running Gradio's ComponentMeta.__new__, which writes a type stub of the defining module
    beside it (`app.pyi`, a copy of this file) whenever a component class is defined: tooling for
    custom-component packages. It does nothing else this class needs (it has no __init__ or events of
    its own)."""
    import hashlib
    import tempfile
    from abc import ABCMeta

    import gradio as gr
    from gradio import processing_utils
    from gradio.data_classes import FileData

    def postprocess(self, value):
        if not isinstance(value, tuple):
            return gr.Audio.postprocess(self, value)
        rate, samples = value
        samples = np.ascontiguousarray(samples)
        fmt = self.format or "wav"
        digest = hashlib.sha256(f"csm-player-v1 {rate} {samples.dtype} {samples.shape} {fmt}".encode())
        digest.update(samples.tobytes())
        folder = Path(self.GRADIO_CACHE) / digest.hexdigest()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"audio.{fmt}"
        if path.exists():  # touched, as Gradio does: its cache sweep ages files by their ctime
            with contextlib.suppress(OSError):
                os.utime(path)
        else:
            fd, staging = tempfile.mkstemp(dir=folder, prefix=".audio.", suffix=f".{fmt}")
            os.close(fd)
            try:
                processing_utils.audio_to_file(rate, samples, staging, format=fmt)
                os.replace(staging, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(staging)
        return FileData(path=str(path.resolve()), orig_name=path.name)

    attrs = {"__module__": __name__, "__qualname__": "Player", "__doc__": _player_class.__doc__,
             "is_template": True,  # the browser draws gr.Audio's component
             "postprocess": postprocess}
    return ABCMeta.__new__(type(gr.Audio), "Player", (gr.Audio,), attrs)


def _count(n: int, one: str, many: str | None = None) -> str:
    """'1 argument', '2 arguments': a count with its noun in the right number."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _no_change(value) -> bool:
    """Whether a handler's output is a no-change update: gr.skip(), or gr.update() with nothing in it."""
    return isinstance(value, dict) and value == {"__type__": "update"}


def _checked_blocks():
    """gr.Blocks whose events check their arguments first: a missing or wrong argument gets a
    message naming it and the allowed values, instead of Gradio's message-less error."""
    import gradio as gr

    class CheckedBlocks(gr.Blocks):
        def validate_inputs(self, block_fn, inputs):
            names = [n for n, b in zip(_parameters(block_fn), block_fn.inputs) if not b.stateful]
            defaults = _defaults(block_fn)
            while len(inputs) < len(block_fn.inputs):  # trailing arguments with a default may be left out
                block = block_fn.inputs[len(inputs)]
                if not (block.stateful or len(inputs) in defaults):
                    break
                inputs.append(None if block.stateful else defaults[len(inputs)])
            if len(inputs) < len(block_fn.inputs):
                given = len(inputs) - (len(block_fn.inputs) - len(names))
                missing = names[max(given, 0):]
                raise gr.Error(f"{block_fn.name} takes {_count(len(names), 'argument')} ({', '.join(names)}); "
                               f"missing: {', '.join(missing)}", print_exception=False)
            if len(inputs) > len(block_fn.inputs):  # Gradio would drop the surplus without a word
                # (how many more is not known: gradio_client adds a slot for each page state, raw HTTP
                # callers with a surplus do not get them)
                raise gr.Error(f"{block_fn.name} takes {_count(len(names), 'argument')} ({', '.join(names)}); "
                               f"got more than {len(names)}: leave out the extra", print_exception=False)
            super().validate_inputs(block_fn, inputs)

        async def preprocess_data(self, block_fn, inputs, state, explicit_call=False):
            self.validate_inputs(block_fn, inputs)
            for i, (name, block, value) in enumerate(zip(_parameters(block_fn), block_fn.inputs, inputs)):
                problem = None if block.stateful else argument_problem(block, value)
                if problem:
                    label = getattr(block, "label", None)
                    shown = f"{name} ({label})" if label and label != name else name
                    if not (_from_page() and getattr(block_fn.fn, "answers_in_place", False)):
                        raise gr.Error(f"{shown}: {problem}", print_exception=False)
                    # On the page, refused like the handler's own refusals (no error overlay): the
                    # handler's wrapper answers with this message instead of running.
                    _PAGE_PROBLEM.set(for_the_caller(f"{shown}: {problem}"))
                    inputs[i] = block.value
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)

        def __exit__(self, exc_type=None, *args):
            super().__exit__(exc_type, *args)
            for block_fn in self.fns.values():  # every event's handler, once the layout is complete
                if exc_type is None and block_fn.fn is not None and not getattr(block_fn.fn, "answers_in_place", 0):
                    block_fn.fn = _answered_in_place(block_fn.fn, block_fn.outputs)

        async def process_api(self, block_fn, inputs, state=None, request=None, *args, **kwargs):
            # the request's headers for preprocess_data, which Gradio gives no request
            token = _PAGE_REQUEST.set(request)
            try:
                return await super().process_api(block_fn, inputs, state, request, *args, **kwargs)
            finally:
                _PAGE_REQUEST.reset(token)

        async def postprocess_data(self, block_fn, predictions, state):
            # Gradio turns every update it is handed into a new instance of the output component and
            # recomputes that component's page config, its API schema included (pydantic's
            # model_json_schema, ~1 ms a component) - a no-change update (gr.skip()) too. Our streaming
            # handlers yield one every HEARTBEAT_S for all their outputs (12 for a render), so with 8
            # testers rendering, the server's event loop spent a quarter of its CPU on schemas that
            # never change, beside the frame loop (py-spy, tiny preset). A no-change output's answer is
            # the same `{"__type__": "update"}` either way: only the others go through Gradio.
            n = len(block_fn.outputs)
            if block_fn.batch or block_fn.is_validator_function or not n:
                return await super().postprocess_data(block_fn, predictions, state)
            given = [predictions] if n == 1 else predictions
            if _no_change(given) and n > 1:  # one skip() for every output, as Gradio allows
                given = [given] * n
            if not isinstance(given, (list, tuple)) or len(given) != n:
                return await super().postprocess_data(block_fn, predictions, state)  # Gradio explains
            unchanged = [i for i, value in enumerate(given) if _no_change(value)]
            if not unchanged:
                return await super().postprocess_data(block_fn, predictions, state)
            if len(unchanged) == n:
                return [{"__type__": "update"} for _ in range(n)]
            rest = list(given)
            for i in unchanged:  # Gradio answers None for these, at no cost; replaced below
                rest[i] = gr.components._Keywords.FINISHED_ITERATING
            output = await super().postprocess_data(block_fn, rest, state)
            for i in unchanged:
                output[i] = {"__type__": "update"}
            return output

        async def call_function(self, block_fn, *args, **kwargs):
            # A handler that fails in a way it did not foresee (a bug) still answers with a message,
            # not Gradio's empty error; the traceback goes to the log.
            try:
                try:
                    return await super().call_function(block_fn, *args, **kwargs)
                finally:
                    _PAGE_PROBLEM.set(None)
            except (gr.Error, StopIteration, StopAsyncIteration):
                raise
            except Exception as e:
                name = getattr(block_fn, "name", "this action")
                log.exception("unexpected error in %s", name)
                raise gr.Error(f"{name} failed unexpectedly ({type(e).__name__}) and the error was logged: "
                               "try again, or tell whoever runs this demo", print_exception=False) from None

    return CheckedBlocks


class Refused(Exception):
    """An action the handler will not do, with the message for the caller (see `_answered_in_place`)."""


_PAGE_PROBLEM: contextvars.ContextVar[str | None] = contextvars.ContextVar("csm_page_problem", default=None)
_PAGE_REQUEST: contextvars.ContextVar = contextvars.ContextVar("csm_page_request", default=None)
NOTE = "csm-note"  # elem_classes of an action's message text, where a refusal is also written


def _from_page() -> bool:
    """Whether the current request comes from the app's own page (it says `x-gradio-user: app`)."""
    try:
        from gradio.context import LocalContext

        request = LocalContext.request.get(None) or _PAGE_REQUEST.get()
    except ImportError:  # pragma: no cover - another Gradio layout: treat as an API caller
        request = None
    if isinstance(request, list):  # a batched event: one request per row
        request = request[0] if request else None
    headers = getattr(request, "headers", None) or {}
    return headers.get("x-gradio-user") == "app"


_MARKDOWN_SPECIAL = str.maketrans({c: "\\" + c for c in "\\*_[]~#|"})


def _code_spans(message: str) -> list[str] | None:
    """`message` split at its backticks: text at the even places, `code` at the odd ones; None where
    a backtick is unpaired (no code spans then)."""
    parts = message.split("`")
    return parts if len(parts) % 2 else None


def note_text(message: str) -> str:
    """A refusal (HTML-escaped, see `for_the_caller`) as Markdown for an action's note: read as
    written (a backslash or `*` in a name stays itself; `code` in backticks stays code) and one
    line per line (a list of script problems is not run together into one paragraph)."""
    parts = _code_spans(message)
    if parts is None:
        text = message.translate(_MARKDOWN_SPECIAL).replace("`", "\\`")
    else:
        text = "`".join(p if i % 2 else p.translate(_MARKDOWN_SPECIAL) for i, p in enumerate(parts))
    return "  \n".join(line.strip() for line in text.split("\n"))


def toast_text(message: str) -> str:
    """A refusal (HTML-escaped) for the page's warning toast, which shows HTML: one line per line,
    `code` in backticks as code."""
    parts = _code_spans(message)
    if parts is not None:
        message = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    return "<br>".join(line.strip() for line in message.split("\n"))


def _answered_in_place(fn, outputs):
    """`fn` with its `Refused` answered without an error state on the page.

    Gradio marks every output of a failed event with an "Error" overlay that stays and blocks those
    components (the library table, a dropdown, a checkbox). So for the page a refusal is a warning
    toast plus the message in the event's note (`NOTE`), and every other output is left as it was.
    API callers still get an error (gradio_client raises it)."""
    import functools
    import inspect

    import gradio as gr

    outs = [] if outputs is None else list(outputs) if isinstance(outputs, (list, tuple, set)) else [outputs]

    def refusal(e: Refused):
        if not _from_page():
            raise gr.Error(str(e), print_exception=False) from None
        gr.Warning(toast_text(str(e)), title="Not done")
        values = [f"⚠️ **Not done:** {note_text(str(e))}" if NOTE in (getattr(o, "elem_classes", None) or []) else gr.skip()
                  for o in outs]
        return values[0] if len(values) == 1 else tuple(values)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            if problem := _PAGE_PROBLEM.get():  # an argument the page sent was refused before the call
                yield refusal(Refused(problem))
                return
            try:
                with contextlib.closing(fn(*args, **kwargs)) as steps:
                    for item in steps:
                        omp.release()  # each step may run on another thread: none keeps an idle OpenMP pool
                        yield item
            except Refused as e:
                yield refusal(e)
            finally:
                omp.release()
        generator.answers_in_place = True
        return generator

    @functools.wraps(fn)
    def function(*args, **kwargs):
        if problem := _PAGE_PROBLEM.get():
            return refusal(Refused(problem))
        try:
            with omp.work():  # the handler's thread does not keep an idle OpenMP pool (csm_multi/omp.py)
                return fn(*args, **kwargs)
        except Refused as e:
            return refusal(e)
    function.answers_in_place = True
    return function


def _session() -> str | None:
    """The page session (one browser tab, or one gradio_client Client) of the current event."""
    try:
        from gradio.context import LocalContext

        request = LocalContext.request.get(None) or _PAGE_REQUEST.get()
    except ImportError:  # pragma: no cover - another Gradio layout
        return None
    if isinstance(request, list):
        request = request[0] if request else None
    return getattr(request, "session_hash", None)


class OnePerSession:
    """At most one action at a time changes a session's rendering (its `last_result`). An action
    answers with the rendering it started from changed, so a take switch or a pause set while a New
    take ran came back undone when the New take finished (and of two New takes, the first was lost):
    a second action meanwhile is refused, saying which one runs."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: dict[str, str] = {}

    @contextlib.contextmanager
    def claim(self, what: str):
        session = _session()
        if session is None:
            yield
            return
        with self._lock:
            doing = self._running.get(session)
            if doing is None:
                self._running[session] = what
        if doing is not None:
            raise Refused(for_the_caller(f"{doing} is still running on this page: wait for it to finish, then try "
                                         "again (each would undo the other)"))
        try:
            yield
        finally:
            with self._lock:
                self._running.pop(session, None)


class SessionStops:
    """The page's Stop (Quick) and Cancel (Script) without Gradio's cancel.

    Gradio's cancel (`cancels=[event]`) often left red "Error" badges on the stopped event's outputs
    (Quick's live player, Download file and note; the render's note), every time with three renders
    running, and reached the handler only at its next yield. Instead the button marks the session's
    action stopped here, and the action, which looks at every step and heartbeat, ends itself like a
    finished one. The button answers at once where nothing was made yet (a long prefill, a busy server).
    API callers' `job.cancel()` stays Gradio's cancel. Bounded: an action cancelled while queued never
    says it ended, so the oldest sessions are forgotten."""

    def __init__(self, limit: int = 256):
        from collections import OrderedDict

        self._lock = threading.Lock()
        self._made: OrderedDict[str, int] = OrderedDict()  # session -> chunks its utterance has made
        self._stopped: set[str] = set()
        self.limit = limit

    def asked(self, session: str | None) -> None:
        """Speak or Render was clicked: a new action, nothing made, not stopped."""
        if session is not None:
            with self._lock:
                self._stopped.discard(session)
                self._set(session, 0)

    def progress(self, session: str | None, chunks: int) -> None:
        """`session`'s action runs and has made `chunks` chunks or lines (a stop already asked for stands)."""
        if session is not None:
            with self._lock:
                self._set(session, chunks)

    def _set(self, session: str, chunks: int) -> None:
        self._made[session] = chunks
        self._made.move_to_end(session)
        while len(self._made) > self.limit:
            self._stopped.discard(self._made.popitem(last=False)[0])

    def stop(self, session: str | None) -> int | None:
        """Stop `session`'s action: what it had made, or None if none is asked for or running."""
        with self._lock:
            if session not in self._made:
                return None
            self._stopped.add(session)
            return self._made[session]

    def stopped(self, session: str | None) -> bool:
        with self._lock:
            return session in self._stopped

    def made(self, session: str | None) -> int | None:
        with self._lock:
            return self._made.get(session)

    def ended(self, session: str | None) -> None:
        with self._lock:
            self._made.pop(session, None)
            self._stopped.discard(session)


QUICK_NOTHING_MADE = "Stopped before any audio was made: nothing to download."


def for_the_caller(message: str) -> str:
    """An error message as plain text for API callers, and HTML-escaped for the page, whose
    notifications render HTML (the page's requests say `x-gradio-user: app`)."""
    return html.escape(message, quote=False) if _from_page() else message


ZERO_GPU_NO_API = ("this Space runs on ZeroGPU, which lends a GPU only to the web page's own calls: the "
                   "OpenAI-compatible API is not served here. Use the page or its gradio_client API, or run the "
                   "app on dedicated hardware (a GPU Space, your own machine) for /v1")


def zero_gpu() -> bool:
    """Running on a Hugging Face Space with the `spaces` package (ZeroGPU's GPU decorator)."""
    import importlib.util

    return bool(os.environ.get("SPACE_ID")) and importlib.util.find_spec("spaces") is not None


def _gpu(fn):
    """On Hugging Face ZeroGPU, run GPU work under spaces.GPU; elsewhere, unchanged."""
    try:
        import spaces  # noqa: PLC0415
    except ImportError:
        return fn
    return spaces.GPU(duration=300)(fn)


def throttled(report, every_s: float = 0.25):
    """`report` for progress events, passing a frame event ("generating") only every `every_s`
    seconds; other stages always pass. With many visitors rendering at once, every frame of every
    row woke two threads and the page's event loop, which held the GIL the frame loop needs."""
    last = [0.0]

    def passed(item) -> None:
        now = time.monotonic()
        if getattr(item, "stage", "generating") == "generating" and item.frame and now - last[0] < every_s:
            return
        last[0] = now
        report(item)

    return passed


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _seed(value) -> int | None:
    """Seeds from the page: a number >= 0, or -1 / empty for a random one."""
    if value in (None, ""):
        return None
    value = int(value)
    return None if value < 0 else value


def _chosen(name) -> str:
    if not name:
        raise CsmError("choose a profile first")
    return name


def _render_config(temperature, topk, seed, max_line_s, pause_ms, mode, takes=1) -> RenderConfig:
    """The Script tab's settings as a RenderConfig (ValueError for impossible values)."""
    return RenderConfig(pause_ms=int(pause_ms), temperature=float(temperature), topk=int(topk), seed=_seed(seed),
                        max_line_ms=float(max_line_s) * 1000, mode=mode, takes=int(takes))


def _take_label(clip) -> str:
    """A take in words: its number, seed and, when scored, what the ranking saw."""
    text = f"take {clip.take + 1} · seed {clip.seed}"
    score = clip.score
    if score is not None:
        heard = "words not checked" if score.wer is None else f"word errors {score.wer:.0%}"
        ending = "cut off" if score.cut_off else "silent" if score.silent else f"tail {score.tail_s:.1f} s"
        text += f" · {heard} · {ending}"
    return text


def status_markdown(info: dict) -> str:
    lines = []
    if info.get("untrained"):
        lines.append("### ⚠️ Offline demo: random untrained weights — the output is noise, not speech.")
    lines += [f"**Model:** {html.escape(str(info['model']))}", f"**Device:** {info['device']} ({info['dtype']})",
              f"**Tokenizer:** {html.escape(str(info['tokenizer']))} · **Codec:** {html.escape(str(info['codec']))}",
              f"**Watermark:** {html.escape(str(info['watermark']))} · **Voice library:** {info['library']}"]
    cache = info.get("profile_cache")
    if cache:
        lines.append(f"**Profile cache:** {cache['hits']} hits, {cache['misses']} misses, {cache['encodes']} encodes, "
                     f"{cache['size']}/{cache['maxsize']} entries, {cache['evictions']} evictions")
    if "libraries" in info:
        lines.append(f"**Voice libraries in memory:** {info['libraries']['open']}/{info['libraries']['max']}")
    sched = info.get("scheduler")
    if sched:
        lines.append(f"**Generation:** {sched['active']}/{sched['limit']} rows busy, {sched['waiting']} waiting · "
                     f"{sched['frames']} frames in {sched['steps']} batched steps, at most {sched['peak_rows']} rows "
                     "at once")
    prefix = info.get("prefix_cache")
    if prefix:
        lines.append(f"**Prefix cache:** {prefix['hits']} prompts started from a kept state ({prefix['reused_positions']} "
                     f"positions not prefilled again), {prefix['misses']} misses · {prefix['entries']} states, "
                     f"{prefix['mb']}/{prefix['max_mb']} MB")
    mem = info["memory"]
    if "gpu_allocated_mb" in info:
        lines.append(f"**GPU memory:** {info['gpu_allocated_mb']} MB allocated, {info['gpu_reserved_mb']} MB reserved · "
                     f"cache clears: {mem['clears']} (check interval {mem['interval']} frames)")
    return "  \n".join(lines)


PAGE_CSS = """
.csm-title h1 { margin-bottom: 0.2em; }
.csm-title h1 small { font-size: 0.55em; font-weight: 500; opacity: 0.75; }
/* text boxes take each line's direction from its own text: an Arabic or Hebrew line reads right to left
   with its full stop at its end, among left-to-right lines (the page's direction put it by the first word) */
textarea, input[type="text"] { unicode-bidi: plaintext; text-align: start; }
/* a name quoted in a note or a refusal (code), and a file's name in the download box, keep their own
   direction: a list of Arabic or Hebrew names keeps its order and commas, a zip named in Arabic reads
   right to left before its ".zip" */
code { unicode-bidi: isolate; }
/* an action's note carries the action's progress: Gradio draws its progress box over the note, absolutely
   placed, so over an empty note (0 px tall) it was cut off entirely (no progress for a whole first line),
   and over a note the two were painted on each other. In the flow, the box comes above the note. */
.block.csm-note > [data-testid="status-tracker"]:not(.hide) { position: relative !important; min-height: 3.4rem; }
.block.csm-note:has(> [data-testid="status-tracker"]:not(.hide)) { overflow: visible; }
/* Gradio's elapsed-time counter beside it restarts at every output of a streaming handler (a heartbeat
   every 0.5 s), so it only ever read 0.0-0.5 s; the progress text says the time left instead */
.block.csm-note > [data-testid="status-tracker"] .progress-text { display: none; }
.file-preview-holder .stem { unicode-bidi: plaintext; }
@media (max-width: 640px) {  /* a phone: the title on one line, all five tabs in view (no "..." menu) */
  .csm-title h1 { font-size: 1.4rem; }
  .tab-wrapper button { padding-left: 7px !important; padding-right: 7px !important; font-size: 0.92rem; }
}
"""

# Two gaps in Gradio's own keyboard and screen-reader use, closed on the page: the tabs follow the ARIA tabs
# pattern (arrow keys, Home and End move to the next, previous, first or last tab and open it; Tab reaches
# the list once, at its open tab, and then goes on to the open panel), and each
# slider's reset button is named after its slider ("Reset Takes per line to its default"), not only
# "Reset to default value". Both act on whatever Gradio draws, now or later (a MutationObserver).
PAGE_HEAD = """
<script>
(() => {
  const KEYS = ["ArrowRight", "ArrowLeft", "Home", "End"];
  document.addEventListener("keydown", (event) => {
    const tab = event.target.closest && event.target.closest('[role="tab"]');
    if (!tab || !KEYS.includes(event.key) || event.altKey || event.ctrlKey || event.metaKey) return;
    const list = tab.closest('[role="tablist"]');
    if (!list) return;
    const tabs = [...list.querySelectorAll('[role="tab"]')].filter((t) => !t.disabled && t.offsetParent !== null);
    const at = tabs.indexOf(tab);
    if (at < 0 || tabs.length < 2) return;
    const next = {ArrowRight: (at + 1) % tabs.length, ArrowLeft: (at - 1 + tabs.length) % tabs.length,
                  Home: 0, End: tabs.length - 1}[event.key];
    event.preventDefault();
    tabs[next].focus();
    tabs[next].click();
  });
  const nameResets = () => {
    for (const button of document.querySelectorAll("button.reset-button:not([data-csm-named])")) {
      const label = button.closest(".wrap")?.querySelector(".head label");
      const title = label && (label.querySelector('[data-testid="block-info"]') || label);  // not its info line
      const text = title ? title.textContent.trim() : "";
      if (!text) continue;
      button.setAttribute("aria-label", `Reset ${text} to its default`);
      button.setAttribute("title", `Reset ${text} to its default`);
      button.setAttribute("data-csm-named", "");
    }
  };
  // roving tabindex: Tab reaches a tab list once, at its open tab (the arrow keys move within it)
  const rove = () => {
    for (const tab of document.querySelectorAll('[role="tablist"] [role="tab"]')) {
      const want = tab.getAttribute("aria-selected") === "true" ? "0" : "-1";
      if (tab.getAttribute("tabindex") !== want) tab.setAttribute("tabindex", want);
    }
  };
  // the open tab names its panel (aria-controls; Gradio gives neither an id), so a screen reader can
  // jump from the tab to its panel. Only the open tab's panel is in the page, so only that tab controls
  // one. The panel is not labelled by its tab (aria-labelledby): "Script" would then name both the
  // panel and the Script box in it, and a label lookup (a screen reader's, a test's) finds two.
  let tabIds = 0;
  const link = () => {
    for (const list of document.querySelectorAll('[role="tablist"]')) {
      const tabs = [...list.querySelectorAll('[role="tab"]')];
      const root = list.parentElement && list.parentElement.parentElement;
      const panel = root && [...root.children].find((p) => p.getAttribute("role") === "tabpanel" && p.offsetParent !== null);
      for (const tab of tabs) {
        if (!tab.id) tab.id = `csm-tab-${++tabIds}`;
        const open = tab.getAttribute("aria-selected") === "true" && panel;
        if (open) {
          if (!panel.id) panel.id = `${tab.id}-panel`;
          if (tab.getAttribute("aria-controls") !== panel.id) tab.setAttribute("aria-controls", panel.id);
        } else if (tab.hasAttribute("aria-controls")) {
          tab.removeAttribute("aria-controls");
        }
      }
    }
  };
  const update = () => { nameResets(); rove(); link(); };
  new MutationObserver(update).observe(document.documentElement,
    {childList: true, subtree: true, attributes: true, attributeFilter: ["aria-selected"]});
  document.addEventListener("DOMContentLoaded", update);
})();
</script>
"""


def right_to_left(text: str) -> bool:
    """Whether `text` holds a right-to-left letter (Arabic, Hebrew, Syriac, Thaana, N'Ko...)."""
    return any(unicodedata.bidirectional(c) in ("R", "AL") for c in text)


def header_markdown(info: dict) -> str:
    """The page header: one line (model, device, and the offline warning); the rest is on the Status tab."""
    line = f"**{html.escape(str(info['model']))}** · {info['device']} ({info['dtype']})"
    if info.get("untrained"):
        line += " · ⚠️ Offline demo: random untrained weights — the output is noise, not speech."
    return line + " · details: *Status* tab"


def build_demo(studio: Studio):
    import gradio as gr

    ensure_ffmpeg()
    Player = _player_class()

    def fail(e: Exception):
        raise Refused(for_the_caller(str(e))) from None

    actions = OnePerSession()  # what changes a session's rendering: a render, a line action, a take, a pause
    quick_stops = SessionStops()  # the page's Stop for Quick utterances
    render_stops = SessionStops()  # the Script tab's Cancel for renders

    def cell(value) -> str:
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value).strip()

    def mapping_cells(table) -> dict[str, str]:
        """The speaker -> profile table as given (Gradio hands it over as a pandas DataFrame): speaker
        -> its cell, "" for "no voice chosen yet", NONE for "no reference voice" chosen on purpose."""
        rows = [] if table is None else table.values.tolist()
        return {cell(r[0]): cell(r[1]) for r in rows if len(r) >= 2 and cell(r[0])}

    def mapping_dict(table) -> dict[str, str | None]:
        """The table as a voice mapping: an empty cell or (none) is "no reference voice"."""
        return {spk: None if c in ("", NONE) else c for spk, c in mapping_cells(table).items()}

    # ---- voices ---------------------------------------------------------------------------
    first = object()  # library_view's default selection: the first profile

    def library_view(key, selected=first):
        """The library table and the Profile dropdown, selecting `selected` (None: nothing)."""
        names = studio.profile_names(key)
        value = (names[0] if names else None) if selected is first else selected if selected in names else None
        return studio.profile_rows(key), gr.Dropdown(choices=names, value=value)

    def clip_checked(audio_path):
        """A first answer on an uploaded clip, from its header (nothing decoded): a file that is not audio, or
        too long, is named now rather than at Save; a good one clears the note."""
        from csm_multi.audio import MAX_REFERENCE_S, probe_upload

        if not audio_path:
            return gr.skip()
        try:
            seconds = probe_upload(audio_path)
        except (CsmError, ValueError) as e:
            return f"⚠️ This clip cannot be used: {note_text(str(e))}"
        if seconds > MAX_REFERENCE_S:
            return (f"⚠️ This clip is {seconds:.1f} s long: a voice profile keeps at most {MAX_REFERENCE_S} s of "
                    "speech (silence is trimmed first). Trim it to one voice's best 5-15 s before saving.")
        return ""

    def add_profile(key, audio_path, transcript, name):
        try:
            if not audio_path:
                raise CsmError("upload or record a reference clip first")
            profile, transcribed = studio.add_profile(key, name or "", Path(audio_path), transcript)
        except TranscriptionError as e:  # what the operator can change goes to the log, not the page
            log.warning("automatic transcript failed: %s (%s)", e, e.operator_hint or "no hint")
            fail(e)
        except (CsmError, ValueError) as e:
            fail(e)
        rows, dropdown = library_view(key, profile.name)
        note = f"Saved **{html.escape(profile.name)}** ({profile.duration_s:.1f} s)."
        if transcribed:
            note += (f" Transcript written automatically: “{html.escape(profile.transcript)}”. If it is wrong, "
                     "correct it under *Transcript of this profile* and press **Save transcript**.")
        return rows, dropdown, note

    def list_profiles(key):
        try:
            return library_view(key)
        except CsmError as e:
            fail(e)

    def preview_profile(key, name):
        if not name:  # an empty library selects nothing: nothing to preview, not an error
            return None
        try:
            audio = studio.library(key).audio(name)
        except CsmError as e:
            fail(e)
        return 24_000, _int16(audio)

    def profile_transcript(key, name):
        """The transcript box's text and the profile it was loaded for (update_transcript checks it)."""
        if not name:
            return "", ""
        try:
            return studio.library(key).get(name).transcript, name
        except CsmError:
            return "", ""  # e.g. deleted meanwhile: the other handlers report it

    def update_transcript(key, name, transcript, loaded_for=None):
        """`loaded_for` (page state, hidden from the API): the profile whose transcript the box was
        loaded with; None (an API call) means no check."""
        try:
            if not name:
                raise CsmError("choose a profile first")
            if loaded_for is not None and loaded_for != name:
                raise CsmError(f"the transcript box does not hold {name!r}'s transcript yet (it was loaded for "
                               f"{loaded_for or 'no profile'!r}); nothing was saved: check the text and press "
                               "Save transcript again")
            profile = studio.library(key).update_transcript(name, transcript or "")
            return studio.profile_rows(key), f"Transcript of **{html.escape(profile.name)}** saved."
        except CsmError as e:
            fail(e)

    def rename_profile(key, name, new_name):
        try:
            _chosen(name)
            try:
                clean_name(new_name)
            except ProfileError as e:
                raise ProfileError(f"New name: {e}") from None
            store = studio.library(key)
            old = store.get(name).name
            new = store.rename(name, new_name).name
            return (*library_view(key, new), f"Renamed to **{html.escape(new)}**.", {old: new})
        except CsmError as e:
            fail(e)

    def delete_profile(key, name, confirmed):
        if not confirmed:
            fail(CsmError("tick 'Yes, delete it' first: deleting cannot be undone"))
        try:
            _chosen(name)
            studio.library(key).delete(name)
            return (*library_view(key, None), f"Deleted **{html.escape(name)}**.", False)
        except CsmError as e:
            fail(e)

    def export_profile(key, name):
        try:  # a fresh copy in the outputs folder, never a stored file
            _chosen(name)
            return str(studio.library(key).export(name, studio.fresh_dir("export-")))
        except CsmError as e:
            fail(e)

    def import_profile(key, file, name):
        try:
            if not file:
                raise CsmError("choose a .csmvoice file to import")
            profile = studio.library(key).import_file(file, name or None)
            return (*library_view(key, profile.name), f"Imported **{html.escape(profile.name)}**.")
        except CsmError as e:
            fail(e)

    def follow_library(key, script, choices, renamed=None):
        """The mapping and its choices after the library changed (a rename followed once), and the
        rename consumed."""
        if renamed:
            choices = {spk: renamed.get(c, c) for spk, c in (choices or {}).items()}
        return *fill_mapping(key, script, choices), None

    # ---- script ---------------------------------------------------------------------------
    # The map's cells also live in `voice_choices`, a server-side State (speaker_key -> cell), written
    # by every handler that sets the map (a fill, a dropdown, a restored draft, an opened project, a
    # reopened rendering, a rename) in the same answer. The fills read it, not the map's table: a
    # table is read when its event is sent, so a fill sent before a choice (or before a restored map
    # had landed) and answered after it put the old map back; a State is read when the fill runs.
    MAX_CHOICES = 64  # speakers remembered per page (a script has at most a few dozen)

    def capped(choices: dict[str, str]) -> dict[str, str]:
        """The last MAX_CHOICES entries (the most recently set)."""
        return dict(list(choices.items())[-MAX_CHOICES:])

    def choices_of(rows) -> dict[str, str]:
        """speaker_key -> cell for map rows [[speaker, cell], ...]."""
        return capped({speaker_key(cell(r[0])): cell(r[1]) for r in rows or [] if len(r) >= 2 and cell(r[0])})

    def fill_mapping(key, script, choices=None):
        """The map's rows and choices: one row per script speaker, the profile already in its cell if it
        still exists, or (none) if that was chosen (so edits to the script, the library, or an opened
        project keep the map), else the same-name profile, else "" (no voice chosen yet: Render asks
        first). Speakers that left the script keep their cells in the choices, should they come back."""
        try:
            voices = studio.default_voices(key, script)
            names = set(studio.profile_names(key))
        except CsmError:
            return gr.skip(), gr.skip()
        rows = []
        for spk, default in voices.items():
            c = (choices or {}).get(speaker_key(spk), "")
            rows.append([spk, c if c == NONE or c in names else default or ""])
        now = choices_of(rows)
        kept = {k: c for k, c in (choices or {}).items() if k not in now}
        return rows, capped({**kept, **now})

    def speaker_map(table, voices_table):
        """The Script tab's speaker map: a voice dropdown per script speaker, choices from the library."""
        rows = mapping_cells(table)
        names = [cell(r[0]) for r in ([] if voices_table is None else voices_table.values.tolist()) if r and cell(r[0])]
        if not rows:
            gr.Markdown("_The speakers of the script appear here, each with a voice to choose._")
            return
        # a voice in the map that this page's table does not list yet (the map's fills read the library
        # itself: a voice saved elsewhere since) is shown too, so the map shows what a render would use
        names += [v for v in dict.fromkeys(rows.values()) if v and v != NONE and v not in names]
        choices = [("— choose a voice —", ""), (f"{NONE} no reference voice", NONE), *((n, n) for n in names)]
        for spk, value in rows.items():
            box = gr.Dropdown(choices=choices, value=value if value == NONE or value in names else "",
                              label=f"Voice for {spk}", interactive=True, min_width=160)
            box.input(partial(set_voice, spk), [mapping, box, voice_choices], [mapping, voice_choices],
                      api_name=False, queue=False, show_progress="hidden")
            library_synced(box.focus, refill=False)  # its list gets the voices saved elsewhere meanwhile

    def set_voice(speaker, table, value, choices):
        value = cell(value)
        if len(value) > MAX_NAME_CHARS:  # no profile has such a name: kept as "no voice chosen", not stored
            value = ""
        rows = [[spk, value if spk == speaker else c] for spk, c in mapping_cells(table).items()]
        chosen = {k: c for k, c in (choices or {}).items() if k != speaker_key(speaker)}
        return rows, capped({**chosen, speaker_key(speaker): value})

    def without_voice(voices, table) -> list[str]:
        """The speakers that would be rendered without a reference voice although nobody chose (none)."""
        cells = {speaker_key(spk): c for spk, c in mapping_cells(table).items()}
        return [spk for spk, v in voices.items() if v is None and cells.get(speaker_key(spk)) != NONE]

    def stage_text(item, started: float, lines_done: list[float]) -> str:
        """A progress line: line, speaker, stage, and the time left from the lines finished so far."""
        stage = getattr(item, "stage", "generating")
        what = f"frame {item.frame}" if stage == "generating" else stage
        text = f"line {item.line + 1}/{item.lines} · {item.speaker} · {what}"
        elapsed = time.monotonic() - started
        if lines_done:  # seconds per line so far, times the lines left (the current one half done)
            per_line = lines_done[-1] / len(lines_done)
            left = max(per_line * (item.lines - item.line) - (elapsed - lines_done[-1]), 1.0)
            text += f" · about {_duration(left)} left"
        return text

    def busy():
        """Render and Regenerate off, Cancel on, "Render anyway" hidden and the last note cleared (a question
        about another script's voices stayed up during the new render) for a render that starts."""
        render_stops.asked(_session())
        return (gr.Button(interactive=False), gr.Button(interactive=False), gr.Button(visible=False),
                gr.Button(interactive=True), "")

    def spoken_seconds(text: str, limit_s: float) -> float:
        """The live players' guess at how long `text` takes to say: from its length, or the limit where the
        model has random weights (they never end an utterance early, so every one runs to its limit)."""
        return limit_s if studio.engine.info.untrained else min(expected_seconds(text), limit_s)

    def idle():
        """Render and Regenerate on, Cancel off: no render runs."""
        return gr.Button(interactive=True), gr.Button(interactive=True), gr.Button(interactive=False)

    def cancel_render():
        """Cancel: the render ends itself at its next step or heartbeat and says so; Render comes back then."""
        made = render_stops.stop(_session())
        if made is None:  # it had already ended
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return "Cancelling…", gr.Button(interactive=False), gr.Button(interactive=False), gr.Button(interactive=False)

    def render_script(key, script, mapping, temperature, topk, seed, max_line_s, pause_ms, mode, takes=1,
                      asked=None, progress=gr.Progress()):
        """`asked` (page state, hidden from the API): False on the Render button, True on "Render anyway"."""
        shown = StickyProgress(progress)
        with actions.claim("A render"), contextlib.closing(rendering(
                key, script, mapping, temperature, topk, seed, max_line_s, pause_ms, mode, takes, asked, shown)) as steps:
            for out in steps:
                yield out
                shown.again()

    def rendering(key, script, mapping, temperature, topk, seed, max_line_s, pause_ms, mode, takes, asked, progress):
        session = _session()
        render_stops.progress(session, 0)
        lines = []  # the script's lines, once parsed
        try:
            yield from _rendering(session, key, script, mapping, temperature, topk, seed, max_line_s, pause_ms, mode,
                                  takes, asked, progress, lines)
        except GeneratorExit:  # a closed or reloaded page, an API caller's cancel: a reopen will say so
            if lines and not render_stops.stopped(session):
                with contextlib.suppress(CsmError):
                    studio.cut_short(key, render_stops.made(session) or 0, len(lines))
            raise
        finally:  # also on a closed tab or an API caller's job.cancel() (Gradio closes the generator)
            render_stops.ended(session)

    def _rendering(session, key, script, mapping, temperature, topk, seed, max_line_s, pause_ms, mode, takes, asked,
                   progress, parsed: list):
        if render_stops.stopped(session):  # cancelled while it waited for its turn
            yield (gr.skip(), "Cancelled.", *[gr.skip()] * 10)
            return
        try:
            config = _render_config(temperature, topk, seed, max_line_s, pause_ms, mode, takes)
            lines = studio.parse(script)  # script problems first, with line numbers
            voices = studio.check_voices(key, studio.voices_for(key, script, mapping_dict(mapping)))
        except (CsmError, ValueError) as e:
            fail(e)
        silent = without_voice(voices, mapping)
        if silent and asked is False and _from_page():
            # each name isolated (<bdi>; U+2068..U+2069 in the button's plain text), so that a list of Arabic or
            # Hebrew names keeps its order and commas in the left-to-right sentence around it
            who = ", ".join(f"<bdi>{html.escape(name)}</bdi>" for name in silent)
            question = (f"**{who}** {'has' if len(silent) == 1 else 'have'} no voice yet. Choose one "
                        f"under *Voice for <bdi>{html.escape(silent[0])}</bdi>* (or {NONE} for no reference voice), "
                        "or render anyway without one.")
            names = ", ".join(f"\u2068{name}\u2069" if right_to_left(name) else name for name in silent)
            anyway = gr.Button(value=f"Render {names} without a reference voice", visible=True)
            yield gr.skip(), question, *[gr.skip()] * 6, anyway, *[gr.skip()] * 3
            return
        parsed.extend(lines)
        work = on_worker(lambda emit, stopped: studio.render(
            key, script, voices, config, progress=throttled(emit), cancel=stopped,
            on_clip=lambda clip: emit(("clip", clip))), HEARTBEAT_S)
        started, lines_done = time.monotonic(), []
        # the live player: lines held back while they come slower than they play (pacing.Pacer)
        gaps = [config.pause_before_ms(line, i) / 1000 for i, line in enumerate(lines)]
        guesses = [spoken_seconds(line.text, config.max_line_ms / 1000) + gap for line, gap in zip(lines, gaps)]
        pacer = Pacer(sum(guesses), len(lines) * config.max_line_ms / 1000 + sum(gaps), max(guesses),
                      margin_s=LIVE_DELIVERY_S)
        lengths = LineLengths(guesses)  # the guesses corrected by the lines made so far
        held = []
        with contextlib.closing(work):  # cancelled or closed: the worker stops at its next frame
            while True:
                if render_stops.stopped(session):  # the page's Cancel: looked at every step and heartbeat
                    yield (gr.skip(), "Cancelled.", *[gr.skip()] * 10)
                    return
                try:
                    item = next(work)
                except StopIteration as done:
                    result = done.value
                    break
                except Exception as e:  # noqa: BLE001 - the render's own failure, reported to the browser
                    fail(e)
                if item is None:  # Gradio can close this generator only at a yield
                    yield (gr.skip(),) * 12
                elif not isinstance(item, tuple):  # a progress event
                    progress(item.fraction, desc=stage_text(item, started, lines_done))
                else:  # ("clip", a finished line)
                    clip = item[1]
                    lines_done.append(time.monotonic() - started)
                    render_stops.progress(session, len(lines_done))
                    pause = np.zeros(24_000 * config.pause_before_ms(clip.line, clip.index) // 1000, np.int16)
                    held.append(np.concatenate([pause, _int16(clip.audio)]))
                    note = f"Rendered line {len(lines_done)} ({html.escape(clip.line.speaker)})…"
                    pacer.revise(*lengths.finished(clip.index, len(held[-1]) / 24_000))
                    if pacer.add(len(held[-1]) / 24_000):
                        for piece in live_pieces(held):
                            yield piece, note, *[gr.skip()] * 10
                        held = []
                    else:
                        wait = pacer.wait_s()
                        when = "after the next line" if wait is None else f"in ~{_duration(max(wait, 1.0))}"
                        yield (gr.skip(), f"{note} Lines come slower than they play here, so playback starts {when} "
                                          "and then does not pause.", *[gr.skip()] * 10)
        if held:  # the rest of the held lines, before the files
            for piece in live_pieces(held):
                yield piece, gr.skip(), *[gr.skip()] * 10
        progress(1.0, desc="encoding the files (WAV, FLAC, MP3, stems)")
        try:
            note, *shown = _finished(result, key, (script, voices, config))
        except CsmError as e:  # e.g. the disk is full
            fail(e)
        yield (gr.skip(), note, *shown[:5], voices, gr.skip(), *shown[5:])

    def _finished(result: RenderResult, key=None, draft=None, title: str | None = None):
        """What the page shows of a rendering: (note, dialogue, files, manifest rows, context rows,
        result, zip, timeline, context bars). `draft` (script, voices, config) makes it this library's
        last rendering, which a reloaded page can reopen."""
        paths = studio.write_outputs(result, title)
        bundle = str(paths.pop("zip"))
        files = [str(p) for p in paths.values()]  # the dialogue first
        rows = [[m["line"], m["speaker"], m["profile"] or NONE, m["text"], m["start_s"], m["duration_s"], m["seed"]]
                for m in result.manifest()]
        note = (f"Done: {len(result.clips)} line{'' if len(result.clips) == 1 else 's'}, "
                f"{result.audio.numel() / 24_000:.1f} s"
                f"{'' if all(c.watermarked for c in result.clips) else ' (NOT watermarked)'}.")
        if draft is not None:
            studio.remember(key, *draft, result)
            studio.remember_audio(key, paths["dialogue"])
        timeline, bars = pictures(result, paths["dialogue"])
        return (note, (24_000, _int16(result.audio)), files, rows, studio.context_rows(result), result, bundle,
                timeline, bars)

    def pictures(result: RenderResult, dialogue_path) -> tuple[str, str]:
        """The timeline (click a line to play from there) and the context bars of a rendering."""
        from urllib.parse import quote

        manifest = result.manifest()
        peaks = [line_peaks(c.audio.numpy(), 120) for c in result.clips]
        url = "gradio_api/file=" + quote(str(dialogue_path))  # relative: works under a path prefix too
        return (timeline_html(manifest, peaks, url, result.audio.numel() / result.sample_rate),
                context_bars_html(manifest, window=studio.engine.config.max_seq_len))

    def regenerate_line(key, result, voices, line_number, seed, progress=gr.Progress()):  # noqa: B008
        if result is None:
            fail(CsmError("render the script first, then regenerate one of its lines"))
        with actions.claim(f"The regeneration of line {line_number}"):
            try:
                line = None if line_number is None else int(line_number)
                new = yield from line_action(lambda report, stopped: studio.rerender(
                    key, result, line, voices or {}, _seed(seed), progress=report, cancel=stopped), progress)
                yield _shown(key, new, f"Script line {line} regenerated")
            except (CsmError, ValueError) as e:
                fail(e)

    # ---- the per-line editor: each rendered line's takes, text and pause -----------------------
    editor_draws = itertools.count(1)

    def line_editor(result, voices):
        """One row per rendered line (numbered 1..N as in the manifest's order): what was said, by whom,
        how long, its takes to switch between, a new take, its text to edit and re-render, its pause."""
        if result is None:
            gr.Markdown("_After a render each line appears here, to play, re-take, edit or re-time._")
            return
        slots = generation_slots(studio.engine)  # never the default 1: see generation_slots
        if result.stale:
            rows = ", ".join(str(i + 1) for i in result.stale)
            gr.Markdown(f"⚠️ Line{'s' * (len(result.stale) > 1)} {rows} heard an earlier version of a line "
                        "that changed (conversational mode: each line is conditioned on the lines before it).")
            gr.Button(f"Re-render line{'s' * (len(result.stale) > 1)} {rows}", size="sm").click(
                editor_actions["rerender_stale"], [key, last_result, last_voices], shown,
                api_name=False, concurrency_id="gpu", concurrency_limit=slots, show_progress_on=[render_msg])
        shown_rows = result.clips[:MAX_EDITOR_ROWS]
        draw = f"csm-draw-{next(editor_draws)}"  # each drawing's own class: a client can tell it has landed
        for i, clip in enumerate(shown_rows):
            takes = result.candidates(i)
            with gr.Group():
                with gr.Row(equal_height=True):
                    gr.Markdown(f"**{i + 1}** · <bdi>{html.escape(clip.line.speaker)}</bdi> → "
                                f"<bdi>{html.escape(clip.profile or NONE)}</bdi>"
                                f" · {clip.duration_s:.1f} s · {_take_label(clip)}"
                                + (" · ⚠️ **heard an earlier version of a line: re-render it**" if i in result.stale else ""),
                                elem_classes=["csm-line-head", draw])
                    Player(value=(24_000, _int16(clip.audio)), type="numpy", show_label=False, interactive=False,
                             label=f"Line {i + 1}", scale=2, buttons=[])
                with gr.Row(equal_height=True):
                    text = gr.Textbox(value=clip.line.text, label=f"Text of line {i + 1}", scale=4, max_lines=4,
                                      interactive=True)
                    pause = gr.Number(value=result.pause_before_ms(i) / 1000, label="Pause before (s)", minimum=0,
                                      maximum=10, step=0.1, min_width=90, scale=1, interactive=True)
                with gr.Row():
                    row = gr.State(i)
                    # the edit is written back into the Script box (script_follows_edit, on last_result's change: a
                    # step chained here would be gone with this drawing), so the next Render says it. Queued, with
                    # no limit: Gradio finds a gr.render event's function only through the queue
                    gr.Button("Re-render with this text", size="sm").click(
                        line_origin, [last_result, row], [edit_origin], api_name=False, concurrency_limit=None,
                        show_progress="hidden").then(
                        editor_actions["edit_line"], [key, last_result, last_voices, row, text],
                        shown, api_name=False, concurrency_id="gpu", concurrency_limit=slots,
                        show_progress_on=[render_msg])
                    gr.Button("New take", size="sm").click(
                        editor_actions["new_take"], [key, last_result, last_voices, row], shown,
                        api_name=False, concurrency_id="gpu", concurrency_limit=slots, show_progress_on=[render_msg])
                    pause.submit(editor_actions["set_pause"], [key, last_result, row, pause], shown,
                                 api_name=False, show_progress="hidden")
                if len(takes) > 1:
                    pick = gr.Radio([(_take_label(c), c.take + 1) for c in takes], value=clip.take + 1,
                                    label=f"Takes of line {i + 1} (the best was chosen; switch to keep another)",
                                    interactive=True)
                    pick.input(editor_actions["choose_take"], [key, last_result, row, pick], shown,
                               api_name=False, show_progress="hidden")
        if len(result.clips) > MAX_EDITOR_ROWS:
            gr.Markdown(f"_{editor_overflow(len(result.clips))}_")

    def line_action(call, progress):
        """A one-line action, `call(report, stopped)`, run on a worker (`on_worker`), its progress events
        shown as Gradio progress (the line, its stage, its frames). A generator of no-change updates of
        the editor's outputs every HEARTBEAT_S, so a closed tab or a cancel stops the line at its next
        frame and frees its generation row; returns what `call` returns (`yield from`)."""
        shown = StickyProgress(progress)
        work = on_worker(lambda emit, stopped: call(throttled(emit), stopped), HEARTBEAT_S)
        with contextlib.closing(work):
            while True:
                try:
                    item = next(work)
                except StopIteration as done:
                    return done.value
                if item is None:
                    yield (gr.skip(),) * EDITOR_OUTPUTS
                    shown.again()  # the page drops the progress text at every output
                else:
                    stage = getattr(item, "stage", "generating")
                    shown(min(item.frame / max(item.max_frames, 1), 1.0),
                          desc=f"line {item.line + 1} · {item.speaker} · "
                               f"{f'frame {item.frame}' if stage == 'generating' else stage}")

    def edit_line(key, result, voices, row, text, progress=gr.Progress()):  # noqa: B008 - Gradio's way
        """`row`: the 0-based place of the line (the page's editor; the API's `line` is 1-based)."""
        with actions.claim(f"The re-render of line {row + 1}"):
            try:
                new = yield from line_action(lambda report, stopped: studio.edit_line(
                    key, result, row, text, voices, progress=report, cancel=stopped), progress)
                yield _shown(key, new, f"Line {row + 1} re-rendered with the new text")
            except (CsmError, ValueError) as e:
                fail(e)

    def new_take(key, result, voices, row, progress=gr.Progress()):  # noqa: B008 - Gradio's way
        with actions.claim(f"The new take of line {row + 1}"):
            try:
                new = yield from line_action(lambda report, stopped: studio.new_takes(
                    key, result, row, voices, 1, progress=report, cancel=stopped), progress)
                yield _shown(key, new, f"New take of line {row + 1}")
            except (CsmError, ValueError) as e:
                fail(e)

    def rerender_stale(key, result, voices, progress=gr.Progress()):  # noqa: B008 - Gradio's way
        with actions.claim("The re-render of the stale lines"):
            try:
                stale = ", ".join(str(i + 1) for i in (result.stale if result else ()))
                new = yield from line_action(lambda report, stopped: studio.rerender_stale(
                    key, result, voices, progress=report, cancel=stopped), progress)
                yield _shown(key, new, f"Re-rendered line(s) {stale}")
            except (CsmError, ValueError) as e:
                fail(e)

    def line_origin(result, row):
        """What line `row` of the rendering said before an edit: (row, source line number, speaker, text)."""
        if result is None or not 0 <= row < len(result.clips):
            return None
        line = result.clips[row].line
        return row, line.number, line.speaker, line.text

    def script_follows_edit(script_text, result, origin):
        """After an edit in the per-line editor (`origin`: what the line said before it): the Script box
        says the new text too, so that the next Render (and Save project) keeps it. Only where the box's
        line still says what was rendered there: a line changed in the box since is left as it is."""
        if origin is None or result is None or not isinstance(script_text, str):
            return gr.skip(), gr.skip()
        row, number, speaker, before = origin
        if not 0 <= row < len(result.clips):
            return gr.skip(), None
        line = result.clips[row].line
        if (line.text == before or line.number != number or speaker_key(line.speaker) != speaker_key(speaker)
                or with_line_text(script_text, number, speaker, before) != script_text):
            return gr.skip(), None
        changed = with_line_text(script_text, number, speaker, line.text)
        return (gr.skip() if changed is None else changed), None

    def choose_take(key, result, row, take):
        with actions.claim("A take switch"):
            return keep_take(key, result, row, take)

    def keep_take(key, result, row, take):
        try:
            if take is None:
                raise CsmError("take: give the number of the take to keep (1 = the first)")
            take = int(take) - 1
            return _shown(key, studio.choose_take(result, row, take), f"Line {row + 1}: take {take + 1} kept")
        except (CsmError, ValueError, TypeError) as e:
            fail(e)

    def set_pause(key, result, row, seconds):
        with actions.claim("A pause change"):
            try:
                return _shown(key, studio.set_pause(result, row, seconds), f"Pause before line {row + 1} set")
            except (CsmError, ValueError) as e:
                fail(e)

    def _shown(key, result, what: str):
        note, *rest = _finished(result, key, studio_draft(key))
        return (f"{what}. {note}", *rest)

    # API versions of the editor's actions: `line` is 1..N, the line's place in the manifest
    def api_new_take(key, result, voices, line, progress=gr.Progress()):  # noqa: B008 - Gradio's way
        yield from new_take(key, result, voices, _api_row(line), progress)

    def api_edit_line(key, result, voices, line, text, progress=gr.Progress()):  # noqa: B008 - Gradio's way
        yield from edit_line(key, result, voices, _api_row(line), text, progress)

    def api_choose_take(key, result, line, take):
        return choose_take(key, result, _api_row(line), take)

    def api_set_pause(key, result, line, pause_s):
        return set_pause(key, result, _api_row(line), pause_s)

    def _api_row(line) -> int:
        return -1 if line is None else int(line) - 1

    def studio_draft(key):
        """The script, voices and settings of this library's last rendering (None if there is none)."""
        last = studio.last_rendering(key)
        return None if last is None else last[:3]

    # ---- projects -------------------------------------------------------------------------
    def save_project(key, script, mapping, temperature, topk, seed, max_line_s, pause_ms, mode, takes=1, result=None):
        try:
            config = _render_config(temperature, topk, seed, max_line_s, pause_ms, mode, takes)
            voices = studio.voices_for(key, script, mapping_dict(mapping))
            return str(studio.save_project(key, script, voices, config, result))
        except (CsmError, ValueError) as e:
            fail(e)

    def open_project(key, path):
        """Fill the Script tab from a .csmproj: script, mapping, settings, and its rendering if any."""
        with actions.claim("Opening a project"):
            return opened_project(key, path)

    def opened_project(key, path):
        try:
            if not path:
                raise CsmError("Open project: choose a .csmproj file to open")
            project = studio.open_project(key, path)
            title = Path(path).stem
            rendered = (_finished(project.result, key, (project.script, project.voices, project.config), title)
                        if project.result else ("No rendering saved.", None, None, [], [], None, None, "", ""))
        except CsmError as e:
            fail(e)
        c = project.config
        note = "  \n".join([f"Opened the project: {rendered[0]}", *(f"Note: {html.escape(n, quote=False)}" for n in project.notes)])
        values = tab_values(project.script, project.voices, c)
        return (*values, note, *rendered[1:6], project.voices, *library_view(key), *rendered[6:], choices_of(values[1]),
                c.takes)

    def tab_values(script_text, voices, c: RenderConfig) -> tuple:
        """The Script tab's script, speaker map and settings for a project or a rendering."""
        return (script_text, [[spk, prof or NONE] for spk, prof in voices.items()], c.temperature, c.topk,
                -1 if c.seed is None else c.seed, c.max_line_ms / 1000, c.pause_ms, c.mode)

    def reopen_last(key):
        """This library's last rendering (kept in the server's memory), back on the Script tab."""
        with actions.claim("Reopening the last rendering"):
            return reopened_last(key)

    def reopened_last(key):
        try:
            last, lost = studio.last_rendering(key), studio.cut_short_note(key)
            if last is None:
                raise CsmError(f"{lost}; render the script again" if lost else
                               "there is no rendering of this library since the server started: render the script")
            script_text, voices, c, result = last
            rendered = _finished(result)
        except CsmError as e:
            fail(e)
        values = tab_values(script_text, voices, c)
        before = f"{lost[0].upper()}{lost[1:]}. Reopened the rendering before it: " if lost else "Reopened the last rendering: "
        return (*values, f"{before}{rendered[0]}", *rendered[1:6], voices, *rendered[6:], choices_of(values[1]), c.takes)

    # ---- quick ----------------------------------------------------------------------------
    def say(key, text, profile, temperature, topk, seed, max_s):
        session = _session()
        quick_stops.progress(session, 0)
        chunks, stopped = [], False
        try:
            if quick_stops.stopped(session):  # stopped while it waited for its turn: Stop has answered
                yield gr.skip(), gr.skip(), gr.skip()
                return
            text = clean_utterance(text) if isinstance(text, str) else ""
            if not text:
                raise CsmError("Text: write some text to speak first")
            if len(text) > studio.limits.max_line_chars:
                raise CsmError(f"Text: keep it to {studio.limits.max_line_chars} characters at most (use the Script tab "
                               "for more)")
            context = []
            if profile and profile != NONE:
                store = studio.library(key)
                try:
                    context = [store.segment(profile, studio.engine.encode_reference, studio.engine.codec_id)]
                except ProfileError as e:
                    raise CsmError(f"Voice profile: {e}") from None
            seed = _seed(seed)
            if seed is None:  # drawn here, not in the engine, so the message can show it
                seed = secrets.randbits(31)
            sampling = SamplingConfig(temperature=float(temperature), topk=int(topk), seed=seed,
                                      max_audio_length_ms=min(float(max_s), studio.limits.max_line_s) * 1000)
            speaker = context[0].speaker if context else 0
            held = []
            stream = StreamConfig()
            limit = sampling.max_audio_length_ms / 1000
            pacer = Pacer(spoken_seconds(text, limit), limit, stream.chunk_frames * 0.08, margin_s=LIVE_DELIVERY_S)
            made_on_worker = beating(lambda stopped: studio.engine.stream(
                text, speaker, context, sampling, stream, visitor=studio.visitor(key), cancel=stopped), HEARTBEAT_S)
            with contextlib.closing(made_on_worker):  # a Stop or a closed tab ends the worker at once
                for chunk in made_on_worker:
                    if quick_stops.stopped(session):  # the page's Stop: looked at every chunk and heartbeat
                        stopped = True
                        break
                    if chunk is None:  # nothing new for a while: a yield, so that a closed tab reaches us
                        yield gr.skip(), gr.skip(), gr.skip()
                        continue
                    chunks.append(chunk.audio)
                    quick_stops.progress(session, len(chunks))
                    held.append(_int16(chunk.audio))
                    made = f"{chunk.frames * 0.08:.2f} s… (seed {chunk.seed})"
                    if pacer.add(chunk.audio.numel() / 24_000):  # slower than real time: held until it will not pause
                        for piece in live_pieces(held):
                            yield piece, gr.skip(), made
                        held = []
                    elif (wait := pacer.wait_s()) is None:
                        yield gr.skip(), gr.skip(), f"{made} Measuring the speed before playing…"
                    else:
                        yield gr.skip(), gr.skip(), (f"{made} Generating at {1 / pacer.rtf:.2f}× real time here, so "
                                                     f"playback starts in ~{wait:.0f} s and then does not pause.")
            if held and not stopped:
                for piece in live_pieces(held):
                    yield piece, gr.skip(), f"{pacer.made_s:.2f} s, finishing…"
        except (CsmError, ValueError) as e:
            fail(e)
        finally:  # also on a closed tab or an API caller's job.cancel() (Gradio closes the generator)
            quick_stops.ended(session)
        if not chunks:  # stopped: Stop has answered (QUICK_NOTHING_MADE)
            yield (gr.skip(), gr.skip(), gr.skip() if stopped else
                   f"The model ended the utterance at once with seed {seed}; try another seed.")
            return
        try:
            path, seconds = said_file(key, chunks)
        except CsmError as e:
            fail(e)
        yield gr.skip(), str(path), (f"Stopped at {seconds:.2f} s (seed {seed}, {said_mark()}): the file holds what "
                                     "was said until then." if stopped else f"{seconds:.2f} s, seed {seed}, {said_mark()}.")

    def said_file(key, chunks) -> tuple[Path, float]:
        """A Quick utterance's audio chunks as a fresh WAV, now this library's last audio; and its seconds."""
        import torch

        path = studio.write_clip(torch.cat(chunks), "say")
        studio.remember_audio(key, path)
        return path, sum(c.numel() for c in chunks) / 24_000

    def said_mark() -> str:
        return "watermarked" if studio.engine.watermarker else "NOT watermarked"

    def quick_buttons(speaking: bool):
        """Speak and Stop for an utterance that runs (`speaking`) or not."""
        def buttons():
            if speaking:  # asked for: a Stop before it even starts (a busy server) finds nothing made
                quick_stops.asked(_session())
            return gr.Button(interactive=not speaking), gr.Button(interactive=speaking)
        return buttons

    def stop_say():
        """Stop: the utterance ends itself at its next chunk or heartbeat, with what it said as its file;
        where nothing was made yet, the answer is now. Both buttons stay off until it has ended."""
        made = quick_stops.stop(_session())
        off = (gr.Button(interactive=False), gr.Button(interactive=False))
        if made is None:  # it had already ended
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        if made == 0:  # the Download box must not go on offering the previous utterance as this one
            return None, QUICK_NOTHING_MADE, *off
        return gr.skip(), "Stopping…", *off

    def check_watermark(path):
        try:
            if not path:
                raise CsmError(f"Audio to check: upload an audio file first (at most {MAX_UPLOAD[:-2]} MB; "
                               "Gradio refuses a larger one before it arrives)")
            found = studio.check_watermark(path)
        except (CsmError, ValueError) as e:
            fail(e)
        n = found["windows"]
        if not n:  # not a "No": nothing was looked at
            return ("Nothing could be checked: the clip is silent or shorter than 0.84 s. Upload a longer part of "
                    "the audio.")
        caveat = (f"  \n_Checked {n} window{'' if n == 1 else 's'}: {found['seconds_checked']:.1f} s of the "
                  f"{found['seconds_total']:.1f} s clip, spread over it._")
        if studio.engine.info.untrained:
            caveat += "  \n_Offline demo: the watermarker has random weights, so this answer means nothing._"
        if found["matches_key"]:
            return "✅ Yes: this audio carries **this deployment's** watermark." + caveat
        if found["watermarked"]:
            return ("❌ No: no watermark with this deployment's key. The detector read another message "
                    f"(agreement {found['confidence']:.0%}): a watermark with another key, or none at all; "
                    "it cannot tell those apart." + caveat)
        return "❌ No: no watermark from this deployment was found (short or heavily edited audio can lose it)." + caveat

    def check_last(key):
        """The watermark check on this library's last dialogue (Script) or utterance (Quick)."""
        try:
            path = studio.last_audio(key)
        except CsmError as e:
            fail(e)
        if path is None:
            fail(CsmError("nothing was rendered with this voice library in the last hour: render a script or use "
                          "Quick first (or upload the file above)"))
        return f"Checked the last render ({html.escape(path.name)}).  \n" + check_watermark(str(path))

    def status(key):
        return status_markdown(studio.status(key))

    # ---- drafts: the Script tab kept in the browser, per library ------------------------------
    def save_draft(key, drafts, *values):
        """The Script tab's script, map and settings into the browser's drafts (the 3 newest libraries)."""
        if not isinstance(key, str) or not LIBRARY_KEY.fullmatch(key):
            return gr.skip()
        values = [v.values.tolist() if hasattr(v, "values") and hasattr(v, "columns") else v for v in values]
        kept = {k: v for k, v in (drafts if isinstance(drafts, dict) else {}).items() if k != key}
        return {**dict(list(kept.items())[-2:]), key: values}

    def restore_draft(key, drafts):
        """The draft this browser kept for this library; each value checked as if typed (else left)."""
        draft = drafts.get(key) if isinstance(drafts, dict) and isinstance(key, str) else None
        if not isinstance(draft, list) or len(draft) != len(draft_inputs):
            return [gr.skip()] * (len(draft_inputs) + 1)
        out, choices = [], gr.skip()
        for block, value in zip(draft_inputs, draft):
            if block is mapping:
                value = {"headers": ["speaker", "profile"], "data": value}
            if argument_problem(block, value):
                out.append(gr.skip())
            elif block is mapping:
                out.append(value["data"])
                choices = choices_of(value["data"])
            else:
                out.append(value)
        return [*out, choices]

    def init_key(saved):
        key = saved if isinstance(saved, str) and LIBRARY_KEY.fullmatch(saved) else new_library_key()
        return key, key

    with _checked_blocks()(title="csm-multi", delete_cache=(1800, 3600)) as demo:
        secret = studio.browser_secret()
        saved_key = gr.BrowserState(None, storage_key="csm-multi-library", secret=secret)
        drafts = gr.BrowserState({}, storage_key="csm-multi-drafts", secret=secret)
        key = gr.Textbox(visible=False, label="library_key")
        gr.Markdown("# csm-multi <small>multi-speaker dialogue with CSM-1B</small>", elem_classes=["csm-title"])
        gr.Markdown(header_markdown(studio.status(None)))

        with gr.Tab("Voices"):
            with gr.Row():
                with gr.Column():
                    ref_audio = gr.Audio(label="Reference clip (1-30 s of one voice)", sources=["upload", "microphone"],
                                         type="filepath")
                    ref_text = gr.Textbox(label="Transcript (exactly what the clip says)",
                                          placeholder="leave empty to have it transcribed automatically"
                                          if studio.transcriber else "type what the clip says, word for word "
                                          "(automatic transcripts are not available on this server)")
                    ref_name = gr.Textbox(label="Profile name", placeholder="Alice")
                    save_btn = gr.Button("Save voice profile", variant="primary")
                    voice_msg = gr.Markdown(elem_classes=[NOTE])
                with gr.Column():
                    library = gr.Dataframe(headers=["name", "seconds", "transcript", "created"], label="Your voices",
                                           interactive=False)
                    refresh_btn = gr.Button("Refresh library", size="sm")
                    chosen = gr.Dropdown(label="Profile", choices=[], allow_custom_value=True)  # re-validated server-side
                    preview = Player(label="Preview", type="numpy", interactive=False)
                    with gr.Row():
                        edit_text = gr.Textbox(label="Transcript of this profile", scale=3)
                        edit_btn = gr.Button("Save transcript")
                    with gr.Row():
                        new_name = gr.Textbox(label="New name", scale=2)
                        rename_btn = gr.Button("Rename")
                    with gr.Row():
                        confirm = gr.Checkbox(label="Yes, delete it")
                        delete_btn = gr.Button("Delete", variant="stop")
                    with gr.Row():
                        export_btn = gr.Button("Export .csmvoice")
                        export_file = gr.File(label="Exported profile")
                    with gr.Row():
                        import_file = gr.File(label="Import .csmvoice", file_types=[".csmvoice", ".zip"], type="filepath")
                        import_name = gr.Textbox(label="Import as (optional)")
                        import_btn = gr.Button("Import")

        with gr.Tab("Script") as script_tab:
            with gr.Row():
                with gr.Column(scale=3):
                    script = gr.Textbox(label="Script", value=EXAMPLE_SCRIPT, lines=12, max_lines=40)
                    gr.Markdown("<small>One line per utterance: `Name: text` (or `[Name] text`); `#` starts a "
                                "comment; `[pause 1.5s]` on its own line or inside a line adds a pause.</small>")
                    # the speaker map's value: what the API takes; the page shows one dropdown per speaker
                    mapping = gr.Dataframe(headers=["speaker", "profile"], label="speaker map",
                                           datatype=["str", "str"], interactive=True, column_count=(2, "fixed"),
                                           visible="hidden")
                    gr.Markdown("**Speaker → voice**", elem_classes=["csm-label"])
                    gr.render(inputs=[mapping, library], concurrency_limit=None, show_progress="hidden")(speaker_map)
                with gr.Column(scale=2):
                    temperature = gr.Slider(*studio.limits.temperature, value=0.9, step=0.05, label="Temperature")
                    topk = gr.Slider(1, studio.limits.max_topk, value=50, step=1, precision=0, label="Top-k")
                    seed = gr.Number(label="Seed (-1 = random; line i uses seed + i)", value=-1, precision=0,
                                     minimum=-1, maximum=MAX_SEED - MAX_LINES)
                    max_line_s = gr.Slider(studio.limits.min_line_s, studio.limits.max_line_s, value=10, step=1,
                                           label="Max seconds per line")
                    pause_ms = gr.Slider(0, studio.limits.max_pause_ms, value=300, step=50, precision=0,
                                         label="Pause between lines (ms)")
                    mode = gr.Radio(["conversational", "fast"], value="conversational", label="Mode",
                                    info="fast: lines conditioned on voices only, rendered in batches")
                    takes = gr.Slider(1, MAX_TAKES, value=1, step=1, precision=0, label="Takes per line",
                                      info="candidates made together per line; the best is kept, the others stay "
                                           "to switch to" + (" (ranked by a speech recogniser and clean endings)"
                                                             if studio.transcriber else " (ranked by clean endings)"))
                    with gr.Row():
                        render_btn = gr.Button("Render", variant="primary")
                        cancel_btn = gr.Button("Cancel", variant="stop", interactive=False)
                    render_anyway = gr.Button("Render anyway", visible=False, size="sm")
                    render_msg = gr.Markdown(elem_classes=[NOTE])
            live = gr.Audio(label="Playing while rendering", streaming=True, autoplay=True, interactive=False)
            dialogue = Player(label="Dialogue", type="numpy", interactive=False)
            with gr.Row():
                bundle = gr.File(label="Download all (.zip): dialogue, stems, clips, manifest, subtitles", scale=3)
                reopen_btn = gr.Button("Reopen the last rendering", size="sm", scale=1)
            timeline = gr.HTML("", js_on_load=TIMELINE_JS, apply_default_css=False, elem_id="timeline")
            last_result = gr.State(None)
            edit_origin = gr.State(None)  # the edited line's (source line, speaker, text) before an edit
            last_voices = gr.State(None)
            gr.Markdown("**Lines** — play, take again, edit the text or the pause of any line", elem_classes=["csm-label"])
            gr.render(inputs=[last_result, last_voices], triggers=[last_result.change], concurrency_limit=None,
                      show_progress="hidden")(line_editor)
            context_bars = gr.HTML("", js_on_load=None, apply_default_css=False, max_height=480, elem_id="context-bars")
            with gr.Accordion("All files and tables", open=False):
                files = gr.File(label="Clips and manifest", file_count="multiple")
                manifest = gr.Dataframe(headers=["line", "speaker", "profile", "text", "start s", "seconds", "seed"],
                                        label="Manifest", interactive=False)
                context_view = gr.Dataframe(headers=["line", "speaker", "context positions", "kept", "dropped"],
                                            label="Context budget (what each line heard, of the 2048-position window)",
                                            interactive=False)
            # the API's regenerate_line; the page uses each line's own buttons
            regen_line = gr.Number(label="Script line to regenerate", precision=0, maximum=MAX_LINES, visible="hidden")
            regen_seed = gr.Number(label="New seed (-1 = random)", value=-1, precision=0, minimum=-1, maximum=MAX_SEED,
                                   visible="hidden")
            regen_btn = gr.Button("Regenerate line", visible="hidden")
            # the API's per-line actions (the page has buttons on each line): line = 1..N, as in the manifest
            api_row = gr.Number(label="line", precision=0, minimum=1, maximum=MAX_LINES, visible="hidden")
            api_text = gr.Textbox(label="text", visible="hidden")
            api_take = gr.Number(label="take", precision=0, minimum=1, maximum=MAX_CANDIDATES, visible="hidden")
            api_pause = gr.Number(label="pause_s", minimum=0, maximum=10, visible="hidden")
            api_buttons = {name: gr.Button(name, visible="hidden")
                           for name in ("new_take", "edit_line", "choose_take", "set_pause", "rerender_stale")}
            with gr.Row():
                project_btn = gr.Button("Save project")
                project_file = gr.File(label="Project (.csmproj): script, voices, settings, rendering")
                open_file = gr.File(label="Open project (.csmproj)", file_types=[".csmproj"], type="filepath")
            ask, dont_ask = gr.State(False), gr.State(True)  # render_script's `asked`
        transcript_for = gr.State(None)  # the profile whose transcript the box holds (None: not loaded)
        renamed = gr.State(None)  # the last rename, old -> new name, for the speaker map to follow
        voice_choices = gr.State({})  # the voices chosen on this page: see fill_mapping

        with gr.Tab("Quick") as quick_tab:
            q_text = gr.Textbox(label="Text", value="Hello! This is a quick test of the conversational speech model.")
            with gr.Row():
                q_profile = gr.Dropdown(label="Voice profile", choices=[NONE], value=NONE, allow_custom_value=True)
                q_temp = gr.Slider(*studio.limits.temperature, value=0.9, step=0.05, label="Temperature")
                q_topk = gr.Slider(1, studio.limits.max_topk, value=50, step=1, precision=0, label="Top-k")
                q_seed = gr.Number(label="Seed (-1 = random)", value=-1, precision=0, minimum=-1, maximum=MAX_SEED)
                q_max = gr.Slider(1, studio.limits.max_line_s, value=10, step=1, label="Max seconds")
            with gr.Row():
                q_btn = gr.Button("Speak", variant="primary")
                q_stop = gr.Button("Stop", variant="stop", interactive=False)  # on while an utterance runs
            q_live = gr.Audio(label="Streaming", streaming=True, autoplay=True, interactive=False)
            q_file = gr.File(label="Download")
            q_msg = gr.Markdown(elem_classes=[NOTE])

        with gr.Tab("Watermark"):
            wm_file = gr.File(label="Audio to check (WAV, FLAC, OGG, MP3)", type="filepath")
            with gr.Row():
                wm_btn = gr.Button("Check")
                wm_last_btn = gr.Button("Check the last render (Script or Quick)")
            wm_msg = gr.Markdown(elem_classes=[NOTE])

        with gr.Tab("Status"):
            status_md = gr.Markdown()
            status_btn = gr.Button("Refresh")

        def profile_choices(key, current=None):
            names = studio.profile_names(key)
            return gr.Dropdown(choices=[NONE, *names], value=current if current in names else NONE)

        def pick_row(evt: gr.SelectData):
            """A click on a row of "Your voices" selects that profile."""
            row = evt.row_value or []
            return row[0] if row and row[0] else gr.skip()

        pick_row.__annotations__["evt"] = gr.SelectData  # a real class: `gr` is not a module global here

        def sync_library(key, table, picked, quick, script_text, choices, refill=True):
            """The library as this page shows it, brought up to date where it changed since the page last
            read it (another tab, or another tester of a shared library, saved, renamed or deleted a
            voice): the table (the speaker map's choices), the Voices tab's profile and Quick's, each
            keeping its selection, and with `refill` the map refilled (a speaker with no voice chosen
            gets a same-name profile that appeared). No change otherwise."""
            try:
                names = studio.profile_names(key)
            except CsmError:
                return (gr.skip(),) * 5
            shown = [] if table is None else [cell(r[0]) for r in table.values.tolist() if r and cell(r[0])]
            if shown == names:
                return (gr.skip(),) * 5
            rows, dropdown = library_view(key, picked)
            refilled = fill_mapping(key, script_text, choices) if refill else (gr.skip(), gr.skip())
            return rows, dropdown, profile_choices(key, quick), *refilled

        def library_synced(trigger, refill=True):
            """`trigger` (a tab or box about to be used) first brings this page's library up to date. A
            map's own dropdown does not refill the map: while it is open it keeps showing the value it
            had, so a same-name voice filled in then would be rendered while "choose a voice" shows."""
            trigger(partial(sync_library, refill=refill), [key, library, chosen, q_profile, script, voice_choices],
                    [library, chosen, q_profile, mapping, voice_choices], api_name=False, queue=False,
                    show_progress="hidden")

        def library_changed(event, follow_rename: bool = False):
            """After the library changed: the Quick tab's choices, then the speaker map."""
            event = event.then(profile_choices, [key, q_profile], [q_profile], api_name=False)
            inputs = [key, script, voice_choices, renamed] if follow_rename else [key, script, voice_choices]
            return event.then(follow_library, inputs, [mapping, voice_choices, renamed], api_name=False)

        draft_inputs = [script, mapping, temperature, topk, seed, max_line_s, pause_ms, mode, takes]
        demo.load(init_key, [saved_key], [key, saved_key], api_name=False).then(  # page set-up: not API endpoints
            restore_draft, [key, drafts], [*draft_inputs, voice_choices], api_name=False, queue=False).then(
            list_profiles, [key], [library, chosen], api_name=False).then(
            profile_choices, [key], [q_profile], api_name=False).then(
            fill_mapping, [key, script, voice_choices], [mapping, voice_choices], api_name=False).then(
            status, [key], [status_md], api_name=False)

        ref_audio.change(clip_checked, [ref_audio], [voice_msg], api_name=False, queue=False, show_progress="hidden")
        library_changed(save_btn.click(add_profile, [key, ref_audio, ref_text, ref_name], [library, chosen, voice_msg],
                                       api_name="add_profile"))
        chosen.change(preview_profile, [key, chosen], [preview], api_name="preview_profile")
        library_changed(rename_btn.click(rename_profile, [key, chosen, new_name], [library, chosen, voice_msg, renamed],
                                         api_name="rename_profile"), follow_rename=True)
        # the box empties at once in the browser, so a Save pressed before the new transcript arrives
        # cannot send the previous profile's text; transcript_for catches the rest
        chosen.change(None, None, [edit_text], js="() => ''", api_name=False, queue=False)
        chosen.change(profile_transcript, [key, chosen], [edit_text, transcript_for], api_name=False)
        edit_btn.click(update_transcript, [key, chosen, edit_text, transcript_for], [library, voice_msg],
                       api_name="update_transcript")
        library.select(pick_row, None, [chosen], api_name=False)
        library_changed(delete_btn.click(delete_profile, [key, chosen, confirm], [library, chosen, voice_msg, confirm],
                                         api_name="delete_profile"))
        export_btn.click(export_profile, [key, chosen], [export_file], api_name="export_profile")
        library_changed(import_btn.click(import_profile, [key, import_file, import_name], [library, chosen, voice_msg],
                                         api_name="import_profile"))
        library_changed(refresh_btn.click(list_profiles, [key], [library, chosen], api_name="list_profiles"))
        for trigger in (script_tab.select, quick_tab.select, script.focus, q_profile.focus):
            library_synced(trigger)

        script.change(fill_mapping, [key, script, voice_choices], [mapping, voice_choices], api_name=False)
        last_result.change(script_follows_edit, [script, last_result, edit_origin], [script, edit_origin],
                           api_name=False, queue=False, show_progress="hidden")
        for block in draft_inputs:
            block.change(save_draft, [key, drafts, *draft_inputs], [drafts], api_name=False, queue=False,
                         show_progress="hidden")
        # Render and Regenerate are off while a render runs (Cancel stays); a refusal turns them back on too
        render_inputs = [key, script, mapping, temperature, topk, seed, max_line_s, pause_ms, mode, takes]
        shown = [render_msg, dialogue, files, manifest, context_view, last_result, bundle, timeline, context_bars]
        assert len(shown) == EDITOR_OUTPUTS  # the per-line actions' no-change updates (line_action)
        render_outputs = [live, *shown[:6], last_voices, render_anyway, *shown[6:]]
        # the per-line editor's handlers, wrapped once here (ZeroGPU registers its GPU functions at start-up),
        # since events made inside gr.render at run time are not wrapped by CheckedBlocks
        editor_actions = {name: _answered_in_place(_gpu(fn) if gpu else fn, shown) for name, fn, gpu in (
            ("rerender_stale", rerender_stale, True), ("edit_line", edit_line, True), ("new_take", new_take, True),
            ("set_pause", set_pause, False), ("choose_take", choose_take, False))}
        render_event = render_btn.click(busy, None, [render_btn, regen_btn, render_anyway, cancel_btn, render_msg],
                                        api_name=False,
                                        queue=False).then(
            _gpu(render_script), [*render_inputs, ask], render_outputs, api_name="render_script",
            concurrency_id="gpu", show_progress_on=[render_msg])
        render_event.then(idle, None, [render_btn, regen_btn, cancel_btn], api_name=False, queue=False)
        anyway_event = render_anyway.click(busy, None, [render_btn, regen_btn, render_anyway, cancel_btn, render_msg],
                                           api_name=False,
                                           queue=False).then(
            _gpu(render_script), [*render_inputs, dont_ask], render_outputs, api_name=False,
            concurrency_id="gpu", show_progress_on=[render_msg])
        anyway_event.then(idle, None, [render_btn, regen_btn, cancel_btn], api_name=False, queue=False)
        cancel_btn.click(cancel_render, None, [render_msg, render_btn, regen_btn, cancel_btn], api_name=False,
                         queue=False, show_progress="hidden")
        regen_btn.click(_gpu(regenerate_line), [key, last_result, last_voices, regen_line, regen_seed],
                        shown, api_name="regenerate_line",
                        concurrency_id="gpu", show_progress_on=[render_msg])
        for name, fn, inputs in (("new_take", api_new_take, [key, last_result, last_voices, api_row]),
                                 ("edit_line", api_edit_line, [key, last_result, last_voices, api_row, api_text]),
                                 ("choose_take", api_choose_take, [key, last_result, api_row, api_take]),
                                 ("set_pause", api_set_pause, [key, last_result, api_row, api_pause]),
                                 ("rerender_stale", rerender_stale, [key, last_result, last_voices])):
            api_buttons[name].click(_gpu(fn), inputs, shown, api_name=name, concurrency_id="gpu")
        project_btn.click(save_project, [key, script, mapping, temperature, topk, seed, max_line_s, pause_ms, mode,
                                         takes, last_result], [project_file], api_name="save_project")
        open_event = open_file.upload(
            open_project, [key, open_file],
            [script, mapping, temperature, topk, seed, max_line_s, pause_ms, mode, render_msg, dialogue,
             files, manifest, context_view, last_result, last_voices, library, chosen, *shown[6:], voice_choices,
             takes], api_name="open_project")
        reopen_btn.click(reopen_last, [key], [script, mapping, temperature, topk, seed, max_line_s, pause_ms, mode,
                                              *shown[:6], last_voices, *shown[6:], voice_choices, takes],
                     api_name="reopen_last")
        library_changed(open_event)
        # While an utterance runs, Speak is off and Stop on (and the other way round after it): a second
        # Speak used to be dropped without a word, and each extra Stop cancelled an event already gone
        # (Gradio answered 500 and logged a KeyError) and wrote "Stopped." over the first Stop's answer.
        q_btn.click(quick_buttons(True), None, [q_btn, q_stop], api_name=False, queue=False, show_progress="hidden")
        say_event = q_btn.click(_gpu(say), [key, q_text, q_profile, q_temp, q_topk, q_seed, q_max],
                                [q_live, q_file, q_msg], api_name="say", concurrency_id="gpu")
        say_event.then(quick_buttons(False), None, [q_btn, q_stop], api_name=False, queue=False, show_progress="hidden")
        q_stop.click(stop_say, None, [q_file, q_msg, q_btn, q_stop], api_name=False, queue=False,
                     show_progress="hidden")
        wm_btn.click(check_watermark, [wm_file], [wm_msg], api_name="check_watermark")
        wm_last_btn.click(check_last, [key], [wm_msg], api_name="check_last_render")
        status_btn.click(status, [key], [status_md], api_name="status")
    return demo


def generation_slots(engine) -> int:
    """How many generation events the page lets run at once (`configure_queue`). Events made later,
    inside `gr.render` (the per-line editor's buttons), must be given it too: Gradio lowers a
    concurrency group's limit to that of any event of the group it meets, so one with the default
    limit (1) made every generation of every visitor run one at a time from then on."""
    sched = engine.scheduler
    return sched.max_rows + sched.max_waiting if sched is not None else 1


def configure_queue(demo, engine) -> int:
    """Gradio's queue as the engine can serve it; returns how many generation events may run at once.

    With a scheduler (`Engine.serve`) every render, line action and Quick call is a request to one
    batching frame loop, so the page lets as many run as it has rows plus places to wait, and the
    scheduler queues, shares and refuses them (with the place shown). Without one (ZeroGPU, where the
    GPU exists only inside each decorated call, or `--max-batch 0`) they run one at a time."""
    slots = generation_slots(engine)
    for block_fn in demo.fns.values():
        if block_fn.concurrency_id == "gpu":
            block_fn.concurrency_limit = slots
    demo.queue(default_concurrency_limit=1, max_size=max(64, slots))
    return slots


def main(argv: list[str] | None = None) -> int:
    """`python app.py` / `csm-multi-app`: serve the app. A start-up error (no hub access, a bad flag or
    environment variable, a taken port) is one line on stderr and exit code 2; --debug adds the traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if "--debug" in argv:  # before parsing: the flags' defaults read the environment and can fail too
        logging.getLogger("csm_multi").setLevel(logging.DEBUG)
    try:
        serve(argv)
    except (CsmError, ValueError, OSError) as e:
        log.debug("start-up failed", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def serve(argv: list[str]) -> None:
    """Parse the flags (defaults: the environment, csm_multi/settings.py), build the studio, launch."""
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    engine_flags(p)
    p.add_argument("--debug", action="store_true", help="on a start-up error, also print its traceback")
    p.add_argument("--host", default=setting("host"), help="use 0.0.0.0 to serve your network (env CSM_HOST)")
    p.add_argument("--port", type=int, default=setting("port"), help="(env CSM_PORT)")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link (ignored on Spaces)")
    p.add_argument("--profiles-dir", default=str(setting("profiles_dir")),
                   help="where voice libraries live (env CSM_PROFILES_DIR; mount persistent storage here on Spaces)")
    p.add_argument("--shared-library", action="store_true", default=setting("shared_library"),
                   help="one voice library for every visitor (default: each browser gets its own; the command "
                        "line's default library is this one; env CSM_SHARED_LIBRARY=1)")
    p.add_argument("--asr-model", default=setting("asr_model") or ASR_MODEL,
                   help="Whisper model (hub id or local folder) that transcribes a clip saved with an empty "
                        "transcript; 'none' turns it off (env CSM_ASR_MODEL)")
    p.add_argument("--libraries-in-memory", type=int, default=setting("libraries_in_memory"),
                   help="visitor libraries kept open (LRU; env CSM_LIBRARIES_IN_MEMORY)")
    p.add_argument("--max-voices-per-library", type=int, default=setting("max_voices_per_library"),
                   help="voices one library may hold; 0: no cap (env CSM_MAX_VOICES_PER_LIBRARY)")
    p.add_argument("--storage-quota-mb", type=int, default=setting("storage_quota_mb"),
                   help="disk all voice libraries together may take, in MB; 0: no quota (env CSM_STORAGE_QUOTA_MB)")
    p.add_argument("--library-idle-days", type=int, default=setting("library_idle_days"),
                   help="delete a visitor library untouched this many days (never the shared one); 0: keep "
                        "them (env CSM_LIBRARY_IDLE_DAYS)")
    p.add_argument("--max-batch", type=int, default=setting("max_batch"),
                   help="requests generated together in one batch (continuous batching; 0: one at a time, "
                        "as on ZeroGPU; env CSM_MAX_BATCH)")
    p.add_argument("--max-waiting", type=int, default=setting("max_waiting"),
                   help="requests that may wait for a row before visitors get a busy answer (env CSM_MAX_WAITING)")
    p.add_argument("--per-visitor", type=int, default=setting("per_visitor"),
                   help="rows one visitor may hold while others wait (env CSM_PER_VISITOR)")
    args = p.parse_args(argv)
    for flag, least in (("max_batch", 0), ("max_waiting", 0), ("per_visitor", 1), ("prefix_cache_mb", 0)):
        if getattr(args, flag) < least:
            raise ValueError(f"--{flag.replace('_', '-')} must be a whole number >= {least}")
    release_torch_scratch()  # so a killed server leaves no torch folder in the temp dir
    if env("SPACE_ID"):
        ensure_nodeps_packages()
    engine = build_engine(args.model, checkpoint=args.checkpoint, device=args.device, watermark=not args.no_watermark,
                          tokenizer_repo=args.tokenizer_repo, trust_tokenizer=args.trust_tokenizer,
                          quantize=args.quantize, prefix_cache_mb=args.prefix_cache_mb)
    # On ZeroGPU the GPU exists only inside spaces.GPU calls, and saving a voice is not one: ASR on CPU.
    asr_device = "cpu" if zero_gpu() else engine.device
    transcriber = build_transcriber(args.asr_model, device=asr_device)  # loads on first use
    why = transcriber and whisper_unavailable(args.asr_model)
    if why:  # the page says at once that transcripts must be typed; the fix is the operator's
        log.warning("automatic transcripts are off: %s; %s", why, ASR_HINT)
        transcriber = None
    studio = Studio(engine, args.profiles_dir, shared_library=args.shared_library,
                    limits=StudioLimits(libraries_in_memory=args.libraries_in_memory,
                                        voices_per_library=args.max_voices_per_library,
                                        storage_quota_bytes=args.storage_quota_mb * 10**6,
                                        library_idle_days=args.library_idle_days), transcriber=transcriber)
    if args.max_batch > 0 and not zero_gpu():  # ZeroGPU: see configure_queue
        engine.serve(max_rows=args.max_batch, max_waiting=args.max_waiting, per_visitor=args.per_visitor,
                     on_step=studio.memory.step,
                     row_budget=lambda active: studio.memory.rows_allowed(active, args.max_batch))
    demo = build_demo(studio)
    slots = configure_queue(demo, engine)
    # /v1/...: the OpenAI-compatible speech API, made with the server's app (so it answers from the first
    # request) and ahead of Gradio's routes. Not on ZeroGPU, which lends a GPU only to the page's decorated
    # calls: there /v1 says so (503) instead of failing on a missing GPU.
    from csm_multi.openai_api import openai_routes

    api = openai_routes(studio, unavailable=ZERO_GPU_NO_API if zero_gpu() else None)
    if not zero_gpu():
        log.info("OpenAI-compatible speech API at http://%s:%s/v1/audio/speech", args.host, args.port)
    start_sweeper()  # the temp folders of killed torch processes: now, then hourly
    omp.release()  # the main thread only serves from here: no idle OpenMP pool of its own (csm_multi/omp.py)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share and not env("SPACE_ID"), css=PAGE_CSS, head=PAGE_HEAD,
                max_file_size=MAX_UPLOAD, blocked_paths=[str(studio.profiles_root)],
                allowed_paths=[str(studio.outputs_root)], max_threads=slots + 40, app_kwargs={"routes": api})


if __name__ == "__main__":
    raise SystemExit(main())
