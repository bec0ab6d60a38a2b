"""Automatic transcripts: a tiny random Whisper saved like a hub model and loaded by the product
code, the clear errors when no model can be loaded, and the profile paths (core, CLI, app) with a
fake transcriber."""

from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from csm_multi import loaders
from csm_multi.errors import ProfileError, TranscriptionError
from csm_multi.profiles import ProfileStore
from csm_multi.studio import Studio, create_profile
from csm_multi.transcribe import Transcriber

SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    """A 1-layer Whisper with a 261-token byte-level vocabulary, saved with its processor."""
    from tokenizers import pre_tokenizers
    from transformers import (WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor, WhisperTokenizer)

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[], additional_special_tokens=SPECIALS[1:])
    eos, start = tokenizer.convert_tokens_to_ids(SPECIALS[:2])
    specials = tokenizer.convert_tokens_to_ids(SPECIALS)
    config = WhisperConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, max_target_positions=64, decoder_start_token_id=start,
                           eos_token_id=eos, pad_token_id=eos, bos_token_id=eos,
                           suppress_tokens=specials, begin_suppress_tokens=None)  # text bytes only: never empty
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("whisper")
    WhisperForConditionalGeneration(config).save_pretrained(folder)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(loaders, "hub_reachable", lambda timeout=3.0: False)


