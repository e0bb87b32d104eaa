"""tokenizer.Tokenizer on broken and hostile files (issue 29: nothing silently wrong, nothing unbounded).

Each case is a tiny tokenizer.json written here: a byte-level BPE built and saved by the `tokenizers`
library, then damaged. Every one must be a single-line TokenizerError naming the file and the field,
token, merge or id; where `tokenizers` itself refuses the file, that is asserted too (and where it
accepts a file that is silently wrong, that is shown instead). Then a seeded fuzz run over a few
hundred mutated files, in one subprocess under a 2 GB address-space limit, and two bad tokenizers
through a real command line (`python data.py preview ... --tokenizer DIR`). CPU only, ~3 s."""
import copy
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc

import gguf
import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Oracle

from tokenizer import Tokenizer, TokenizerError, byte_chars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "Hello there, the cat sat on the mat.\n\tin 1234 naïve 🤖 <|im_end|> end"
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "t"), ("Ġ", "m"), ("o", "n"), ("e", "r")]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def base_json():
    """A valid tokenizer.json, as `tokenizers` saves it: the 256 byte characters, a few merges,
    GPT-2's pre-tokenizer, and three special tokens added after the vocabulary (ids 264..266)."""
    vocab = {c: i for i, c in enumerate(byte_chars())}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    o = Oracle(models.BPE(vocab, MERGES))
    o.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    o.decoder = decoders.ByteLevel()
    o.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return json.loads(o.to_str())


BASE = base_json()
CONFIG = {"eos_token": "<|im_end|>", "bos_token": None, "add_bos_token": False,
          "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                           "{% endfor %}"}


def write(folder, tj=None, text=None, config=None):
    """folder/tokenizer.json from a dict (or raw text / bytes), with a tokenizer_config.json if given."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(str(folder), "tokenizer.json")
    data = text if text is not None else json.dumps(tj)
    with open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    if config is not None:
        with open(os.path.join(str(folder), "tokenizer_config.json"), "wb") as f:
            f.write(config if isinstance(config, bytes) else json.dumps(config).encode())
    return path


def oracle_refuses(path):
    """Whether `tokenizers` refuses the file (some refusals are Rust panics, a BaseException)."""
    try:
        Oracle.from_file(path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        return True
    return False


def refused(path, pattern):
    """Tokenizer(path) raises one TokenizerError line that names the file and matches `pattern`."""
    with pytest.raises(TokenizerError) as e:
        Tokenizer(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    assert re.search(pattern, msg), msg
    return msg


def edited(fn):
    tj = copy.deepcopy(BASE)
    fn(tj)
    return tj


def test_the_base_file_loads_and_matches_tokenizers(tmp_path):
    path = write(tmp_path, BASE, config=CONFIG)
    tok, o = Tokenizer(str(tmp_path)), Oracle.from_file(path)
    assert tok.encode(TEXT) == o.encode(TEXT, add_special_tokens=False).ids
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert (tok.vocab_size, tok.eos_id, tok.template) == (267, 266, "chatml")


# ------------------------------------------------------------------ what `tokenizers` refuses, refused

def test_a_bpe_without_merges_is_refused(tmp_path):
    """Before: no merges read as an empty list, a vocabulary that never merges (a silently different
    tokenizer). `tokenizers` refuses it ('Missing vocab/merges'); an empty list it accepts, and so do we."""
    for name, fn, pattern in (("absent", lambda tj: tj["model"].pop("merges"), r"no model\.merges$"),
                              ("null", lambda tj: tj["model"].update(merges=None), r"no model\.merges \(null\)")):
        path = write(tmp_path / name, edited(fn))
        assert oracle_refuses(path)
        refused(path, pattern)
    path = write(tmp_path / "empty", edited(lambda tj: tj["model"].update(merges=[])))
    assert Tokenizer(path).encode("the") == Oracle.from_file(path).encode("the").ids == [116, 104, 101]


@pytest.mark.parametrize("merge,role,token", [(["a", "t"], "result", "at"), (["q", "Ġt"], "result", "qĠt"),
                                              (["Ġz", "t"], "left part", "Ġz"),
                                              (["t", "héé"], "right part", "héé")])
def test_a_merge_outside_the_vocabulary_is_refused(tmp_path, merge, role, token):
    """Before: a merge whose result is not a token made text vanish ('cat' encoded to 'c' alone, the
    round trip lost 'at'). `tokenizers` refuses it (a missing result even panics)."""
    def fn(tj):
        tj["model"]["merges"][4] = merge
        tj["model"]["vocab"].pop("at")
        tj["model"]["vocab"]["xx"] = 260  # keep the ids dense: this case is about the merge alone
    path = write(tmp_path, edited(fn))
    assert oracle_refuses(path)
    refused(path, rf"model\.merges\[4\] \({merge[0]!r}, {merge[1]!r}\): its {role} {token!r} is not in the vocabulary")


def write_gguf(path, keys):
    """A GGUF file holding only these metadata keys (None: left out): a value, or (value, GGUFValueType,
    item type) to choose the type."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    for k, v in keys.items():
        if isinstance(v, tuple):
            w.add_key_value(k, *v)
        elif v is not None:
            {list: w.add_array, str: w.add_string, bool: w.add_bool, int: w.add_uint32}[type(v)](k, v)
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    return str(path)


GPT2 = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": list(BASE["model"]["vocab"]) + SPECIALS,
        "tokenizer.ggml.token_type": [1] * 264 + [3] * 3, "tokenizer.ggml.merges": [" ".join(m) for m in MERGES],
        "tokenizer.ggml.eos_token_id": 266}  # the base vocabulary as a GGUF gpt2 vocabulary


