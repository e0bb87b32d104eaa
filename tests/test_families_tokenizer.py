"""Llama-3 and Qwen2 byte-level BPE (issue 28), built as the families ship them, against `tokenizers`,
`transformers` and each other.

Each family's tokenizer.json is rebuilt here with the structure of the real one (Llama-3.1-8B-Instruct,
Qwen2.5-7B-Instruct): pre_tokenizer Sequence[Split(the family's pattern, Isolated), ByteLevel without
its regex], a ByteLevel decoder, the post_processor (Llama-3: ByteLevel then TemplateProcessing that
puts <|begin_of_text|> first; Qwen2: ByteLevel), Qwen2's NFC normalizer and Llama-3's ignore_merges,
around a small BPE trained here with BpeTrainer on chit-chat turns, and the family's special tokens
added after the vocabulary as in the real files; tokenizer_config.json holds the real chat template.
The same vocabulary is written as a GGUF file as llama.cpp's converter writes it (model gpt2, pre
llama-bpe / qwen2, token types, merges, special ids, no tensors). Checked here:
  - the two split patterns are the families' (as transformers states them) and split as `tokenizers` does
  - ids equal `tokenizers`' on held-out chit-chat turns and a stress list, and decode round-trips
  - the GGUF file gives the same ids, special ids, template and chat prompts
  - chat() equals transformers' apply_chat_template with the real Llama-3, Llama-3.1 and Qwen2.5 templates
  - ratings 1-5 are 'Ġ' and one digit token each, and build_examples reads the rating there
"""
import inspect
import json
import unicodedata

import gguf
import pytest
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Oracle

import data
from test_tokenizer import STRESS, TEXTS, turns
from tokenizer import LLAMA3_PATTERN, PRE_TOKENIZERS, QWEN2_PATTERN, Tokenizer, TokenizerError, _compile, byte_chars

# The Split patterns of Meta-Llama-3.1-8B's and Qwen2.5-7B-Instruct's tokenizer.json, written out here so
# that tokenizer.py's constants are checked against them, not against themselves
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

FAMILIES = {  # special tokens in their order in the real files (Llama-3.1: ids 128000...; Qwen2.5: 151643...)
    "llama3": dict(pattern=LLAMA3_SPLIT, pre="llama-bpe", arch="llama",
                   specials=["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                             "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"], added=[]),
    "qwen2": dict(pattern=QWEN2_SPLIT, pre="qwen2", arch="qwen2",
                  specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                            "<|object_ref_end|>"], added=["<tool_call>", "</tool_call>"]),  # added: not special
}

FAMILY_STRESS = [
    # digit runs of 1 to 7 (Llama-3: threes from the left; Qwen2: one by one), other scripts' digits
    "1", "12", "123", "1234", "12345", "123456", "1234567", "a1234567b", " 1234567 ", "x 12 345 6789",
    "3.14159265", "2024-05-02", "٣٤٥٦٧", "１２３４５", "x²³⁴", "Ⅻ", "4/5", "Rating: 4", " 4", "  4",
    # contractions, upper case included (both patterns are case-insensitive there; GPT-2's is not)
    "DON'T", "I'M", "WE'LL", "SHE'D", "THEY'VE", "YOU'RE", "'S", "IT'S", "it'S", "'s'S'", "O'Neil's",
    "rock'n'roll", "'ll've", "it'ſ", "it'ſx", "IT'Sx", "WE'LLx", "don’t",  # 'ſ folds to 's, as in Oniguruma
    # whitespace runs, tabs, newlines, CR
    "\t\t\tindent", "a \t\n b", "line1\r\n\r\nline2", " \n \n ", "x   \n\n   y", "\n\n\n\n", "a\t\tb  c   d",
    "end \n", "   ",
    # code
    "def f(x):\n\treturn {'a': [1, 2, 3]}\n", "for (int i = 0; i < 10; ++i) {\n    x += i;\n}",
    "<div class=\"a\">&nbsp;</div>", "SELECT * FROM t WHERE id=42;", "x=>x**2 // ok", "#!/bin/sh\necho $HOME",
    # accents precomposed and decomposed (Qwen2's NFC composes the latter), CJK, emoji
    "naïve café", "cafe\u0301", "A\u030a Å", "한국어 텍스트", "中文字符测试。", "日本語のテキスト", "🤖👍🏽🇫🇷", "👨\u200d👩\u200d👧",
    # the families' special tokens in text, and near misses
    "<|begin_of_text|>hi<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<|im_start|>user\nhi<|im_end|>\n", "<tool_call>{\"a\": 1}</tool_call>", "<|eot_id", "<|im_end|><|eot_id|>",
]

WHOLE_WORDS = [" unbelievable", " extraordinary", " Wednesday", " 日本語", "123", "'LL", " ?!"]
FAMILY_STRESS.append("An unbelievable, extraordinary Wednesday: 日本語 123 WE'LL go ?!")
N_TRAIN, N_HELD_OUT = 5000, 1000


@pytest.fixture(scope="module")
def chitchat():
    return turns(N_TRAIN + N_HELD_OUT)


def texts(chitchat):
    """Held-out chit-chat turns (the BPE never saw them) and the stress lists."""
    return chitchat[N_TRAIN:] + TEXTS + STRESS + FAMILY_STRESS


def spelled(text):
    """text in GPT-2's byte characters, as byte-level vocabularies spell it (' 日' -> 'ĠæĹ¥')."""
    return "".join(byte_chars()[b] for b in text.encode("utf-8"))


def family_tokenizer(name, corpus):
    """A `tokenizers` Tokenizer shaped like the family's tokenizer.json, its BPE trained on corpus."""
    llama, fam = name == "llama3", FAMILIES[name]
    o = Oracle(models.BPE())
    o.normalizer = None if llama else normalizers.NFC()
    o.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(fam["pattern"]), "isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=llama, use_regex=False)])
    o.decoder = (decoders.ByteLevel() if llama else
                 decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False))
    o.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=3000, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    # whole words in the vocabulary that the merges do not build, as real vocabularies have: Llama-3
    # (ignore_merges) takes such a word as one token, Qwen2 spells it with the merges
    tj = json.loads(o.to_str())
    for word in WHOLE_WORDS:
        tj["model"]["vocab"].setdefault(spelled(word), len(tj["model"]["vocab"]))
    o = Oracle.from_str(json.dumps(tj))
    o.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in fam["specials"]])
    o.add_tokens([AddedToken(t, special=False, normalized=False) for t in fam["added"]])
    if llama:
        o.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                          pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                          special_tokens=[("<|begin_of_text|>", o.token_to_id("<|begin_of_text|>"))])])
    else:
        o.post_processor = processors.ByteLevel(trim_offsets=False)
    tj = json.loads(o.to_str())
    tj["model"]["ignore_merges"] = llama  # Llama-3: a word in the vocabulary is one token, merges or not
    if not llama:
        tj["model"].update(continuing_subword_prefix="", end_of_word_suffix="")  # as Qwen2's file has them
    return tj