def _speechlike(seconds=2.0, sr=24_000, freq=220):
    t = np.arange(int(sr * seconds)) / sr
    return (0.2 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def _wav(path, seconds=2.0):
    sf.write(str(path), _speechlike(seconds), 24_000)
    return path


class FakeTranscriber:
    name = "fake-whisper"

    def __init__(self, text="hello there"):
        self.text, self.heard = text, []

    def __call__(self, audio):
        self.heard.append(audio)
        if isinstance(self.text, Exception):
            raise self.text
        return self.text


# ---- the module, with a real (tiny) Whisper ---------------------------------------------------
def test_tiny_whisper_loads_lazily_once_and_transcribes(tiny_whisper, monkeypatch):
    loads = []
    real = loaders.load_whisper
    monkeypatch.setattr(loaders, "load_whisper", lambda *a, **k: loads.append(a) or real(*a, **k))
    transcriber = loaders.build_transcriber(tiny_whisper, device="cpu")
    assert transcriber.name == tiny_whisper and not transcriber.loaded and loads == []  # building loads nothing
    transcriber.max_new_tokens = 6
    audio = torch.from_numpy(_speechlike())
    first, second = transcriber(audio), transcriber(audio)
    assert len(loads) == 1 and transcriber.loaded
    assert loads[0][1:3] == (torch.device("cpu"), torch.float32)  # device and dtype follow the engine's rule
    assert isinstance(first, str) and 0 < len(first) <= 6 * 2 and first == first.strip()
    assert second == first  # greedy decoding: the same clip gives the same text


def test_audio_is_resampled_to_16k_and_silence_is_an_error():
    seen = {}

    class Processor:
        def __call__(self, speech, sampling_rate, return_tensors):
            seen["samples"], seen["rate"] = len(speech), sampling_rate
            return type("Features", (), {"input_features": torch.zeros(1, 80, 3000)})()

        def batch_decode(self, ids, skip_special_tokens):
            return ["  \n "]

    class Model:
        device, dtype = torch.device("cpu"), torch.float32

        def generate(self, features, **kwargs):
            seen.update(kwargs)
            return torch.zeros(1, 3, dtype=torch.long)

    transcriber = Transcriber("fake", lambda: (Model(), Processor()), max_new_tokens=7)
    with pytest.raises(TranscriptionError, match="heard no words.*type what it says"):
        transcriber(torch.from_numpy(_speechlike(seconds=3.0)))
    assert seen["rate"] == 16_000 and seen["samples"] == 48_000  # 3 s at 24 kHz -> 3 s at 16 kHz
    assert seen["max_new_tokens"] == 7 and seen["do_sample"] is False


def test_an_unloadable_model_is_a_clear_error_and_is_retried(offline, tmp_path):
    transcriber = loaders.build_transcriber("nobody/no-such-whisper", device="cpu")
    for _ in range(2):  # a failed load is not cached: the next call tries again
        with pytest.raises(TranscriptionError) as e:
            transcriber(torch.from_numpy(_speechlike()))
        message = str(e.value)
        assert "could not load the speech recognition model nobody/no-such-whisper" in message
        assert "not in the local cache" in message and "Type what the clip says" in message
        assert not transcriber.loaded
    (tmp_path / "not-whisper").mkdir()
    with pytest.raises(TranscriptionError, match="not-whisper .*Type what the clip says"):
        loaders.build_transcriber(str(tmp_path / "not-whisper"), device="cpu")(torch.from_numpy(_speechlike()))


@pytest.mark.parametrize("source", [None, "", "none", "OFF", " off "])
def test_asr_can_be_turned_off(source):
    assert loaders.build_transcriber(source) is None


# ---- profiles: the core ---------------------------------------------------------------------
def test_empty_transcript_is_written_by_the_transcriber(tmp_path):
    store, fake = ProfileStore(tmp_path / "p"), FakeTranscriber()
    profile, transcribed = create_profile(store, "Alice", _wav(tmp_path / "a.wav"), "  ", fake)
    assert transcribed and profile.transcript == "hello there"
    assert store.get("Alice").transcript == "hello there"
    (heard,) = fake.heard  # the trimmed clip the profile keeps, at 24 kHz
    assert heard.ndim == 1 and heard.numel() == store.audio("Alice").numel()


def test_a_typed_transcript_is_kept_and_a_bad_name_fails_before_transcribing(tmp_path):
    store, fake = ProfileStore(tmp_path / "p"), FakeTranscriber()
    profile, transcribed = create_profile(store, "Bob", _wav(tmp_path / "b.wav"), "good day", fake)
    assert not transcribed and profile.transcript == "good day"
    with pytest.raises(ProfileError, match="not a valid profile name"):
        create_profile(store, "../x", _wav(tmp_path / "c.wav"), "", fake)
    assert fake.heard == []


def test_no_transcriber_or_a_failing_one_saves_nothing(tmp_path):
    store = ProfileStore(tmp_path / "p")
    with pytest.raises(ProfileError, match="type what the clip says"):
        create_profile(store, "Alice", _wav(tmp_path / "a.wav"), "", None)
    failing = FakeTranscriber(TranscriptionError("could not load the speech recognition model x"))
    with pytest.raises(TranscriptionError):
        create_profile(store, "Alice", _wav(tmp_path / "a.wav"), "", failing)
    assert store.list() == []


def test_studio_uses_its_transcriber(tmp_path):
    engine = SimpleNamespace(device=torch.device("cpu"))  # profiles need no model
    studio = Studio(engine, tmp_path / "p", outputs_root=tmp_path / "o", transcriber=FakeTranscriber())
    key = "visitor-asr-0001"
    profile, transcribed = studio.add_profile(key, "Alice", _wav(tmp_path / "a.wav"), "")
    assert transcribed and studio.profile_rows(key)[0][2] == "hello there"


# ---- the CLI --------------------------------------------------------------------------------
def test_cli_profiles_add_without_transcript(tmp_path, monkeypatch, capsys):
    from csm_multi.cli import main

    built = []
    monkeypatch.setattr(loaders, "build_transcriber", lambda source: built.append(source) or FakeTranscriber())
    store = str(tmp_path / "voices")
    assert main(["profiles", "--profiles-dir", store, "add", "Alice", str(_wav(tmp_path / "a.wav")),
                 "--asr-model", "./my-whisper"]) == 0
    out = capsys.readouterr().out
    assert built == ["./my-whisper"] and "transcribed automatically with fake-whisper: 'hello there'" in out
    assert "profiles transcript Alice" in out and ProfileStore(store).get("Alice").transcript == "hello there"


def test_cli_profiles_add_with_asr_off_asks_for_the_transcript(tmp_path, capsys):
    from csm_multi.cli import main

    assert main(["profiles", "--profiles-dir", str(tmp_path), "add", "Alice", str(_wav(tmp_path / "a.wav")),
                 "--asr-model", "none"]) == 2
    assert "type what the clip says" in capsys.readouterr().err


# ---- the app --------------------------------------------------------------------------------
def test_app_saves_the_transcribed_text_and_says_so(running_app, tmp_path):
    from gradio_client import Client, handle_file

    url, studio = running_app
    client = Client(url, verbose=False)
    key = "visitor-asr-5678"
    clip = handle_file(str(_wav(tmp_path / "a.wav")))
    with pytest.raises(Exception, match="type what the clip says"):  # the fixture's studio has no transcriber
        client.predict(key, clip, "", "Alice", api_name="/add_profile")
    studio.transcriber = FakeTranscriber(TranscriptionError("could not load the speech recognition model x"))
    with pytest.raises(Exception, match="could not load the speech recognition model"):
        client.predict(key, clip, "", "Alice", api_name="/add_profile")
    assert client.predict(key, api_name="/list_profiles")[0]["data"] == []
    studio.transcriber = FakeTranscriber()
    try:
        table, _, msg = client.predict(key, clip, "", "Alice", api_name="/add_profile")
    finally:
        studio.transcriber = None
    assert table["data"][0][:1] == ["Alice"] and table["data"][0][2] == "hello there"
    assert "written automatically" in msg and "hello there" in msg


def test_app_transcript_placeholder_follows_the_configuration(tmp_path):
    import gradio as gr

    import app as app_module

    def placeholder(transcriber):
        studio = Studio(SimpleNamespace(device=torch.device("cpu")), tmp_path / "p", outputs_root=tmp_path / "o",
                        transcriber=transcriber)
        studio.status = lambda key: {"model": "m", "device": "cpu", "dtype": "f32", "tokenizer": "t", "codec": "c",
                                     "watermark": "OFF", "library": "x", "memory": {}}
        demo = app_module.build_demo(studio)
        (box,) = [b for b in demo.blocks.values() if isinstance(b, gr.Textbox) and b.label.startswith("Transcript (")]
        return box.placeholder

    assert placeholder(FakeTranscriber()) == "leave empty to have it transcribed automatically"
    assert "type what the clip says" in placeholder(None) and "not available on this server" in placeholder(None)


@pytest.mark.parametrize("space", [False, True])
def test_app_runs_speech_recognition_on_cpu_on_zerogpu(space, tmp_path, monkeypatch, running_app):
    """On a Space with `spaces` (ZeroGPU) the GPU is only there inside spaces.GPU calls, and saving a
    voice is not one; elsewhere the transcriber follows the engine's device."""
    import importlib.machinery
    import sys
    import types

    import gradio as gr

    import app as app_module

    _, studio = running_app
    engine = SimpleNamespace(**{**vars(studio.engine), "device": torch.device("meta")})  # stands for "cuda"
    monkeypatch.setattr(app_module, "build_engine", lambda *a, **k: engine)
    monkeypatch.setattr(app_module, "Studio", lambda *a, **k: studio)
    asked = {}
    monkeypatch.setattr(app_module, "build_transcriber", lambda source, device=None, **k: asked.update(device=device))
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: None)
    if space:
        fake = types.ModuleType("spaces")
        fake.__spec__ = importlib.machinery.ModuleSpec("spaces", None)
        fake.GPU = lambda duration=None: (lambda fn: fn)
        monkeypatch.setitem(sys.modules, "spaces", fake)
        monkeypatch.setenv("SPACE_ID", "someone/csm-multi")
    else:
        monkeypatch.delenv("SPACE_ID", raising=False)
    # --max-batch 0: the stand-in engine has no scheduler to start (what is tested is the transcriber's device)
    app_module.main(["--model", "tiny", "--profiles-dir", str(tmp_path / "voices"), "--max-batch", "0"])
    assert str(asked["device"]) == ("cpu" if space else "meta")


