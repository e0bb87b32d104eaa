"""tokenizer.Tokenizer against reference implementations, on real vocabularies only:

  SentencePiece  Mistral's v1 and v3 models, as .model files (vs sentencepiece, transformers,
                 mistral-common) and rebuilt from a GGUF vocabulary written with the `gguf` package
  byte-level BPE SmolLM2-135M-Instruct's GGUF vocabulary, vs the `tokenizers` library on every turn of a
                 slice of the chitchat dataset and on a stress set; the same vocabulary saved as
                 tokenizer.json; GPT-2's and Llama-3's pre-tokenizers over that vocabulary
and the interface every kind shares: spaced/continuation, the rating tokens, chat templates, errors."""
import importlib.util
import json
import os
import shutil
import time

import gguf
import pytest
import sentencepiece as spm
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Oracle

import gguf_file
from data import rating_token_ids
from tokenizer import LLAMA3_PATTERN, Tokenizer, TokenizerError

TEXTS = ["", "Hello world", "4", " 4", "Rating: 4\nExplanation: fine.", "naïve café — 日本語 🤖 ½",
         "  two  spaces ", "12345 3.14 0.5%", "\n\nHuman: hi\n\nAssistant: yo", "a\tb", "Ünïcödé",
         " leading", "trailing ", "x\n\n\ny", "<s> </s> [INST]", "Ｆｕｌｌｗｉｄｔｈ", "\u200b zero width",
         "The quick brown fox jumps over the lazy dog; internationalization!"]

STRESS = [
    # digits and numbers: each digit alone (smollm), in threes (llama-bpe); other scripts' digits, No, Nl
    "0", "7 8 9", "1234567890", "3.14159", "1,000,000.00", "$12.50", "-42", "v2.0.1", "１２３", "٣٤٥ ۶۷",
    "x² + y³ = z⁴", "½ ¾ ⅓ ⅞", "① ② ⑩", "Ⅻ ⅻ", "2024-05-02T19:38:15Z", "  4", "a1b2c3", "1st 2nd 3rd",
    # emoji, ZWJ sequences, modifiers, flags, variation selectors
    "🤖", "👍🏽 👋🏿", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "❤️ ♥ ☺️", "🇫🇷🇯🇵", "ok👌ok",
    # accents and combining marks (category M: neither letter nor number)
    "naïve café résumé", "e\u0301 n\u0303 a\u0308\u0304", "Zalgo: Z\u0351\u036b\u0343a\u0310l\u0352g\u0300o",
    "नमस्ते दुनिया", "สวัสดีครับ", "Ǆ ǅ ǆ", "ſ ß ẞ", "ﬁ ﬂ", "İstanbul ı",
    # scripts
    "日本語のテキスト、中文，한국어 텍스트", "مرحبا بالعالم ١٢", "שלום עולם", "Привет, мир!", "Γειά σου κόσμε",
    # whitespace: runs, tabs, newlines, CR LF, unicode spaces, separators, non-White_Space \x1c-\x1f
    " ", "   ", "a  b   c", "\t\tx", "\n", "\n\n\n", "x\r\ny", "\r\n\r\n", "a \n b", "trailing   ", " \t \n ",
    "x\u00a0y", "\u3000x\u3000", "\u2003em\u2002en", "\u200bzero\u200c", "\u2028\u2029", "\x85next",
    "\x0b\x0c", "!\x1c?", "a  \x1c b",  # the last: str.isspace would give ['ĠĠ', 'Ĝ']
    "a\x1cb\x1e \x1f", "\u180e mongolian", "end\n", "   leading",
    # contractions (GPT-2's are lower case only), quotes
    "it's", "we're they've I'm you'll he'd", "IT'S WE'RE", "'s's 'S", "don't won't", "‘curly’ “quotes”",
    # special tokens inside text, and near misses
    "<|im_start|>user\nhi<|im_end|>\n", "a<|endoftext|>b", "<|im_start|><|im_end|>", "< |im_start| >",
    "<|im_start", "<repo_name>x<reponame>y", " <|im_end|> ", "<|im_end|><|im_end|>",
    # mixed
    "Rating: 4\nExplanation: fine.", "E=mc² & ½ = 0.5", "def f(x):\n    return x**2  # ok\n",
    "https://example.com/a?b=1&c=2#frag", "C:\\Users\\me", "<b>bold</b> &amp;", "ＡＢＣ ａｂｃ", "~!@#$%^&*()_+",
    "Mixed 日本 text 123 with émojis 🎉 and\ttabs\r\n", "...", "---", "a" * 300, "ab" * 200, " " * 100,
]