def write_gguf(path, name, tj, o, pre=None):
    """The vocabulary as llama.cpp's converter writes it: tokens by id, types (1 normal, 3 control for
    special tokens, 4 user-defined for the other added ones), 'left right' merges, special ids."""
    fam, n = FAMILIES[name], o.get_vocab_size()
    tokens = [o.id_to_token(i) for i in range(n)]
    types = [3 if t in fam["specials"] else 4 if t in fam["added"] else 1 for t in tokens]
    w = gguf.GGUFWriter(str(path), fam["arch"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre or fam["pre"])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) for m in tj["model"]["merges"]])
    if name == "llama3":  # no add_bos key: llama.cpp adds bos for llama-bpe unless told otherwise
        w.add_bos_token_id(o.token_to_id("<|begin_of_text|>"))
        w.add_eos_token_id(o.token_to_id("<|eot_id|>"))
        w.add_chat_template(LLAMA31_TEMPLATE)
    else:
        w.add_bos_token_id(o.token_to_id("<|endoftext|>"))
        w.add_eos_token_id(o.token_to_id("<|im_end|>"))
        w.add_pad_token_id(o.token_to_id("<|endoftext|>"))
        w.add_add_bos_token(False)
        w.add_chat_template(QWEN25_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def family(request, chitchat, tmp_path_factory):
    """(name, Hugging Face folder, GGUF path, `tokenizers` oracle) of one family's tokenizer."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    tj = family_tokenizer(name, chitchat[:N_TRAIN])
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    config = ({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA31_TEMPLATE,
               "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True}
              if name == "llama3" else
              {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
               "chat_template": QWEN25_TEMPLATE, "tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": False,
               "clean_up_tokenization_spaces": False, "errors": "replace", "split_special_tokens": False})
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    o = Oracle.from_file(str(folder / "tokenizer.json"))
    return name, folder, write_gguf(folder / f"{name}.gguf", name, tj, o), o


# ------------------------------------------------------------------------------------ the patterns

def test_patterns_are_the_families_and_split_as_tokenizers_does():
    pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import TikTokenConverter  # Llama-3's pattern is its default
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    llama3 = inspect.signature(TikTokenConverter).parameters["pattern"].default
    assert LLAMA3_PATTERN == LLAMA3_SPLIT == llama3
    assert QWEN2_PATTERN == QWEN2_SPLIT == PRETOKENIZE_REGEX
    for name, fam in FAMILIES.items():
        ref, ours = pre_tokenizers.Split(Regex(fam["pattern"]), "isolated"), _compile(PRE_TOKENIZERS[fam["pre"]][1])
        for text in TEXTS + STRESS + FAMILY_STRESS:
            assert ours.findall(text) == [s for s, _ in ref.pre_tokenize_str(text)], (name, text)
    llama, qwen = _compile(LLAMA3_PATTERN), _compile(QWEN2_PATTERN)
    assert llama.findall("1234567 DON'T it'S") == ["123", "456", "7", " DON", "'T", " it", "'S"]
    assert qwen.findall("1234567 DON'T") == ["1", "2", "3", "4", "5", "6", "7", " DON", "'T"]
    assert llama.findall("Rating: 4") == qwen.findall("Rating: 4") == ["Rating", ":", " ", "4"]


# ----------------------------------------------------------------------------- ids and round trips

def test_tokenizer_json_matches_tokenizers(family, chitchat):
    name, folder, _, o = family
    tok = Tokenizer(str(folder))
    bos = o.token_to_id("<|begin_of_text|>")
    expect = (("bpe", "llama-bpe", o.get_vocab_size(), bos, o.token_to_id("<|eot_id|>"), True, "llama3")
              if name == "llama3" else
              ("bpe", "qwen2", o.get_vocab_size(), None, o.token_to_id("<|im_end|>"), False, "chatml"))
    assert (tok.kind, tok.pre, tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos, tok.template) == expect
    if name == "qwen2":
        assert tok.pad_id == o.token_to_id("<|endoftext|>")
    for text in texts(chitchat):
        ids = tok.encode(text)
        assert ids == o.encode(text, add_special_tokens=False).ids, (name, text)
        assert tok.encode(text, bos=True) == o.encode(text).ids, (name, text)  # the post-processor's bos
        # lossless, up to Qwen2's NFC (which `tokenizers` applies too)
        assert tok.decode(ids) == o.decode(ids, skip_special_tokens=False), (name, text)
        assert tok.decode(ids) == (text if name == "llama3" else unicodedata.normalize("NFC", text)), (name, text)
    whole = [tok.token_id(spelled(w)) for w in WHOLE_WORDS]
    used = set(tok.encode(FAMILY_STRESS[-1]))
    assert (len(used & set(whole)) == len(WHOLE_WORDS)) if name == "llama3" else not used & set(whole[:4])
    if name == "qwen2":  # NFC first; an added token that is not special is still matched whole
        assert tok.encode("cafe\u0301") == tok.encode("café")
        assert [tok.piece(i) for i in tok.encode("<tool_call>x")] == ["<tool_call>", "x"]


def test_gguf_file_equals_tokenizer_json(family, chitchat):
    name, folder, path, o = family
    hf, tok = Tokenizer(str(folder)), Tokenizer(path)
    assert (tok.kind, tok.pre, tok.vocab_size, tok.eos_id, tok.add_bos, tok.template) == \
        (hf.kind, hf.pre, hf.vocab_size, hf.eos_id, hf.add_bos, hf.template)
    # Qwen2's GGUF names <|endoftext|> as bos (its tokenizer_config.json names none); neither adds it
    assert tok.bos_id == (hf.bos_id if name == "llama3" else o.token_to_id("<|endoftext|>"))
    assert tok.pad_id == (hf.pad_id if name == "qwen2" else tok.eos_id)  # Llama-3 states no pad token
    specials = FAMILIES[name]["specials"]
    assert tok.ordinary_ids() == [i for i in range(o.get_vocab_size()) if o.id_to_token(i) not in specials]
    for text in texts(chitchat):
        assert tok.encode(text, bos=True) == hf.encode(text, bos=True), (name, text)
    for system in (None, "Be brief."):
        assert tok.chat("Hi 👋, rate 4 of 5", system=system) == hf.chat("Hi 👋, rate 4 of 5", system=system)


def test_gguf_pre_names_as_llama_cpp_reads_them(family, tmp_path):
    """'llama3' and 'llama-v3' are older names of llama-bpe; a name this tokenizer does not know is one
    error naming it, never a silent fallback to another pattern."""
    name, folder, path, o = family
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    ref = Tokenizer(path)
    for pre in ("llama3", "llama-v3") if name == "llama3" else ():
        tok = Tokenizer(write_gguf(tmp_path / f"{pre}.gguf", name, tj, o, pre=pre))
        assert tok.pre == "llama-bpe" and tok.encode("x 1234567 DON'T") == ref.encode("x 1234567 DON'T")
    with pytest.raises(TokenizerError, match=r"deepseek\.gguf: pre-tokenizer 'deepseek-llm' is not one"):
        Tokenizer(write_gguf(tmp_path / "deepseek.gguf", name, tj, o, pre="deepseek-llm"))


# ----------------------------------------------------------------------------------- chat formats

def hf_chat(folder, template, messages):
    """transformers' apply_chat_template ids for messages, with the generation prompt. transformers reads
    the folder itself: Qwen2Tokenizer rebuilds its own NFC + Split + ByteLevel around the vocabulary."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    out = hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_chat_formats_equal_apply_chat_template(family):
    """chat(text, system) against the real templates: Llama-3's (no system block unless given), Llama-3.1's
    (a system block always, opened by its two date lines), Qwen2.5's (its default system prompt when
    none is given). The text is a prompt body as data.py writes it, with a trailing space that Llama-3's
    templates strip."""
    pytest.importorskip("jinja2")
    name, folder, path, _ = family
    text = "Rate the response's naturalness from 1 to 5.\n\nUser: Où est la gare ? 🚉\nResponse: DON'T know, 42! "
    user = [{"role": "user", "content": text}]
    with_system = [{"role": "system", "content": "Be brief."}] + user
    for tok in (Tokenizer(str(folder)), Tokenizer(path)):
        if name == "llama3":
            assert tok.template == "llama3" and tok.chat(text) == tok.chat(text, template="llama3")
            assert tok.chat(text) == hf_chat(folder, LLAMA3_TEMPLATE, user)
            assert tok.chat(text, system="Be brief.") == hf_chat(folder, LLAMA3_TEMPLATE, with_system)
            assert tok.chat(text, system=LLAMA31_DATES) == hf_chat(folder, LLAMA31_TEMPLATE, user)
            assert tok.chat(text, system=LLAMA31_DATES + "Be brief.") == hf_chat(folder, LLAMA31_TEMPLATE, with_system)
            ids = tok.chat(text)
            assert ids[0] == tok.bos_id and tok.decode(ids) == (
                "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + text.strip()
                + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        else:
            assert tok.template == "chatml" and tok.chat(text) == tok.chat(text, template="chatml")
            assert tok.chat(text, system=QWEN25_SYSTEM) == hf_chat(folder, QWEN25_TEMPLATE, user)
            assert tok.chat(text, system="Be brief.") == hf_chat(folder, QWEN25_TEMPLATE, with_system)
            assert tok.decode(tok.chat(text)) == f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def test_ratings_are_one_digit_token_after_the_space(family):
    """'Ġ' then the digit, in both families (neither pattern joins a space to a digit), which
    data._rating_split checks; the rating examples use the checkpoint's chat format (--template auto)
    and read the rating at the 'Ġ'."""
    name, folder, path, _ = family
    for tok in (Tokenizer(str(folder)), Tokenizer(path)):
        assert [[tok.piece(i) for i in tok.spaced(str(r))] for r in range(1, 6)] == [["Ġ", d] for d in "12345"]
        ids = data.rating_token_ids(tok)
        assert [tok.piece(i) for i in ids] == ["1", "2", "3", "4", "5"]
        assert tok.encode("Rating: 4") == tok.encode("Rating:") + tok.spaced("4")
        assert data.resolve_template("auto", tok) == ("llama3" if name == "llama3" else "chatml")
        r = data.check_record({"id": "a", "dataset": "d", "context": ["Hi there!", "Hello, how are you?"],
                               "response": "Fine, thanks. ", "axis": "naturalness", "label": 4,
                               "explanation": "Fluent and idiomatic, though a little curt."})
        (e,) = data.build_examples([r], tok, "explanation")
        prompt = e.input_ids[:e.n_prompt]
        assert prompt == tok.chat(data._prompt_body(r, data.AXES)) + tok.continuation("Rating:")
        assert tok.decode(prompt).endswith(("<|end_header_id|>\n\nRating:" if name == "llama3" else
                                            "<|im_start|>assistant\nRating:"))
        assert tok.piece(e.input_ids[e.decision_pos]) == "Ġ" and e.input_ids[e.decision_pos + 1] == ids[3]
        target = " 4\nExplanation: Fluent and idiomatic, though a little curt." + tok.decode([tok.eos_id])
        assert tok.decode(e.input_ids[e.n_prompt:]) == target


# ------------------------------------------------------------------------ the real chat templates

# Meta-Llama-3-8B-Instruct's chat_template
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
                   "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA31_DATES = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"  # its system block opens so
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."  # its default system prompt

# Meta-Llama-3.1-8B-Instruct's chat_template, as its tokenizer_config.json holds it (date fixed to the
# template's own fallback)
LLAMA31_TEMPLATE = r'''{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
'''

# Qwen2.5-7B-Instruct's chat_template
QWEN25_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''
