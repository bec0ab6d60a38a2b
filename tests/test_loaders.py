"""The composition root: presets, offline fallback, checkpoints, clear errors."""

import pytest
import torch

from csm_multi import SamplingConfig, build_engine
from csm_multi import loaders
from csm_multi.checkpoints import save_original
from csm_multi.errors import WeightsUnavailableError
from csm_multi.frames import text_frames


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(loaders, "hub_reachable", lambda timeout=3.0: False)


def test_tiny_engine_says_it_is_untrained_and_generates():
    engine = build_engine("tiny", watermark=False)
    assert engine.info.untrained and "RANDOM" in engine.info.notes[0]
    assert engine.info.watermark == "OFF" and engine.watermarker is None
    assert engine.codec_id == "mimi-random-0-k32"
    utt = engine.generate("Hello.", 0, sampling=SamplingConfig(seed=1, max_audio_length_ms=240))
    assert utt.codes.shape[0] == 32 and not utt.watermarked


def test_csm_1b_random_has_csm_1b_sizes_and_says_it_is_a_benchmark(monkeypatch, caplog):
    """`--model csm-1b-random` builds csm-1b's preset with random weights offline (here the preset is
    swapped for tiny's after it is asked for, so the test stays small) and says its output is noise."""
    from csm_multi.config import get_preset

    asked = []
    monkeypatch.setattr(loaders, "get_preset", lambda name: asked.append(name) or get_preset("tiny"))
    engine = build_engine("csm-1b-random", watermark=False)
    assert asked == ["csm-1b"]
    assert engine.info.untrained and "OFFLINE BENCHMARK" in engine.info.notes[0] and "noise" in engine.info.notes[0]
    assert engine.info.model == "csm-1b size, random weights (offline benchmark)" and "OFFLINE BENCHMARK" in caplog.text
    utt = engine.generate("Hello.", 0, sampling=SamplingConfig(seed=1, max_audio_length_ms=240))
    assert utt.codes.shape[0] == 32


def test_auto_falls_back_to_tiny_offline(caplog):
    engine = build_engine("auto", watermark=False)
    assert engine.info.untrained
    assert "falling back" in caplog.text and "tiny" in caplog.text


def test_real_model_offline_is_a_clear_error():
    with pytest.raises(WeightsUnavailableError) as e:
        build_engine("csm-1b", watermark=False)
    assert "--model tiny" in str(e.value)


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'csm-7b' \(--model, CSM_MODEL\); use auto, csm-1b, tiny, csm-1b-random"):
        build_engine("csm-7b")


def test_tiny_checkpoint_is_loaded_instead_of_random(tmp_path, tiny_model, tiny_config):
    save_original(tiny_model.state_dict(), tiny_config, tmp_path)
    engine = build_engine("tiny", checkpoint=str(tmp_path), watermark=False)
    assert engine.model.fused  # CPU engines run fused layers, so compare what the weights compute
    tokens, mask = text_frames([128000, *b"[0]Hi.", 128001], tiny_config.audio_num_codebooks)
    pos = torch.arange(tokens.size(0))[None]
    with torch.inference_mode():
        outs = []
        for model in (tiny_model, engine.model):
            model.setup_caches(1)
            model.reset_caches()
            outs.append(model.codebook0_head(model.backbone_step(tokens[None], mask[None], pos)))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(engine.model.audio_head, tiny_model.audio_head)


def test_tiny_engine_with_random_watermarker_marks_output():
    engine = build_engine("tiny")
    assert engine.watermarker is not None and engine.info.watermark.startswith("on")
    utt = engine.generate("Hello.", 0, sampling=SamplingConfig(seed=1, max_audio_length_ms=2000))
    assert utt.watermarked
    plain = build_engine("tiny", watermark=False).generate("Hello.", 0, sampling=SamplingConfig(seed=1, max_audio_length_ms=2000))
    assert torch.equal(utt.codes, plain.codes)
    assert utt.audio.shape == plain.audio.shape and not torch.equal(utt.audio, plain.audio)


def test_studio_watermark_check_runs_with_the_deployment_key(tmp_path):
    import soundfile as sf

    from csm_multi.studio import Studio

    engine = build_engine("tiny")
    utt = engine.generate("Hello.", 0, sampling=SamplingConfig(seed=2, max_audio_length_ms=1600))
    path = tmp_path / "marked.wav"
    sf.write(str(path), utt.audio.numpy(), 24_000)
    found = Studio(engine, tmp_path / "profiles", outputs_root=tmp_path / "out").check_watermark(path)
    assert set(found) >= {"watermarked", "matches_key", "message"}
    assert isinstance(found["matches_key"], bool)
    assert found["matches_key"] == (found["watermarked"] and found["message"] == list(engine.watermarker.key))


@pytest.mark.parametrize("error, expect", [
    ("GatedRepoError", "accept its licence"),
    ("RepositoryNotFoundError", "check the repo id and HF_TOKEN"),
    ("RemoteEntryNotFoundError", "has no file"),
    ("LocalEntryNotFoundError", "--model tiny"),
])
def test_hub_failures_name_the_fix(monkeypatch, error, expect):
    import httpx
    import huggingface_hub
    from huggingface_hub import errors

    response = httpx.Response(401, request=httpx.Request("GET", "https://huggingface.co/sesame/csm-1b"))
    cls = getattr(errors, error)
    exc = cls("refused") if error == "LocalEntryNotFoundError" else cls("refused", response=response)

    def fake_download(*args, **kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(WeightsUnavailableError, match=expect):
        loaders.hub_file("sesame/csm-1b", "model.safetensors", token="hf_x")