def turns(n=None):
    """Message texts of the chitchat dataset (real human conversations), in file order."""
    root = importlib.util.find_spec("chitchat_dataset").submodule_search_locations[0]
    with open(os.path.join(root, "dataset.json"), encoding="utf-8") as f:
        convs = json.load(f)
    out = [m["text"] for c in convs.values() for block in c["messages"] for m in block]
    return out[:n]


N_TURNS = 20_000


@pytest.fixture(scope="module")
def chitchat():
    return turns(N_TURNS)


# ------------------------------------------------------------------------ oracles and files

def oracle_from_gguf(md, pre="smollm"):
    """A `tokenizers` BPE over a GGUF gpt2 vocabulary, with the named pre-tokenizer and its specials."""
    tokens = md["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    o = Oracle(models.BPE(vocab, merges, ignore_merges=pre == "llama-bpe"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "llama-bpe")
    o.pre_tokenizer = {
        "gpt2": byte_level,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"), byte_level]),
    }[pre]
    o.decoder = decoders.ByteLevel()
    o.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, ty in zip(tokens, md["tokenizer.ggml.token_type"]) if ty == 3])
    return o


def write_gguf(path, **kv):
    """A GGUF file holding only tokenizer metadata (no tensors)."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    adders = {"model": w.add_tokenizer_model, "pre": w.add_tokenizer_pre, "tokens": w.add_token_list,
              "scores": w.add_token_scores, "types": w.add_token_types, "merges": w.add_token_merges,
              "bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
              "pad": w.add_pad_token_id, "add_bos": w.add_add_bos_token,
              "add_space_prefix": w.add_add_space_prefix, "chat_template": w.add_chat_template}
    for k, v in kv.items():
        adders[k](v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _fields(buf):
    """Top-level (field, value) pairs of a protobuf message (varint and length-delimited fields)."""
    i, out = 0, []
    while i < len(buf):
        key, i = _uvarint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _uvarint(buf, i)
        elif wire == 2:
            n, i = _uvarint(buf, i)
            v, i = buf[i:i + n], i + n
        else:  # 5: 32-bit, 1: 64-bit
            n = 4 if wire == 5 else 8
            v, i = buf[i:i + n], i + n
        out.append((field, v))
    return out


def _uvarint(buf, i):
    n = shift = 0
    while True:
        b = buf[i]
        n, i, shift = n | (b & 0x7F) << shift, i + 1, shift + 7
        if b < 0x80:
            return n, i


def sentencepiece_vocab(model_file):
    """(pieces, scores, types) of a SentencePiece model, types read from its proto (sentencepiece's
    Python API has no is_user_defined, and Mistral v3 has user-defined pieces)."""
    sp = spm.SentencePieceProcessor(model_file=model_file)
    types = [dict(_fields(v)).get(3, 1) for f, v in _fields(sp.serialized_model_proto()) if f == 1]
    n = sp.get_piece_size()
    assert len(types) == n
    return [sp.id_to_piece(i) for i in range(n)], [sp.get_score(i) for i in range(n)], types


@pytest.fixture(scope="module")
def smollm2_md(smollm2_gguf):
    return gguf_file.read(smollm2_gguf).metadata


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return Tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def oracle(smollm2_md):
    return oracle_from_gguf(smollm2_md)


@pytest.fixture(scope="module")
def smol_json(tmp_path_factory, oracle, smollm2_md):
    """SmolLM2's vocabulary as a Hugging Face folder: tokenizer.json saved by `tokenizers` + a config."""
    d = tmp_path_factory.mktemp("smollm2_hf")
    oracle.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "chat_template": smollm2_md["tokenizer.chat_template"]}))
    return d


@pytest.fixture(scope="module")
def smol_hf(smol_json):
    return Tokenizer(str(smol_json))