def test_a_gguf_merge_outside_the_vocabulary_is_refused(tmp_path):
    """The same check on a GGUF gpt2 vocabulary (shared code), and a GGUF without merges (llama.cpp
    refuses that too)."""
    good = Tokenizer(write_gguf(tmp_path / "good.gguf", GPT2))
    assert good.encode(TEXT) == Tokenizer(write(tmp_path, BASE)).encode(TEXT)
    bad = {**GPT2, "tokenizer.ggml.merges": GPT2["tokenizer.ggml.merges"][:4] + ["a q"]}
    refused(write_gguf(tmp_path / "bad.gguf", bad), r"tokenizer\.ggml\.merges\[4\] \('a', 'q'\): its result 'aq'")
    none = {**GPT2, "tokenizer.ggml.merges": None}
    refused(write_gguf(tmp_path / "none.gguf", none), r"no tokenizer\.ggml\.merges")


def test_a_negative_id_is_refused(tmp_path):
    path = write(tmp_path, edited(lambda tj: tj["model"]["vocab"].update(a=-1)))
    assert oracle_refuses(path)  # 'expected u32'
    refused(path, r"model\.vocab\['a'\] has id -1, outside 0\.\.263")


def test_two_tokens_on_one_id_are_refused(tmp_path):
    """`tokenizers` accepts this file and is silently wrong with it: 'a' encodes to the id of 'b' and
    decodes as 'b'. Refused here, as is an added token given a vocabulary token's id."""
    path = write(tmp_path / "vocab", edited(lambda tj: tj["model"]["vocab"].update(a=tj["model"]["vocab"]["b"])))
    o = Oracle.from_file(path)
    assert [o.decode(o.encode(c).ids) for c in "ab"] != ["a", "b"]  # one of them decodes as the other
    refused(path, r"model\.vocab tokens 'a' and 'b' share id 98$")
    path = write(tmp_path / "added", edited(lambda tj: tj["added_tokens"][0].update(id=5)))
    refused(path, r"added_tokens\[0\] '<\|endoftext\|>' has id 5, but the tokenizers library numbers it 264")