# ---- knowing at start-up whether automatic transcripts work ----------------------------------------
def test_whisper_availability_is_known_without_loading_it(offline, tmp_path):
    assert "not in the local cache" in loaders.whisper_unavailable("nobody/no-such-whisper")
    folder = tmp_path / "whisper"
    folder.mkdir()
    assert "no config.json" in loaders.whisper_unavailable(str(folder))
    (folder / "config.json").write_text("{}")
    assert loaders.whisper_unavailable(str(folder)) is None


def test_the_app_knows_at_start_that_transcripts_must_be_typed(offline, tmp_path, monkeypatch, caplog):
    """An unloadable speech recogniser is found at start-up: the studio gets none (the page asks for typed
    transcripts from the start), and the flags to change it go to the log, never to the page."""
    import app as app_module
    from csm_multi import CsmError

    given = {}

    def stop(*args, transcriber=None, **kwargs):
        given["transcriber"] = transcriber
        raise CsmError("stopped by the test")

    monkeypatch.setattr(app_module, "build_engine", lambda model, **kw: type("E", (), {"device": "cpu"})())
    monkeypatch.setattr(app_module, "Studio", stop)
    with caplog.at_level("WARNING"):
        assert app_module.main(["--asr-model", "nobody/no-such-whisper"]) == 2
    assert given["transcriber"] is None
    assert "automatic transcripts are off" in caplog.text and "--asr-model" in caplog.text


def test_a_failed_load_tells_the_page_what_to_do_and_the_operator_how_to_fix_it(running_app, tmp_path, caplog):
    from gradio_client import Client, handle_file

    url, studio = running_app
    saved = studio.transcriber
    studio.transcriber = FakeTranscriber(TranscriptionError("could not load the speech recognition model x. Type "
                                                            "what the clip says as its transcript.", loaders.ASR_HINT))
    try:
        with caplog.at_level("WARNING"), pytest.raises(Exception) as e:
            Client(url, verbose=False).predict("visitor-asr-9999", handle_file(str(_wav(tmp_path / "a.wav"))), "",
                                               "Alice", api_name="/add_profile")
    finally:
        studio.transcriber = saved
    assert "Type what the clip says" in str(e.value) and "--asr-model" not in str(e.value)
    assert "--asr-model" in caplog.text