@pytest.fixture(scope="module")
def mistral_gguf(tmp_path_factory, mistral_v1_model, mistral_v3_model):
    """Mistral's v1 and v3 vocabularies as GGUF 'llama' vocabularies, as llama.cpp's converter writes them."""
    out = {}
    for name, model_file in (("v1", mistral_v1_model), ("v3", mistral_v3_model)):
        pieces, scores, types = sentencepiece_vocab(model_file)
        out[name] = write_gguf(tmp_path_factory.mktemp("gguf") / f"mistral-{name}.gguf", model="llama",
                               tokens=pieces, scores=scores, types=types, bos=1, eos=2, unk=0, add_bos=True,
                               add_space_prefix=True, chat_template="{{ bos_token }}[INST] {{ m }} [/INST]")
    return out


# ------------------------------------------------------------------ SentencePiece (.model files)

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
    assert tok.kind == "sentencepiece"
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
    with pytest.raises(TokenizerError, match=r"empty[/\\]tokenizer.model: no such tokenizer file"):
        os.makedirs(tmp_path / "empty")
        Tokenizer(str(tmp_path / "empty"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match=r"junk.model: not a SentencePiece model"):
        Tokenizer(str(tmp_path / "junk.model"))


def test_instruct_matches_mistral_common(mistral_v1_model, mistral_v3_model):
    pytest.importorskip("mistral_common")
    from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    text = "Rate the response's naturalness from 1 to 5.\n\nUser: Où est la gare ?\nResponse: Tout droit."
    for path in (mistral_v1_model, mistral_v3_model):  # v1: [INST] as text; v3: control pieces
        mt = MistralTokenizer.from_file(path)
        ref = mt.encode_chat_completion(ChatCompletionRequest(messages=[UserMessage(content=text)])).tokens
        assert Tokenizer(path).instruct(text) == ref
        assert Tokenizer(path).chat(text, template="inst") == ref
        ref = mt.encode_chat_completion(ChatCompletionRequest(
            messages=[SystemMessage(content="Be brief."), UserMessage(content=text)])).tokens
        assert Tokenizer(path).chat(text, system="Be brief.", template="inst") == ref


def test_rating_tokens_are_the_digit_pieces(mistral_v1_model):
    tok = Tokenizer(mistral_v1_model)
    assert tok.encode("4") == [tok.sp.piece_to_id("▁"), tok.sp.piece_to_id("4")]  # why the prefix matters
    assert [tok.piece(i) for i in rating_token_ids(tok)] == ["1", "2", "3", "4", "5"]


def test_continuation_drops_only_the_dummy_prefix(mistral_v1_model):
    tok = Tokenizer(mistral_v1_model)
    assert tok.encode("4") + tok.continuation("\nExplanation:") == tok.encode("4\nExplanation:")
    assert tok.encode("fine") + tok.continuation("\nRating:") == tok.encode("fine\nRating:")
    assert tok.continuation("word") == tok.encode("word")  # '▁word' is one piece: nothing to drop


# ------------------------------------------------------------- SentencePiece from a GGUF vocabulary

def test_gguf_llama_vocabulary_is_the_sentencepiece_model(mistral_gguf, mistral_v1_model, mistral_v3_model, chitchat):
    texts = TEXTS + STRESS + chitchat[:2000]
    for name, model_file in (("v1", mistral_v1_model), ("v3", mistral_v3_model)):
        tok, ref = Tokenizer(mistral_gguf[name]), Tokenizer(model_file)
        assert tok.kind == "sentencepiece" and tok.path == mistral_gguf[name]
        for text in texts:
            ids = tok.encode(text)
            assert ids == ref.encode(text), (name, text)
            assert tok.decode(ids) == text, (name, text)
        assert tok.encode("[REFERENCE_DOC_1] x") == ref.encode("[REFERENCE_DOC_1] x")  # v3: user-defined piece
        ids = lambda t: (t.vocab_size, t.bos_id, t.eos_id, t.pad_id)  # noqa: E731
        assert ids(tok) == ids(ref) == ((32000, 1, 2, 0) if name == "v1" else (32768, 1, 2, 0))
        assert tok.encode("hi", bos=True, eos=True) == ref.encode("hi", bos=True, eos=True)
        assert tok.ordinary_ids() == ref.ordinary_ids()
        assert tok.instruct("Bonjour") == ref.instruct("Bonjour")
        assert tok.template == "inst" and tok.chat("Bonjour") == ref.instruct("Bonjour")
        assert [tok.piece(i) for i in tok.spaced("4")] == ["▁", "4"]


def test_gguf_llama_flags_add_bos_and_space_prefix(tmp_path, mistral_v1_model):
    pieces, scores, types = sentencepiece_vocab(mistral_v1_model)
    path = write_gguf(tmp_path / "noprefix.gguf", model="llama", tokens=pieces, scores=scores, types=types,
                      bos=1, eos=2, unk=0, pad=2, add_bos=False, add_space_prefix=False)
    tok = Tokenizer(path)
    assert tok.pad_id == 2  # as the file says, though SentencePiece reports only control pieces as pad
    # the reference: the original model with its normaliser's add_dummy_prefix turned off (a second
    # NormalizerSpec {3: false} appended to the proto merges into the first, as protobuf defines)
    sp = spm.SentencePieceProcessor(model_file=mistral_v1_model)
    ref = spm.SentencePieceProcessor(model_proto=sp.serialized_model_proto() + b"\x1a\x02\x18\x00")
    for text in TEXTS + STRESS:
        assert tok.encode(text) == ref.encode(text), text
    assert tok.encode("hi", bos=True) == ref.encode("hi") and tok.bos_id == 1  # bos exists, not added
    assert tok.continuation("\nRating:") == tok.encode("\nRating:")


# ------------------------------------------------------------------------------- byte-level BPE

def test_smollm2_gguf_vocabulary(smol):
    assert (smol.kind, smol.pre, smol.vocab_size) == ("bpe", "smollm", 49152)
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.add_bos) == (1, 2, 2, False)
    assert (smol.piece(1), smol.piece(2)) == ("<|im_start|>", "<|im_end|>")
    assert smol.template == "chatml"
    assert len(smol.ordinary_ids()) == 49152 - 17 and 0 not in smol.ordinary_ids()  # 17 control tokens
    assert smol.encode("hi", bos=True, eos=True) == smol.encode("hi") + [2]  # SmolLM2 adds no bos


