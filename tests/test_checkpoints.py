"""Checkpoints in every supported layout load into identical weights; bad ones fail clearly."""

import json

import pytest
import torch

from csm_multi.checkpoints import TRANSFORMERS, detect_layout, read_state_dict, save_original, to_ours
from csm_multi.errors import CheckpointFormatError, WeightsUnavailableError
from csm_multi.hf_compat import hf_model
from csm_multi.loaders import load_csm, resolve_checkpoint


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_original_safetensors_layout_loads(tmp_path, tiny_model, tiny_config):
    path = save_original(tiny_model.state_dict(), tiny_config, tmp_path)
    assert path.name == "model.safetensors"
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["audio_num_codebooks"] == 32 and cfg["audio_vocab_size"] == 2051 and "backbone_flavor" in cfg
    assert resolve_checkpoint(str(tmp_path)) == path
    _same_weights(load_csm(tmp_path / "model.safetensors", tiny_config), tiny_model)


def test_original_torch_file_layout_loads(tmp_path, tiny_model, tiny_config):
    path = save_original(tiny_model.state_dict(), tiny_config, tmp_path, torch_file=True)
    assert path.name == "ckpt.pt"
    _same_weights(load_csm(resolve_checkpoint(str(tmp_path)), tiny_config), tiny_model)


def test_transformers_layout_loads(tmp_path, tiny_model, tiny_config):
    """Written by transformers' own save_pretrained: the exact layout of the hub's converted model."""
    hf = hf_model(tiny_model.state_dict(), tiny_config, small_codec=True)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "csm"
    state = read_state_dict(tmp_path / "model.safetensors")
    assert detect_layout(state) == TRANSFORMERS
    assert any(k.startswith("codec_model.") for k in state)
    # q/k are stored permuted for rotate-half RoPE: the raw tensor differs from ours ...
    raw_q = next(v for k, v in state.items() if k.endswith("layers.0.self_attn.q_proj.weight") and "backbone" in k)
    assert not torch.equal(raw_q, tiny_model.state_dict()["backbone.layers.0.attn.q_proj.weight"])
    # ... and loading undoes it exactly.
    _same_weights(load_csm(resolve_checkpoint(str(tmp_path)), tiny_config), tiny_model)


def test_transformers_conversion_is_inverse(tiny_model, tiny_config):
    from csm_multi.checkpoints import to_transformers

    ours = tiny_model.state_dict()
    back = to_ours(to_transformers(ours, tiny_config), tiny_config)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_wrong_preset_shapes_fail_clearly(tmp_path, tiny_model, tiny_config):
    from csm_multi.config import get_preset

    save_original(tiny_model.state_dict(), tiny_config, tmp_path)
    with pytest.raises(CheckpointFormatError, match="does not fit the 'csm-1b'"):
        load_csm(tmp_path / "model.safetensors", get_preset("csm-1b"))


def test_garbage_and_foreign_files_fail_clearly(tmp_path, tiny_config):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="could not read"):
        load_csm(bad, tiny_config)
    foreign = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointFormatError, match="unrecognised checkpoint"):
        load_csm(foreign, tiny_config)


def test_missing_local_checkpoint(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="holds none"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope.safetensors"))


def test_hub_unreachable_names_the_fix(monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError) as e:
        resolve_checkpoint("sesame/csm-1b", local_only=True)
    assert "--model tiny" in str(e.value) and "network" in str(e.value)
