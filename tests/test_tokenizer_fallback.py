"""The gated Llama 3.2 tokenizer, a configured copy as fallback, and the id check that guards it.

Small byte-level BPE tokenizers stand in for the real ones: "primary", an exact copy, and one
trained on other text; all saved as transformers tokenizer folders and loaded by the product code.
"""

import logging
import shutil

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from csm_multi import loaders
from csm_multi.errors import WeightsUnavailableError
from csm_multi.text import LLAMA3_BOS_ID, LLAMA3_EOS_ID, LLAMA3_PROBES, probe_ids, verify_tokenizer

PRIMARY = "meta-llama/Llama-3.2-1B"


def _save_bpe(folder, sentences):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sentences * 3, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                            eos_token="<|end_of_text|>").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    primary = _save_bpe(root / "primary", ["This is a test sentence.", "Hello world! This is a response."])
    copy = str(shutil.copytree(primary, root / "mirror"))
    other = _save_bpe(root / "other", ["Completely different words here.", "Grabbed the llama."])
    return primary, copy, other


@pytest.fixture
def primary_gated(monkeypatch):
    """The hub refuses the primary repo, as it does without an accepted licence."""
    real = loaders.hub_file

    def hub_file(repo, filename, *args, **kwargs):
        if repo == PRIMARY:
            raise WeightsUnavailableError(f"{repo} is gated: accept its licence")
        return real(repo, filename, *args, **kwargs)

    monkeypatch.setattr(loaders, "hub_file", hub_file)


def _expected(folder):
    """The primary's ids on the probe strings: what the built-in table is for the real tokenizer."""
    return probe_ids(loaders.load_text_tokenizer(folder))


def test_an_exact_copy_passes_verification(folders):
    primary, copy, _ = folders
    verify_tokenizer(loaders.load_text_tokenizer(copy), copy, _expected(primary))


def test_a_different_tokenizer_is_refused_naming_repo_and_first_differing_probe(folders):
    primary, _, other = folders
    expected, got = _expected(primary), probe_ids(loaders.load_text_tokenizer(other))
    first = next(text for text in LLAMA3_PROBES if expected[text] != got[text])
    with pytest.raises(WeightsUnavailableError) as e:
        verify_tokenizer(loaders.load_text_tokenizer(other), other, expected)
    message = str(e.value)
    assert other in message and repr(first) in message and str(list(got[first])) in message
    assert "--tokenizer-repo" in message and "--trust-tokenizer" in message


def test_the_primary_is_used_when_it_loads(folders, tmp_path):
    primary, _, _ = folders
    tok = loaders.load_text_tokenizer(primary, fallback=str(tmp_path / "never-read"))
    assert tok.name == primary


def test_the_checked_fallback_is_used_when_the_primary_is_gated(folders, primary_gated, caplog):
    primary, copy, _ = folders
    expected = _expected(primary)
    with caplog.at_level(logging.INFO, logger="csm_multi"):
        tok = loaders.load_text_tokenizer(PRIMARY, fallback=copy, expected=expected)
    assert tok.name == f"{copy} (checked copy of {PRIMARY})"
    assert probe_ids(tok) == expected
    assert f"tokenizer {PRIMARY} is unavailable" in caplog.text and "gated" in caplog.text
    assert f"trying the configured copy {copy}" in caplog.text and "probe strings exactly like" in caplog.text


def test_a_mismatching_fallback_is_refused_unless_trusted(folders, primary_gated, caplog):
    primary, _, other = folders
    expected = _expected(primary)
    with pytest.raises(WeightsUnavailableError, match=f"the tokenizer from {other} is not the tokenizer of {PRIMARY}"):
        loaders.load_text_tokenizer(PRIMARY, fallback=other, expected=expected)
    tok = loaders.load_text_tokenizer(PRIMARY, fallback=other, expected=expected, trust=True)
    assert tok.name == f"{other} (unchecked copy of {PRIMARY})" and "UNCHECKED" in caplog.text


def test_by_default_the_fallback_must_match_the_published_llama3_ids(folders, primary_gated):
    _, copy, _ = folders  # a BPE of 300 tokens cannot give Llama 3's ids
    with pytest.raises(WeightsUnavailableError, match=r"encodes 'This is a test sentence\.' as \[0, "):
        loaders.load_text_tokenizer(PRIMARY, fallback=copy)


def test_without_a_fallback_the_error_points_to_tokenizer_repo(primary_gated):
    with pytest.raises(WeightsUnavailableError, match="gated.*set --tokenizer-repo"):
        loaders.load_text_tokenizer(PRIMARY)


def test_when_both_fail_the_error_names_both(primary_gated, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsUnavailableError) as e:
        loaders.load_text_tokenizer(PRIMARY, fallback=str(tmp_path / "empty"))
    assert PRIMARY in str(e.value) and "holds no tokenizer.json" in str(e.value)


def test_the_built_in_table_is_llama3_ids_with_the_reference_bos_eos():
    assert len(LLAMA3_PROBES) >= 5
    for ids in LLAMA3_PROBES.values():
        assert ids[0] == LLAMA3_BOS_ID and ids[-1] == LLAMA3_EOS_ID
        assert all(0 <= i < 128_000 for i in ids[1:-1])  # ordinary text never encodes to special ids
    # Meta's own test (meta-llama/llama3, llama/test_tokenizer.py), verbatim
    assert LLAMA3_PROBES["This is a test sentence."] == (128000, 2028, 374, 264, 1296, 11914, 13, 128001)


def test_cli_passes_the_tokenizer_flags_to_build_engine(monkeypatch, capsys):
    from types import SimpleNamespace

    from csm_multi.cli import main

    seen = {}

    def fake_build_engine(model, **kwargs):
        seen.update(kwargs)
        return SimpleNamespace(info=SimpleNamespace(model=model))

    monkeypatch.setattr(loaders, "build_engine", fake_build_engine)
    monkeypatch.setenv("CSM_TOKENIZER_REPO", "unsloth/Llama-3.2-1B")
    assert main(["info", "--model", "tiny"]) == 0
    assert seen["tokenizer_repo"] == "unsloth/Llama-3.2-1B" and seen["trust_tokenizer"] is False
    assert main(["info", "--tokenizer-repo", "./tok", "--trust-tokenizer"]) == 0
    assert seen["tokenizer_repo"] == "./tok" and seen["trust_tokenizer"] is True