def test_smollm2_matches_tokenizers_on_stress_set(smol, oracle):
    for text in TEXTS + STRESS:
        ids = smol.encode(text)
        assert ids == oracle.encode(text).ids, text
        assert smol.decode(ids) == text == oracle.decode(ids, skip_special_tokens=False), text
    assert [smol.piece(i) for i in smol.encode("  4 1234")] == ["ĠĠ", "4", "Ġ", "1", "2", "3", "4"]
    # SmolLM2's vocabulary lacks 21 of the 256 byte characters (\x04 \x06 \x13 \x14 \x16 \x1d, and lead
    # bytes 0xc0 0xc1 0xf1 0xf2 0xf5-0xff); with no unknown token, both drop them
    assert smol.encode("a\x1db") == oracle.encode("a\x1db").ids == [smol.token_id("a"), smol.token_id("b")]


def test_smollm2_matches_tokenizers_on_chitchat_turns(smol, oracle, chitchat):
    smol.bpe.cache.clear()
    t0 = time.perf_counter()
    ours = [smol.encode(t) for t in chitchat]
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = [e.ids for e in oracle.encode_batch(chitchat)]
    dt_ref = time.perf_counter() - t0
    bad = [t for t, a, b in zip(chitchat, ours, ref) if a != b]
    assert not bad, f"{len(bad)} of {len(chitchat)} turns differ, e.g. {bad[:3]}"
    assert all(smol.decode(ids) == t for t, ids in zip(chitchat, ours))
    n_tok, n_chr = sum(map(len, ours)), sum(map(len, chitchat))
    print(f"\nSmolLM2 byte-level BPE on {len(chitchat)} chitchat turns ({n_chr / 1e6:.2f} M chars, {n_tok} tokens): "
          f"{n_tok / dt / 1e3:.0f} k tokens/s, {n_chr / dt / 1e6:.2f} M chars/s from a cold cache "
          f"(tokenizers, Rust, batched: {n_tok / dt_ref / 1e3:.0f} k tokens/s)")