def test_a_huge_id_is_refused_before_anything_is_allocated(tmp_path):
    """Before: one id of 3e8 sized the id -> token table: 2.4 GB of list for a 5 kB file. `tokenizers`
    keeps ids in a hash map and accepts the file; here ids must run 0..N-1 (as `tokenizers` numbers added
    tokens after N, a gap would be filled by one), checked before the table exists."""
    for name, fn in (("vocab", lambda tj: tj["model"]["vocab"].update(at=300_000_000)),
                     ("added", lambda tj: tj["added_tokens"][2].update(id=300_000_000)),
                     ("gap", lambda tj: tj["model"]["vocab"].update(at=300))):
        path = write(tmp_path / name, edited(fn))
        Tokenizer(write(tmp_path / "warm", BASE))  # one-time tables (unicode classes) out of the measurement
        tracemalloc.start()
        try:
            refused(path, r"has id (300000000|300), (outside 0\.\.263|but the tokenizers library numbers it 266)")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 100 * os.path.getsize(path), (name, peak)


@pytest.mark.parametrize("edit,pattern", [
    (lambda tj: tj["added_tokens"][1].update(id=270), r"added_tokens\[1\] '<\|im_start\|>' has id 270, but .* 265"),
    (lambda tj: tj["added_tokens"].reverse(), r"added_tokens\[0\] '<\|im_end\|>' has id 266, but .* 264"),
    (lambda tj: tj["added_tokens"].append(dict(tj["added_tokens"][0], id=267)), r"has id 267, .* 264 \(listed twice\)"),
    (lambda tj: tj["added_tokens"].append(dict(tj["added_tokens"][0], content="a", id=300)),
     r"added_tokens\[3\] 'a' has id 300, .* 97 \(its id in model.vocab\)"),
    (lambda tj: tj["added_tokens"][0].update(content=""), r"added_tokens\[0\] \(id 264\) has empty content"),
])
def test_added_token_ids_must_be_the_ones_tokenizers_gives(tmp_path, edit, pattern):
    """`tokenizers` ignores an added token's id and numbers it itself (its vocabulary id, or the next
    after the vocabulary and the added tokens before it; an empty one it skips, moving the rest): a
    file whose ids differ decodes differently there than it says. Refused, naming the token."""
    refused(write(tmp_path, edited(edit)), pattern)


# ---------------------------------------------------------------- wrong types: one line, not a traceback

