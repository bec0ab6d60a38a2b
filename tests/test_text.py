"""Text tokenization: the reference's BOS ... EOS post-processor and the offline byte tokenizer."""

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from csm_multi.text import LLAMA3_BOS_ID, LLAMA3_EOS_ID, ByteTokenizer, HFTextTokenizer, add_bos_eos


def _llama_like():
    """A small fast tokenizer with Llama 3's special-token names; its own template adds only BOS."""
    vocab = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "[0]hello": 2, "world": 3, "[UNK]": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   unk_token="[UNK]")
    return fast


def test_post_processor_wraps_text_in_bos_and_eos():
    fast = _llama_like()
    assert fast.encode("[0]hello world") == [2, 3]  # no template yet
    add_bos_eos(fast)
    tok = HFTextTokenizer(fast, "test")
    assert tok.encode("[0]hello world") == [0, 2, 3, 1]
    assert tok.encode("") == [0, 1]


def test_byte_tokenizer_matches_llama3_special_ids():
    ids = ByteTokenizer().encode("[1]Hé")
    assert ids[0] == LLAMA3_BOS_ID == 128000 and ids[-1] == LLAMA3_EOS_ID == 128001
    assert ids[1:-1] == list("[1]Hé".encode("utf-8"))
    assert all(0 <= i < 128_256 for i in ids)