def test_smollm2_matches_transformers_gguf_tokenizer(smollm2_gguf, smol, chitchat):
    """An independent reading of the same GGUF. transformers' converter splits digits differently
    after a whitespace run ('  4' -> ['Ġ', 'Ġ', '4']; SmolLM2's own tokenizer.json and `tokenizers`
    give ['ĠĠ', '4']), so the comparison is on real turns, where that does not occur."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf),
                                                    gguf_file=os.path.basename(smollm2_gguf))
    for text in chitchat[:1000] + ["<|im_start|>user\nWhat is 12+30?<|im_end|>\n"]:
        assert smol.encode(text) == hf.encode(text, add_special_tokens=False), text


def test_tokenizer_json_folder_equals_gguf(smol_json, smol_hf, smol, chitchat, tmp_path):
    tok = smol_hf
    assert tok.path == str(smol_json / "tokenizer.json")
    assert (tok.kind, tok.pre, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.template) == \
        ("bpe", "smollm", 49152, 1, 2, 2, False, "chatml")
    assert tok.ordinary_ids() == smol.ordinary_ids()
    for text in TEXTS + STRESS + chitchat[:5000]:
        assert tok.encode(text) == smol.encode(text), text
    # merges as "a b" strings (older files) instead of [a, b] lists; no config: bos from the post-processor;
    # an added token that absorbs the whitespace on both sides
    o = Oracle.from_file(str(smol_json / "tokenizer.json"))
    o.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    o.add_special_tokens([AddedToken("<|sep|>", lstrip=True, rstrip=True, special=True, normalized=False)])
    tj = json.loads(o.to_str())
    assert isinstance(tj["model"]["merges"][0], list)
    tj["model"]["merges"] = [" ".join(m) for m in tj["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    tok2 = Tokenizer(str(tmp_path / "tokenizer.json"))
    assert (tok2.bos_id, tok2.eos_id, tok2.add_bos, tok2.template) == (1, 0, True, None)  # eos: <|endoftext|>
    for text in STRESS:
        assert tok2.encode(text, bos=True) == [1] + smol.encode(text) == o.encode(text).ids, text
    for text in ("a <|sep|> b", "a\n\t<|sep|>\n b", "<|sep|><|sep|>", " <|sep|>", "x<|sep|>"):
        assert tok2.encode(text, bos=True) == o.encode(text).ids, text
    assert tok2.vocab_size == 49153 and 49152 not in tok2.ordinary_ids()


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe"])
def test_other_pre_tokenizers_match_tokenizers(pre, smollm2_md, chitchat, tmp_path):
    """GPT-2's and Llama-3's pre-tokenizers over SmolLM2's vocabulary, from a GGUF and a tokenizer.json."""
    md = smollm2_md
    path = write_gguf(tmp_path / f"{pre}.gguf", model="gpt2", pre=pre, tokens=md["tokenizer.ggml.tokens"],
                      types=md["tokenizer.ggml.token_type"], merges=md["tokenizer.ggml.merges"], bos=1, eos=2)
    o = oracle_from_gguf(md, pre)
    o.save(str(tmp_path / "tokenizer.json"))
    from_gguf, from_json = Tokenizer(path), Tokenizer(str(tmp_path / "tokenizer.json"))
    assert from_gguf.pre == from_json.pre == pre
    for text in TEXTS + STRESS + chitchat[:3000]:
        ids = o.encode(text).ids
        assert from_gguf.encode(text) == ids, text
        assert from_json.encode(text) == ids, text
        assert from_gguf.decode(ids) == text
    if pre == "llama-bpe":  # digits in threes (SmolLM2's vocabulary then spells each digit alone)
        assert from_gguf.bpe.pattern.findall("1234567 it'S") == ["123", "456", "7", " it", "'S"]


# -------------------------------------------------------------------------- the shared interface

@pytest.fixture(scope="module")
def every_kind(mistral_v1_model, mistral_v3_model, mistral_gguf, smol, smol_hf):
    return {"mistral-v1.model": Tokenizer(mistral_v1_model), "mistral-v3.model": Tokenizer(mistral_v3_model),
            "mistral-v1.gguf": Tokenizer(mistral_gguf["v1"]), "smollm2.gguf": smol,
            "smollm2/tokenizer.json": smol_hf}


def test_spaced_and_continuation(every_kind):
    for name, tok in every_kind.items():
        space = "▁" if tok.kind == "sentencepiece" else "Ġ"
        assert [tok.piece(i) for i in tok.spaced("4")] == [space, "4"], name
        for prefix, x in (("Rating:", "4"), ("Rating:", "5"), ("It was", "fine."), ("Score", "12")):
            assert tok.encode(prefix) + tok.spaced(x) == tok.encode(f"{prefix} {x}"), (name, prefix, x)
        for head, tail in (("4", "\nExplanation:"), ("fine", "\nRating:"), ("ok", "\n\nUser:")):
            assert tok.encode(head) + tok.continuation(tail) == tok.encode(head + tail), (name, head, tail)
    smol = every_kind["smollm2.gguf"]
    assert smol.continuation("\nRating:") == smol.encode("\nRating:")


