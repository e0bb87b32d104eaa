"""data.Tokenizer against SentencePiece itself, transformers and mistral-common, on Mistral's real models."""
import os
import shutil

import pytest
import sentencepiece as spm

from data import DataError, Tokenizer, rating_token_ids

TEXTS = ["", "Hello world", "4", " 4", "Rating: 4\nExplanation: fine.", "naïve café — 日本語 🤖 ½",
         "  two  spaces ", "12345 3.14 0.5%", "\n\nHuman: hi\n\nAssistant: yo", "a\tb", "Ünïcödé",
         " leading", "trailing ", "x\n\n\ny", "<s> </s> [INST]", "Ｆｕｌｌｗｉｄｔｈ", "\u200b zero width",
         "The quick brown fox jumps over the lazy dog; internationalization!"]


def hf_tokenizer(model_file):
    """transformers' Llama tokenizer built from the same SentencePiece file.

    transformers 5 reads .model files through protobuf, which the dev extra does not install, so the
    vocabulary and the BPE merges (ordered by piece score, as SentencePiece applies them) are taken
    from the file with sentencepiece and given to LlamaTokenizer directly. Its default Metaspace
    pre-tokenizer drops a leading space that SentencePiece keeps (' 4' -> ['▁', '4'], not ['▁▁', '4']);
    the normalizer that Mistral's and Llama's own tokenizer.json files use (prepend '▁', spaces to
    '▁', no pre-tokenizer) is exactly SentencePiece, so that is the one built here."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import normalizers
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=model_file)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = generate_merges(vocab, {p: sp.get_score(i) for i, p in enumerate(pieces)})
    hf = transformers.LlamaTokenizer(vocab=vocab, merges=merges, legacy=True, add_bos_token=False,
                                     add_eos_token=False)
    hf._tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf._tokenizer.pre_tokenizer = None
    return hf


@pytest.fixture(scope="module", params=["v1", "v3"])
def model_file(request, mistral_v1_model, mistral_v3_model):
    return {"v1": mistral_v1_model, "v3": mistral_v3_model}[request.param]


def test_encode_decode_match_sentencepiece_and_transformers(model_file):
    tok, sp, hf = Tokenizer(model_file), spm.SentencePieceProcessor(model_file=model_file), hf_tokenizer(model_file)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == sp.encode(text), text
        if "<s>" not in text:  # transformers parses special-token strings in text; SentencePiece does not
            assert ids == hf.encode(text, add_special_tokens=False), text
            assert tok.decode(ids) == hf.decode(ids), text
        assert tok.decode(ids) == sp.decode(ids) == text  # lossless: identity normaliser + byte fallback
    assert tok.encode("") == [] and tok.decode([]) == ""
    assert tok.encode("hi", bos=True, eos=True) == [tok.bos_id] + sp.encode("hi") + [tok.eos_id]


def test_special_ids_and_sizes(mistral_v1_model, mistral_v3_model):
    v1, v3 = Tokenizer(mistral_v1_model), Tokenizer(mistral_v3_model)
    assert (v1.vocab_size, v3.vocab_size) == (32000, 32768)
    assert (v1.bos_id, v1.eos_id, v3.bos_id, v3.eos_id) == (1, 2, 1, 2)
    assert v1.pad_id == v3.pad_id == 0  # no pad piece: falls back to <unk>


def test_from_folder_and_bad_paths(tmp_path, mistral_v1_model):
    shutil.copy(mistral_v1_model, tmp_path / "tokenizer.model")
    assert Tokenizer(str(tmp_path)).encode("Bonjour à tous") == Tokenizer(mistral_v1_model).encode("Bonjour à tous")
    with pytest.raises(DataError, match=r"empty[/\\]tokenizer.model: no such tokenizer file"):
        os.makedirs(tmp_path / "empty")
        Tokenizer(str(tmp_path / "empty"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match=r"junk.model: not a SentencePiece model"):
        Tokenizer(str(tmp_path / "junk.model"))


def test_instruct_matches_mistral_common(mistral_v1_model, mistral_v3_model):
    pytest.importorskip("mistral_common")
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    text = "Rate the response's naturalness from 1 to 5.\n\nUser: Où est la gare ?\nResponse: Tout droit."
    for path in (mistral_v1_model, mistral_v3_model):  # v1: [INST] as text; v3: control pieces
        ref = MistralTokenizer.from_file(path).encode_chat_completion(
            ChatCompletionRequest(messages=[UserMessage(content=text)])).tokens
        assert Tokenizer(path).instruct(text) == ref


def test_rating_tokens_are_the_digit_pieces(mistral_v1_model):
    tok = Tokenizer(mistral_v1_model)
    assert tok.encode("4") == [tok.sp.piece_to_id("▁"), tok.sp.piece_to_id("4")]  # why the prefix matters
    assert [tok.piece(i) for i in rating_token_ids(tok)] == ["1", "2", "3", "4", "5"]


def test_continuation_drops_only_the_dummy_prefix(mistral_v1_model):
    tok = Tokenizer(mistral_v1_model)
    assert tok.encode("4") + tok.continuation("\nExplanation:") == tok.encode("4\nExplanation:")
    assert tok.encode("fine") + tok.continuation("\nRating:") == tok.encode("fine\nRating:")
    assert tok.continuation("word") == tok.encode("word")  # '▁word' is one piece: nothing to drop