WRONG_TYPES = [  # (edit, what the message says, does `tokenizers` refuse it too?)
    (lambda tj: tj.update(model=[]), r"no 'model' object", True),
    (lambda tj: tj.update(model="BPE"), r"no 'model' object", True),
    (lambda tj: tj["model"].update(vocab=[["a", 0]]), r"model\.vocab is a list of 1, not an object", True),
    (lambda tj: tj["model"].update(vocab=None), r"no model\.vocab \(null\)", True),
    (lambda tj: tj["model"]["vocab"].update(a="65"), r"model\.vocab\['a'\] is '65', not an integer id", True),
    (lambda tj: tj["model"]["vocab"].update(a=64.0), r"model\.vocab\['a'\] is 64\.0, not an integer id", True),
    (lambda tj: tj["model"]["vocab"].update(a=True), r"model\.vocab\['a'\] is True, not an integer id", True),
    (lambda tj: tj["model"].update(merges=[[0, 1]]), r"model\.merges\[0\] is a list of 2, not 'left right'", True),
    (lambda tj: tj["model"].update(merges="Ġ t"), r"model\.merges is 'Ġ t', not a list", True),
    (lambda tj: tj["model"]["merges"].append(None), r"model\.merges\[8\] is None, not 'left right'", True),
    (lambda tj: tj["model"]["merges"].append("at"), r"model\.merges\[8\] is 'at', not 'left right'", True),
    (lambda tj: tj["model"]["merges"].append(["a", "t", "x"]), r"model\.merges\[8\] is a list of 3", True),
    (lambda tj: tj["model"].update(unk_token=["<unk>"]), r"model\.unk_token is a list of 1, not a string", True),
    (lambda tj: tj["model"].update(unk_token="<unk>"), None, False),  # `tokenizers` fails only if it needs it
    (lambda tj: tj["model"].update(ignore_merges="no"), r"model\.ignore_merges is 'no', not true or false", True),
    (lambda tj: tj.update(added_tokens={"<x>": 267}), r"added_tokens is an object of 1, not a list", True),
    (lambda tj: tj["added_tokens"].append("<x>"), r"added_tokens\[3\] is '<x>', not an object", True),
    (lambda tj: tj["added_tokens"][0].pop("content"), r"no added_tokens\[0\]\.content$", True),
    (lambda tj: tj["added_tokens"][0].pop("id"), r"no added_tokens\[0\]\.id$", True),
    (lambda tj: tj["added_tokens"][0].update(content=None), r"no added_tokens\[0\]\.content \(null\)", True),
    (lambda tj: tj["added_tokens"][0].update(content=7), r"added_tokens\[0\]\.content is 7, not a string", True),
    (lambda tj: tj["added_tokens"][0].update(id="264"), r"added_tokens\[0\]\.id is '264', not an integer", True),
    (lambda tj: tj["added_tokens"][0].update(special="yes"), r"added_tokens\[0\]\.special is 'yes', not true", True),
    (lambda tj: tj.update(pre_tokenizer="ByteLevel"), r'pre_tokenizer "ByteLevel" is not one', True),
    (lambda tj: tj.update(pre_tokenizer=[tj["pre_tokenizer"]]), r'pre_tokenizer \[\{"type":"ByteLevel"', True),
    (lambda tj: tj.update(pre_tokenizer={"type": "Sequence", "pretokenizers": {"a": 1}}), r"pre_tokenizer \{", True),
    (lambda tj: tj.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [None, 1]}), r"pre_tokenizer", True),
    (lambda tj: tj.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": "x", "behavior": "Isolated"}, tj["pre_tokenizer"]]}), r"pre_tokenizer", True),
    (lambda tj: tj.update(pre_tokenizer=None), r"pre_tokenizer null is not one", False),
    (lambda tj: tj.update(normalizer=[]), r"normalizer a list of 0 is not supported", True),
    (lambda tj: tj.update(normalizer="NFC"), r"normalizer 'NFC' is not supported", True),
    (lambda tj: tj.update(post_processor={"type": "TemplateProcessing", "single": [{"SpecialToken": "<s>"}],
                                          "pair": [], "special_tokens": {}}),
     r"post_processor SpecialToken \"<s>\" is not", True),
    (lambda tj: tj.update(post_processor={"type": "TemplateProcessing", "single": {"a": 1}}), None, True),
    (lambda tj: tj.update(post_processor={"type": "Sequence", "processors": "x"}), None, True),
    (lambda tj: tj["added_tokens"][0].pop("single_word"), None, True),  # missing flags: false, as they default
    (lambda tj: tj["model"].update(dropout=0.1), r"model\.dropout 0\.1: BPE dropout is not supported", False),
]


@pytest.mark.parametrize("i", range(len(WRONG_TYPES)))
def test_wrong_json_types_are_one_line_errors(tmp_path, i):
    """Before: AttributeError, TypeError, KeyError or IndexError tracebacks (model a list, vocab a list,
    merges of ints, added tokens without content or id, a pre_tokenizer of the wrong shape, null for a
    string). Where the file still loads (None: a post_processor of a wrong shape names no bos token and is
    ignored, as other kinds are; an added token's missing flags are false), it encodes as `tokenizers` does."""
    edit, pattern, oracle_too = WRONG_TYPES[i]
    path = write(tmp_path, edited(edit), config=CONFIG)
    assert oracle_refuses(path) == oracle_too
    if pattern is None:
        tok = Tokenizer(path)
        assert tok.bos_id is None and tok.decode(tok.encode(TEXT)) == TEXT
        assert oracle_too or tok.encode(TEXT) == Oracle.from_file(path).encode(TEXT, add_special_tokens=False).ids
    else:
        refused(path, pattern)