def test_ratings_differ_in_exactly_one_token(every_kind):
    for name, tok in every_kind.items():
        enc = [tok.spaced(str(r)) for r in range(1, 6)]
        assert len({len(e) for e in enc}) == 1 and len({tuple(e[:-1]) for e in enc}) == 1, name
        assert [tok.piece(e[-1]) for e in enc] == ["1", "2", "3", "4", "5"], name


def test_chatml_matches_the_template_and_tokenizers(smol, oracle, smollm2_md):
    text, system = "Rate this reply from 1 to 5.\nUser: hi 👋\nResponse: Hello! <b>", "Be brief."
    expected = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert smol.chat(text, system=system) == oracle.encode(expected).ids
    assert smol.chat(text) == oracle.encode(expected.split("<|im_end|>\n", 1)[1]).ids
    assert smol.chat(text)[:3] == [1, smol.token_id("user"), smol.token_id("Ċ")]
    assert smol.chat(text, template="chatml") == smol.chat(text)
    jinja2 = pytest.importorskip("jinja2")  # the checkpoint's own template, rendered
    template = jinja2.Environment().from_string(smollm2_md["tokenizer.chat_template"])
    for messages, sys_prompt in (([{"role": "system", "content": system}], system),
                                 ([], "You are a helpful AI assistant named SmolLM, trained by Hugging Face")):
        rendered = template.render(messages=messages + [{"role": "user", "content": text}], add_generation_prompt=True)
        assert smol.chat(text, system=sys_prompt) == oracle.encode(rendered).ids


def test_template_detection_and_errors(tmp_path, mistral_v3_model, smol):
    assert Tokenizer(mistral_v3_model).template is None  # a bare .model file: nothing says which
    with pytest.raises(TokenizerError, match="no chat template detected"):
        Tokenizer(mistral_v3_model).chat("hi")
    shutil.copy(mistral_v3_model, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"}))
    tok = Tokenizer(str(tmp_path))
    assert tok.template == "inst" and tok.chat("Bonjour") == tok.instruct("Bonjour")
    with pytest.raises(TokenizerError, match=r"tokenizer.model: the chatml template needs <\|im_start\|>"):
        tok.chat("Bonjour", template="chatml")
    with pytest.raises(TokenizerError, match="template 'alpaca'"):
        smol.chat("hi", template="alpaca")


def test_bad_files_are_one_line_errors(tmp_path):
    cases = {
        "qwen2.gguf": dict(model="gpt2", pre="deepseek-llm", tokens=["<|endoftext|>", "a"], types=[3, 1], eos=0),
        "bert.gguf": dict(model="bert", tokens=["[UNK]", "a"], types=[2, 1], eos=0),
        "notokens.gguf": dict(model="gpt2"),
    }
    for name, kv in cases.items():
        write_gguf(tmp_path / name, **kv)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x07\x00\x00\x00")
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "whitespace.json").write_text(json.dumps(
        {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "pre_tokenizer": {"type": "Whitespace"}}))
    (tmp_path / "unigram.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}}))
    expect = {"qwen2.gguf": r"qwen2.gguf: pre-tokenizer 'deepseek-llm' is not one",
              "bert.gguf": r"bert.gguf: tokenizer.ggml.model 'bert' is not supported",
              "notokens.gguf": r"notokens.gguf: no tokenizer.ggml.tokens",
              "junk.gguf": r"junk.gguf: unsupported GGUF version 7",
              "junk.json": r"junk.json: not a JSON file",
              "whitespace.json": r"whitespace.json: pre_tokenizer \{\"type\":\"Whitespace\"\} is not one",
              "unigram.json": r"unigram.json: model type 'Unigram' is not byte-level BPE"}
    for name, pattern in expect.items():
        with pytest.raises(TokenizerError, match=pattern) as e:
            Tokenizer(str(tmp_path / name))
        assert "\n" not in str(e.value), name