def test_deep_nesting_huge_integers_and_bad_bytes_are_one_line_errors(tmp_path):
    """Before: RecursionError from json (deep nesting), ValueError from int() (more than 4300 digits),
    UnicodeEncodeError at decode time (a lone surrogate)."""
    text = json.dumps(BASE, ensure_ascii=False)
    deep = text.replace('"normalizer": null', '"normalizer": ' + "[" * 100_000 + "]" * 100_000)
    cases = {
        "deep": (deep, r"JSON nested too deeply to read", True),
        "deep-pre": (text.replace('"pre_tokenizer": {', '"pre_tokenizer": ' + "[" * 300 + "]" * 300 + ', "x": {'),
                     r"pre_tokenizer \[\[\[\[", True),
        "digits": (text.replace('"a": 97', '"a": 1' + "0" * 5000), r"not a JSON file \(Exceeds the limit \(4300", True),
        "digits-4000": (text.replace('"a": 97', '"a": 1' + "0" * 4000),
                        r"model\.vocab\['a'\] has id 10{56}\.\.\., outside", True),  # the message stays short
        "float": (text.replace('"a": 97', '"a": 1e400'), r"model\.vocab\['a'\] is inf, not an integer", True),
        "latin-1": (text.encode("utf-8").replace("ï".encode(), b"\xef"), r"not UTF-8 text \('utf-8' codec", True),
        "bytes": (text.encode("utf-8").replace(b'"a": 97', b'"a\xff\xfe": 97'), r"not UTF-8 text", True),
        "surrogate": (text.replace('"a": 97', '"\\ud800": 97'), r"model\.vocab token '\\ud800' is not valid", True),
        "surrogate-added": (text.replace("<|im_start|>", "\\udfff"), r"added_tokens\[1\]\.content '\\udfff'", True),
        "truncated": (text[:len(text) // 2], r"not a JSON file \(", True),
        "not-an-object": ("[1, 2, 3]", r"not a tokenizer\.json \(no 'model' object\)", True),
    }
    for name, (content, pattern, oracle_too) in cases.items():
        path = write(tmp_path / name, text=content)
        assert oracle_refuses(path) == oracle_too, name
        refused(path, pattern)


def test_bad_side_files_are_one_line_errors(tmp_path, mistral_v1_model):
    """tokenizer_config.json and chat_template.jinja beside a tokenizer.json or a tokenizer.model: not
    UTF-8, not JSON, or fields of the wrong type (before: UnicodeDecodeError, TypeError tracebacks,
    and add_bos_token "false" read as true)."""
    cases = {
        "not-utf8": (b'{"eos_token": "\xff"}', None, r"tokenizer_config\.json: not UTF-8 text"),
        "not-json": (b'{"eos_token": ', None, r"tokenizer_config\.json: not a JSON file"),
        "deep": (b"[" * 100_000, None, r"tokenizer_config\.json: JSON nested too deeply"),
        "list": (b"[]", None, r"tokenizer_config\.json: expected a JSON object"),
        "eos-list": (json.dumps({"eos_token": ["<|im_end|>"]}).encode(), None,
                     r"tokenizer_config\.json: eos_token is a list of 1, not a token string"),
        "eos-content": (json.dumps({"eos_token": {"content": None}}).encode(), None, r"eos_token is an object of 1"),
        "add-bos": (json.dumps({"add_bos_token": "false"}).encode(), None,
                    r"tokenizer_config\.json: add_bos_token is 'false', not true or false"),
        "template-int": (json.dumps({"chat_template": 5}).encode(), None,
                         r"tokenizer_config\.json: chat_template is 5, not a string"),
        "template-list": (json.dumps({"chat_template": [{"name": 1, "template": "x"}]}).encode(), None,
                          r"chat_template entry an object of 2 is not \{\"name\""),
        "jinja": (json.dumps(CONFIG).encode(), b"{{ \xff }}", r"chat_template\.jinja: not UTF-8 text"),
    }
    for kind, tok_file in (("json", None), ("model", mistral_v1_model)):
        for name, (config, jinja, pattern) in cases.items():
            d = tmp_path / kind / name
            if tok_file:
                os.makedirs(d)
                shutil.copy(tok_file, d / "tokenizer.model")
                (d / "tokenizer_config.json").write_bytes(config)
            else:
                write(d, BASE, config=config)
            if jinja:
                (d / "chat_template.jinja").write_bytes(jinja)
            with pytest.raises(TokenizerError) as e:
                Tokenizer(str(d))
            assert "\n" not in str(e.value) and str(e.value).startswith(str(d)), str(e.value)
            assert re.search(pattern, str(e.value)), (kind, name, str(e.value))


def test_wrong_gguf_metadata_types_are_one_line_errors(tmp_path):
    """A GGUF can hold any type under any key; the tokenizer keys are checked before use."""
    cases = [  # (key, value written instead, message)
        ("token_type", ["1"] * 267, r"tokenizer\.ggml\.token_type is a list of 267, not a list of integers"),
        ("token_type", [1] * 10, r"tokenizer\.ggml\.token_type has 10 entries for 267 tokens"),
        ("tokens", list(range(267)), r"tokenizer\.ggml\.tokens is an? (list|array) of 267, not a list of strings"),
        ("merges", [1, 2], r"tokenizer\.ggml\.merges is an? (list|array) of 2, not a list of strings"),
        ("pre", 7, r"tokenizer\.ggml\.pre is 7, not a string"),
        ("eos_token_id", "266", r"tokenizer\.ggml\.eos_token_id is '266', not an integer"),
        ("add_bos_token", 1, r"tokenizer\.ggml\.add_bos_token is 1, not true or false"),
        ("chat_template", 1, r"tokenizer\.chat_template is 1, not a string"),
    ]
    for k, (key, value, pattern) in enumerate(cases):
        key = "tokenizer." + key if key == "chat_template" else "tokenizer.ggml." + key
        refused(write_gguf(tmp_path / f"{k}.gguf", {**GPT2, key: value}), pattern)
    # a llama (SentencePiece) vocabulary whose scores do not fit a float32
    scores = ([0.0, 0.0, 0.0, 1e300], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT64)
    path = write_gguf(tmp_path / "scores.gguf", {"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": scores,
                                                 "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "a"],
                                                 "tokenizer.ggml.token_type": [2, 3, 3, 1]})
    refused(path, r"tokenizer\.ggml\.scores is an? (list|array) of 4, not a list of float32 numbers")


# --------------------------------------------------------------------------------- fuzz, in a subprocess

VALUES = [None, True, False, 0, -1, 1.5, 300_000_000, "", "x", "Ġ", [], {}, [1, 2], ["a", "b"], {"a": 1},
          {"type": "Sequence"}, {"content": "x"}]
NUMBERS = ["300000000", "-1", "1" + "0" * 5000, "9" * 4000, "1e400", "-0", "4294967296", "18446744073709551616",
           "1.5", "NaN", "Infinity", "0x10"]


def _paths(x, path=()):
    """Every (path to a value) in a JSON document."""
    yield path
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
    for k, v in items:
        yield from _paths(v, path + (k,))


def _at(doc, path):
    for k in path:
        doc = doc[k]
    return doc


def mutate(rng, doc):
    """(description, tokenizer.json bytes, tokenizer_config.json bytes or None, chat_template.jinja bytes or
    None): one or two random damages to the base files."""
    tj, cfg, jinja = json.dumps(doc).encode(), json.dumps(CONFIG).encode(), None
    what = []
    for _ in range(rng.choice((1, 1, 1, 2))):
        kind = rng.choice(("flip", "truncate", "number", "type", "type", "type", "deep", "drop", "drop",
                           "bytes", "surrogate", "rename", "config", "jinja"))
        on_config = kind == "config"
        if on_config:
            kind = rng.choice(("flip", "truncate", "type", "drop", "deep", "bytes"))
        text = cfg if on_config else tj
        if kind in ("type", "drop", "deep", "rename"):
            try:
                d = json.loads(text)
            except (ValueError, RecursionError):
                continue
            paths = list(_paths(d))
            # half the time a structural place (not one of the hundreds of vocab and merge entries)
            structural = [p for p in paths if not (len(p) >= 3 and p[1] in ("vocab", "merges"))]
            path = rng.choice(structural if rng.random() < 0.5 else paths)
            if kind == "rename":
                vocab = d.get("model", {}).get("vocab") if isinstance(d.get("model"), dict) else None
                if isinstance(vocab, dict) and vocab:
                    k = rng.choice(list(vocab))
                    vocab[k + rng.choice("aĠé")] = vocab.pop(k)
                text = json.dumps(d).encode()
            elif not path:
                text = json.dumps(rng.choice(VALUES)).encode()
            elif kind == "drop":
                parent = _at(d, path[:-1])
                del parent[path[-1]]
                text = json.dumps(d).encode()
            else:
                _at(d, path[:-1])[path[-1]] = "\0DEEP\0" if kind == "deep" else copy.deepcopy(rng.choice(VALUES))
                depth = rng.choice((50, 500, 5000, 200_000))
                nest = rng.choice((("[" * depth + "]" * depth), ('{"a":' * depth + "1" + "}" * depth)))
                text = json.dumps(d).replace('"\\u0000DEEP\\u0000"', nest).encode()
            what.append(f"{'config ' if on_config else ''}{kind} {'/'.join(map(str, path))[:60]}")
        elif kind == "flip":
            b = bytearray(text)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            text = bytes(b)
            what.append(f"{'config ' if on_config else ''}flip")
        elif kind == "truncate":
            text = text[:rng.randrange(len(text))]
            what.append(f"{'config ' if on_config else ''}truncate")
        elif kind == "number":
            spots = [m.span() for m in re.finditer(rb"(?<=[:\[ ])-?\d+", text)]
            a, b = rng.choice(spots)
            n = rng.choice(NUMBERS)
            text = text[:a] + n.encode() + text[b:]
            what.append(f"number {n[:12]} at {a}")
        elif kind == "bytes":
            at = rng.randrange(len(text))
            bad = rng.choice((b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\x00", b"\xf4\x90\x80\x80"))  # \xed\xa0\x80: U+D800
            text = text[:at] + bad + text[at:]
            what.append(f"{'config ' if on_config else ''}bytes at {at}")
        elif kind == "surrogate":
            spots = [m.start() for m in re.finditer(rb'"[^"\\]{1,8}":', text)]
            if spots:
                at = rng.choice(spots) + 1
                text = text[:at] + rng.choice((b"\\ud800", b"\\udfff", b"\\ud83d")) + text[at:]
            what.append("surrogate")
        elif kind == "jinja":
            jinja = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
            what.append("jinja")
        if on_config:
            cfg = text
        else:
            tj = text
    return "; ".join(what), tj, cfg, jinja


def fuzz(n, seed, folder):
    """Load n mutated tokenizer folders; return a summary. Each must be refused with a TokenizerError
    (or OSError), or load and encode as `tokenizers` does (when it loads the file too)."""
    rng = random.Random(seed)
    outcomes, failures, lenient, slowest, t_all = {}, [], [], (0.0, ""), time.perf_counter()
    for k in range(n):
        what, tj, cfg, jinja = mutate(rng, BASE)
        d = os.path.join(folder, str(k))
        os.makedirs(d)
        for name, content in (("tokenizer.json", tj), ("tokenizer_config.json", cfg), ("chat_template.jinja", jinja)):
            if content is not None:
                with open(os.path.join(d, name), "wb") as f:
                    f.write(content)
        t = time.perf_counter()
        try:
            tok = Tokenizer(d)
            ids = tok.encode(TEXT)
            tok.decode(ids)
            tok.decode(list(range(tok.vocab_size)))
            outcome = "loaded, round trip exact" if tok.decode(ids) == TEXT else "loaded"
            try:
                o = Oracle.from_file(os.path.join(d, "tokenizer.json"))
            except BaseException:  # noqa: B036  (some of its refusals are Rust panics)
                lenient.append(what)
            else:
                if o.encode(TEXT, add_special_tokens=False).ids != ids:
                    failures.append(f"{what}: encodes differently from tokenizers")
        except (TokenizerError, OSError) as e:
            outcome = "TokenizerError" if isinstance(e, TokenizerError) else "OSError"
            if "\n" in str(e):
                failures.append(f"{what}: a message of several lines: {str(e)[:200]}")
        except BaseException as e:  # noqa: B036  (MemoryError, RecursionError, ...: exactly what must not escape)
            outcome = type(e).__name__
            failures.append(f"{what}: {type(e).__name__}: {str(e)[:200]}")
        dt = time.perf_counter() - t
        slowest = max(slowest, (dt, what))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(d)
    return {"outcomes": outcomes, "failures": failures, "lenient": lenient, "slowest": slowest,
            "seconds": time.perf_counter() - t_all, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb():
    """This process's peak resident memory. Linux keeps ru_maxrss across fork and exec, so a subprocess
    of pytest (with torch loaded, ~270 MB) would report its parent's peak: VmHWM, the high-water mark of
    this process's own memory since exec, is the number; ru_maxrss where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


FUZZ = f"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({2 << 30}, {2 << 30}))
sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]
import test_hostile_tokenizer as t
print(json.dumps(t.fuzz(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])))
"""


def test_fuzz_mutated_tokenizer_files(tmp_path):
    """500 seeded mutations (byte flips, truncations, huge numbers, wrong types, deep nesting, dropped keys,
    bad bytes, renamed tokens, damaged side files), in one subprocess limited to 2 GB of address space:
    only TokenizerError or OSError escapes, or the file loads and encodes as `tokenizers` does; each
    within a second, all within 30 s, the process's peak RSS under 300 MB."""
    r = subprocess.run([sys.executable, "-c", FUZZ, "500", "29", str(tmp_path)], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "RUST_BACKTRACE": "0"}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout.splitlines()[-1])
    print(f"\nfuzz: {s['outcomes']} in {s['seconds']:.1f} s, slowest {s['slowest'][0]:.2f} s ({s['slowest'][1]}), "
          f"peak RSS {s['peak_rss_mb']:.0f} MB; loaded where tokenizers refuses: {len(s['lenient'])}")
    assert not s["failures"], "\n".join(s["failures"][:20])
    assert s["outcomes"].get("TokenizerError", 0) > 100 and s["outcomes"].get("loaded, round trip exact", 0) > 10
    assert s["slowest"][0] < 1.0 and s["seconds"] < 30
    assert s["peak_rss_mb"] < 300


# ------------------------------------------------------------------------------------ a real command line

def test_bad_tokenizers_through_the_command_line(tmp_path):
    """`python data.py preview FILE --tokenizer DIR`: exit status 2 and one line, `error: ...`."""
    records = tmp_path / "train.jsonl"
    records.write_text(json.dumps({"id": "a", "dataset": "d", "context": ["Hi"], "response": "Hello.",
                                   "axis": "naturalness", "label": 4, "explanation": "Fine."}) + "\n")
    huge = write(tmp_path / "huge", edited(lambda tj: tj["model"]["vocab"].update(at=300_000_000)), config=CONFIG)
    write(tmp_path / "config", BASE, config=b'{"chat_template": "\xff"}')
    for folder, expect in ((tmp_path / "huge", f"error: {huge}: model.vocab['at'] has id 300000000, outside 0..263"),
                           (tmp_path / "config", f"error: {tmp_path / 'config' / 'tokenizer_config.json'}: not UTF-8")):
        r = subprocess.run([sys.executable, "data.py", "preview", str(records), "--tokenizer", str(folder)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(expect), r.stderr[-1000:]
