r"""tokenizer.py: one Tokenizer over the two vocabularies Llama-family checkpoints ship, and their chat formats.

  SentencePiece     a tokenizer.model file (Llama-2, Mistral), or a GGUF "llama" vocabulary, which is
                    turned back into a SentencePiece model in memory (the protobuf written by hand below)
  byte-level BPE    a Hugging Face tokenizer.json (GPT-2 style), or a GGUF "gpt2" vocabulary (SmolLM2,
                    Llama-3.x, Qwen2.5), encoded here in plain Python: special tokens cut out whole,
                    NFC (Qwen2), the pre-tokenizer's regex, bytes -> GPT-2's printable characters,
                    then merges by rank

Every kind answers the same calls:

    tok = Tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")   # or a folder, tokenizer.model, tokenizer.json
    tok.encode("Rating: 4")        # [49152-vocab ids]; bos=True adds <s> only where the vocabulary's
                                   # convention does (SentencePiece yes, SmolLM2 no); eos=True appends eos
    tok.decode(ids)                # lossless for ordinary text
    tok.spaced("4")                # " 4" after other text: ['Ġ', '4'] (SmolLM2), ['▁', '4'] (Mistral)
    tok.continuation("\nRating:")  # text glued to what precedes it (no SentencePiece dummy prefix)
    tok.chat("Hi", system=None)    # one user turn + the start of the reply, in tok.template
                                   # ("chatml", "llama3" or "inst", detected from the checkpoint)

Pre-tokenizers known here (others are refused, naming them): "gpt2", "smollm" (each digit alone, then
GPT-2's pattern), "llama-bpe" (Llama-3's pattern: digits in runs of up to three; GGUF also names it
"llama3" or "llama-v3") and "qwen2" (the same with each digit alone, after NFC). Python's `re` has no
\p{L} or \p{N}, so those classes are built once from `unicodedata`; \s is Unicode's White_Space, as
the reference regex engine (Oniguruma, used by `tokenizers`) has it, not Python's str.isspace (which adds
\x1c-\x1f). The contractions' (?i:...) is Python's own scoped flag, which folds case as Oniguruma does
('S, 'LL, and 'ſ too; llama.cpp's hand-written [sS] skips that last one).

A tokenizer file is input, and may be broken or hostile: every value read from a tokenizer.json, a
tokenizer_config.json, a chat_template.jinja or a GGUF's tokenizer keys is checked for type and range
before it is used, so a bad file is one TokenizerError naming the file and the field, token, merge or
id (which a command prints as one line, `error: ...`). What the `tokenizers` library refuses in a
tokenizer.json is refused (no merges, a merge of or into a token outside the vocabulary, ids that are
negative or not integers, added tokens without content or id, lone surrogates), and so is what it
accepts and then gets wrong: two tokens on one id, vocabulary ids other than 0..N-1, added-token ids
other than the ones it assigns. No table is sized by a number the file states.

Left out on purpose: normalizers other than Qwen2's NFC (the other byte-level BPE vocabularies of these
families have none), WordPiece and Unigram vocabularies, BPE dropout, and rendering arbitrary Jinja chat
templates: only the three formats the project prompts with ([INST], ChatML, Llama-3's headers), with a
template's default system prompt written only when passed. Nothing here imports torch.

Length: ~810 lines: the two encoders (~230: the SentencePiece protobuf, byte-level BPE in plain Python),
the loaders (~300, two thirds of them the checks above), and the Tokenizer interface (~220).
"""
import array
import functools
import json
import os
import re
import struct
import unicodedata

import sentencepiece as spm

import cli
import gguf_file

CHAT_TEMPLATES = ("inst", "chatml", "llama3")  # the formats chat() writes; tok.template is one of these or None


class TokenizerError(cli.Error, ValueError):
    """A tokenizer file that cannot be used; the message is one line naming the file."""


# ---------------------------------------------------- SentencePiece model from a GGUF vocabulary
# A SentencePiece .model file is one protobuf message (sentencepiece_model.proto):
#   ModelProto      1: repeated SentencePiece {1: piece, 2: score (float), 3: type (enum)}
#                   2: TrainerSpec {3: model_type (BPE = 2), 35: byte_fallback, 40-43: unk/bos/eos/pad id,
#                                   45-48: unk/bos/eos/pad piece}
#                   3: NormalizerSpec {1: name, 3: add_dummy_prefix, 4: remove_extra_whitespaces,
#                                      5: escape_whitespaces}
# GGUF token types are SentencePiece's piece types: 1 normal, 2 unknown, 3 control, 4 user-defined,
# 5 unused, 6 byte. Wire format: key = field << 3 | wire type (0 varint, 2 length-delimited, 5 float32).

def _varint(n):
    n &= (1 << 64) - 1  # a negative int32 (pad_id -1) is its 64-bit two's complement: ten bytes
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _pb_int(field, v):
    return _varint(field << 3) + _varint(int(v))


def _pb_bytes(field, b):
    b = b.encode("utf-8") if isinstance(b, str) else b
    return _varint(field << 3 | 2) + _varint(len(b)) + b


def _pb_float(field, x):
    return _varint(field << 3 | 5) + struct.pack("<f", x)


def sentencepiece_proto(tokens, scores, types, unk_id, bos_id, eos_id, pad_id, add_dummy_prefix=True):
    """Serialized SentencePiece BPE ModelProto for a vocabulary (ids < 0: none); identity normaliser."""
    pieces = b"".join(_pb_bytes(1, _pb_bytes(1, p) + _pb_float(2, s) + _pb_int(3, t or 1))
                      for p, s, t in zip(tokens, scores, types))

    def piece(i, default):
        return tokens[i] if 0 <= i < len(tokens) else default

    trainer = (_pb_int(3, 2) + _pb_int(35, 6 in types)
               + _pb_int(40, unk_id) + _pb_int(41, bos_id) + _pb_int(42, eos_id) + _pb_int(43, pad_id)
               + _pb_bytes(45, piece(unk_id, "<unk>")) + _pb_bytes(46, piece(bos_id, "<s>"))
               + _pb_bytes(47, piece(eos_id, "</s>")) + _pb_bytes(48, piece(pad_id, "<pad>")))
    normalizer = _pb_bytes(1, "identity") + _pb_int(3, add_dummy_prefix) + _pb_int(4, 0) + _pb_int(5, 1)
    return pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)


# ---------------------------------------------------------------------------------- byte-level BPE

@functools.cache
def byte_chars():
    """GPT-2's table: byte -> a printable character. Printable Latin-1 bytes stand for themselves; the
    68 others (controls, space, 0x7f-0xa0, 0xad) take U+0100 onwards in order, so ' ' -> 'Ġ', '\\n' -> 'Ċ'."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return "".join(out[b] for b in range(256))


# Unicode White_Space (what Oniguruma's \s matches): tab..CR, space, NEL, and the Zs/Zl/Zp separators
_WHITE_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
                (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]


@functools.cache
def _classes():
    """Bodies of regex character classes for \\p{L}, \\p{N} and \\s, built once from unicodedata."""
    ranges = {"L": [], "N": []}
    for cp in range(0x110000):
        r = ranges.get(unicodedata.category(chr(cp))[0])
        if r is not None:
            if r and r[-1][1] == cp - 1:
                r[-1][1] = cp
            else:
                r.append([cp, cp])
    ranges["s"] = _WHITE_SPACE

    def body(rs):
        return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in rs)
    return {k: body(v) for k, v in ranges.items()}


# The split patterns as the families' tokenizer.json files state them (llama.cpp's llama-vocab.cpp quotes
# the same two as the originals of its LLAMA3 and QWEN2 pre-tokenizers). Llama-3 and Qwen2 differ only in
# digits: runs of up to three (Llama-3) or one at a time (Qwen2). In both, a space joins the letters or
# punctuation after it but never a digit: ' 4' is ' ' then '4', so a rating is 'Ġ' then its digit.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {  # GGUF tokenizer.ggml.pre name -> (every digit its own piece first?, pattern)
    "gpt2": (False, GPT2_PATTERN),
    "smollm": (True, GPT2_PATTERN),
    "llama-bpe": (False, LLAMA3_PATTERN),
    "qwen2": (False, QWEN2_PATTERN),
}
PRE_ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe"}  # older GGUF names, as llama.cpp reads them


def _compile(pattern):
    r"""A pattern in the reference notation (\p{L}, \p{N}, \s, \S) as a Python regex with explicit classes."""
    cls, out, i, depth = _classes(), [], 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            tok = pattern[i:i + 5] if pattern.startswith("\\p{", i) else pattern[i:i + 2]
            name = {"\\p{L}": "L", "\\p{N}": "N", "\\s": "s"}.get(tok)
            if name:
                out.append(cls[name] if depth else f"[{cls[name]}]")
            elif tok == "\\S" and not depth:
                out.append(f"[^{cls['s']}]")
            elif tok.startswith("\\p") or tok == "\\S":
                raise ValueError(f"pattern escape {tok!r} is not supported here")
            else:
                out.append(tok)
            i += len(tok)
            continue
        if c == "[" and not depth:  # classes do not nest; an escaped bracket took the branch above
            depth = 1
        elif c == "]" and depth:
            depth = 0
        out.append(c)
        i += 1
    return re.compile("".join(out))


class _BPE:
    """Byte-level BPE: special tokens cut out whole, NFC (Qwen2), pre-tokenizer regex, merges by rank,
    cached per word."""

    def __init__(self, tokens, merges, pre, specials=(), unk_id=None, ignore_merges=False, nfc=False):
        self.tokens = tokens                               # id -> token string (None: unused id)
        self.vocab = {t: i for i, t in enumerate(tokens) if t is not None}
        self.ranks = {pair: r for r, pair in enumerate(merges)}  # (left, right) -> merge priority
        self.unk_id, self.ignore_merges, self.nfc = unk_id, ignore_merges, nfc
        self.specials = {t.content: t for t in specials}   # matched literally in text, decoded literally
        digits, pattern = PRE_TOKENIZERS[pre]
        self.digits = _compile(r"(\p{N})") if digits else None
        self.pattern = _compile(pattern)
        self.special_re = None
        if specials:  # one group per token, longest first, so '<a>' never shadows '<a><b>'
            ws = f"[{_classes()['s']}]*"  # lstrip / rstrip: the token absorbs the whitespace beside it
            order = sorted(specials, key=lambda t: -len(t.content))
            self.special_re = re.compile("|".join(
                f"{ws if t.lstrip else ''}({re.escape(t.content)}){ws if t.rstrip else ''}" for t in order))
            self.special_ids = [t.id for t in order]  # m.lastindex - 1 -> id
        self.to_chars = {b: c for b, c in enumerate(byte_chars())}  # str.translate table: latin-1 -> GPT-2 chars
        self.to_bytes = {ord(c): b for b, c in enumerate(byte_chars())}
        self.cache = {}

    def word(self, word):
        """Ids of one pre-token, already in GPT-2 characters: merge the best-ranked adjacent pair,
        everywhere it occurs, until no pair has a rank."""
        if (ids := self.cache.get(word)) is not None:
            return ids
        if self.ignore_merges and word in self.vocab:
            parts = [word]
        else:
            parts, ranks, none = list(word), self.ranks, float("inf")
            while len(parts) > 1:
                pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, none))
                if pair not in ranks:
                    break
                a, b = pair
                out, i = [], 0
                while i < len(parts):
                    if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                        out.append(a + b)
                        i += 2
                    else:
                        out.append(parts[i])
                        i += 1
                parts = out
        vocab, unk = self.vocab, self.unk_id
        ids = tuple(vocab[p] if p in vocab else unk for p in parts if p in vocab or unk is not None)
        if len(self.cache) > 200_000:  # bounded: a long run of novel text must not grow it forever
            self.cache.clear()
        self.cache[word] = ids
        return ids

    def ordinary(self, text):
        """Ids of text that holds no special tokens."""
        if self.nfc:  # `tokenizers` normalises the text between special tokens, as here
            text = unicodedata.normalize("NFC", text)
        segments = [s for s in self.digits.split(text) if s] if self.digits else [text]
        ids = []
        for seg in segments:
            for piece in self.pattern.findall(seg):
                ids.extend(self.word(piece.encode("utf-8").decode("latin-1").translate(self.to_chars)))
        return ids

    def encode(self, text):
        if self.special_re is None:
            return self.ordinary(text)
        ids, at = [], 0
        for m in self.special_re.finditer(text):
            ids += self.ordinary(text[at:m.start()])
            ids.append(self.special_ids[m.lastindex - 1])
            at = m.end()
        return ids + self.ordinary(text[at:])

    def decode(self, ids):
        out = bytearray()
        for i in ids:
            t = self.tokens[int(i)] or ""
            if t in self.specials and self.specials[t].id == int(i):
                out += t.encode("utf-8")
                continue
            try:
                out += t.translate(self.to_bytes).encode("latin-1")
            except UnicodeEncodeError:  # a token outside the byte alphabet (an added word): its own text
                out += t.encode("utf-8")
        return out.decode("utf-8", errors="replace")


class _Added:
    """A token matched whole in text: id, content, and whether it absorbs whitespace on either side."""

    def __init__(self, id, content, special=True, lstrip=False, rstrip=False):
        self.id, self.content, self.special, self.lstrip, self.rstrip = id, content, special, lstrip, rstrip


# ------------------------------------------------------------------ loaders: every value read, checked
# (the module docstring says what is refused and why; _hf_vocab how ids are checked before any table
# is sized by them, so memory stays a small multiple of the file's size)

_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "a boolean", type(None): "null", array.array: "an array"}
_FLOAT32_MAX = 3.4028234663852886e38


def _ints(v):  # a list of ints, or a GGUF numeric array of an integer type
    return (v.typecode in "bBhHiIlLqQ" if isinstance(v, array.array)
            else isinstance(v, list) and all(type(x) is int for x in v))


def _float32s(v):  # numbers that pack as float32 (NaN and inf do; 1e300 does not)
    if isinstance(v, array.array):
        return v.typecode == "f" or not any(abs(x) > _FLOAT32_MAX for x in v)
    return isinstance(v, list) and all(type(x) in (int, float) and not abs(x) > _FLOAT32_MAX for x in v)


_IS = {  # what a field should be -> the test
    "a string": lambda v: isinstance(v, str),
    "an integer": lambda v: type(v) is int,  # not bool, not float
    "true or false": lambda v: isinstance(v, bool),
    "an object": lambda v: isinstance(v, dict),
    "a list": lambda v: isinstance(v, list),
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "a list of integers": _ints,
    "a list of float32 numbers": _float32s,
}


def _short(x, n=60):
    """A value from a file, for a one-line message: repr cut to n characters; containers by type and size."""
    if isinstance(x, (dict, list, array.array)):
        return f"{_JSON_NAMES[type(x)]} of {len(x)}"
    r = repr(x) if isinstance(x, (str, int, float, type(None))) else _JSON_NAMES.get(type(x), type(x).__name__)
    return r if len(r) <= n else r[:n - 3] + "..."


def _get(obj, key, want, file, where="", default=None, required=False):
    """obj[key] checked to be `want` (a key of _IS); `default` when absent or null, or an error if required."""
    v = obj.get(key)
    if v is None:
        if required:
            raise TokenizerError(f"{file}: no {where}{key}" + (" (null)" if key in obj else ""))
        return default
    if not _IS[want](v):
        raise TokenizerError(f"{file}: {where}{key} is {_short(v)}, not {want}")
    return v


def _check_text(s, file, where):
    """A token's text must be Unicode that UTF-8 can carry: JSON can spell a lone surrogate (\\ud800),
    Rust strings (`tokenizers`) and this tokenizer's byte output cannot."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise TokenizerError(f"{file}: {where} {_short(s)} is not valid Unicode (a lone surrogate)") from None


def _read_json(file):
    """A JSON file's value; not UTF-8, not JSON, nested past Python's recursion limit or holding an
    integer of more than 4300 digits (int() refuses those) are each one TokenizerError."""
    try:
        with open(file, "rb") as f:
            text = f.read().decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{file}: not UTF-8 text ({e})") from None
    except RecursionError:
        raise TokenizerError(f"{file}: JSON nested too deeply to read") from None
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError, and so are 5000-digit numbers
        raise TokenizerError(f"{file}: not a JSON file ({str(e).splitlines()[0][:200]})") from None


def _template_kind(template, file, field="chat_template"):
    """'chatml', 'llama3' or 'inst' from a Jinja chat template's text, None when it is none (or absent)."""
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        named = {}
        for t in template:
            if not (isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)):
                raise TokenizerError(f"{file}: {field} entry {_short(t)} is not "
                                     '{"name": "...", "template": "..."}')
            named.setdefault(t["name"], t["template"])
        template = named.get("default") or next(iter(named.values()), None)
    if template is None:
        return None
    if not isinstance(template, str):
        raise TokenizerError(f"{file}: {field} is {_short(template)}, not a string")
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    if "[INST]" in template:
        return "inst"
    return None


def _config_beside(file):
    """tokenizer_config.json next to a tokenizer file ({} when absent), with a chat_template.jinja
    beside it (newer Hugging Face folders) taking the place of its chat_template; the fields read
    from it checked, and its template detected: (config, "chatml" / "llama3" / "inst" / None)."""
    folder = os.path.dirname(os.path.abspath(file))
    cfg_file = os.path.join(folder, "tokenizer_config.json")
    cfg = _read_json(cfg_file) if os.path.isfile(cfg_file) else {}
    if not isinstance(cfg, dict):
        raise TokenizerError(f"{cfg_file}: expected a JSON object")
    for key in ("bos_token", "eos_token", "pad_token"):
        v = cfg.get(key)
        if not (v is None or isinstance(v, str) or isinstance(v, dict) and isinstance(v.get("content"), str)):
            raise TokenizerError(f'{cfg_file}: {key} is {_short(v)}, not a token string or {{"content": "..."}}')
    _get(cfg, "add_bos_token", "true or false", cfg_file)
    template = _template_kind(cfg.get("chat_template"), cfg_file)
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        try:
            with open(jinja, "rb") as f:
                template = _template_kind(f.read().decode("utf-8"), jinja)
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{jinja}: not UTF-8 text ({e})") from None
    return cfg, template


def _token_text(v):
    """A tokenizer_config token entry: "<s>" or {"content": "<s>", ...} or None."""
    return v.get("content") if isinstance(v, dict) else v


def _json_text(x, n=200):
    """A JSON value as compact text for a message, cut to n characters."""
    try:
        return json.dumps(x, separators=(",", ":"))[:n]
    except (RecursionError, ValueError):
        return _short(x)


def _hf_pre_name(pre, file):
    """The PRE_TOKENIZERS name of a tokenizer.json pre_tokenizer, or a TokenizerError naming it."""
    def obj(x):  # a step of the wrong shape matches nothing (and is named in the error)
        return x if isinstance(x, dict) else {}

    def bytelevel(p, regex):
        return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space", False)
                and p.get("use_regex", True) == regex)

    steps = obj(pre).get("pretokenizers") if obj(pre).get("type") == "Sequence" else [pre]
    steps = [obj(s) for s in steps] if isinstance(steps, list) else []
    if len(steps) == 1 and bytelevel(steps[0], True):
        return "gpt2"
    if len(steps) == 2:
        a, b = steps
        if a.get("type") == "Digits" and a.get("individual_digits") is True and bytelevel(b, True):
            return "smollm"
        split = {LLAMA3_PATTERN: "llama-bpe", QWEN2_PATTERN: "qwen2"}.get(obj(a.get("pattern")).get("Regex"))
        if (a.get("type") == "Split" and split and a.get("behavior") == "Isolated" and not a.get("invert")
                and bytelevel(b, False)):
            return split
    raise TokenizerError(f"{file}: pre_tokenizer {_json_text(pre)} is not one this tokenizer knows "
                         f"(byte-level BPE with {', '.join(PRE_TOKENIZERS)})")


def _hf_bos(post, file):
    """Content of the special token a tokenizer.json post_processor puts before every sequence, or None.
    Sequence processors are walked with a list, not recursion (a file may nest them deeply)."""
    todo = [post]
    while todo:
        p = todo.pop()
        if not isinstance(p, dict):
            continue
        if p.get("type") == "Sequence" and isinstance(p.get("processors"), list):
            todo.extend(reversed(p["processors"]))  # the first processor first
        elif p.get("type") == "TemplateProcessing":
            single = p.get("single")
            first = single[0] if isinstance(single, list) and single else None
            if isinstance(first, dict) and "SpecialToken" in first:
                special = first["SpecialToken"]
                if not (isinstance(special, dict) and isinstance(special.get("id"), str)):
                    raise TokenizerError(f"{file}: post_processor SpecialToken {_json_text(special, 80)} "
                                         f'is not {{"id": "...", ...}}')
                return special["id"]
    return None


def _hf_merges(model, file):
    """model.merges as (left, right) pairs, from [left, right] lists or 'left right' strings (older
    files). A BPE model without merges is refused, as `tokenizers` refuses it; an empty list is a vocabulary
    that never merges, which it accepts."""
    merges = _get(model, "merges", "a list", file, "model.", required=True)
    out = []
    for r, m in enumerate(merges):
        pair = m.split(" ") if isinstance(m, str) else m
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise TokenizerError(f"{file}: model.merges[{r}] is {_short(m)}, not 'left right' or [left, right]")
        out.append((pair[0], pair[1]))
    return out


def _check_merges(merges, vocab, file, field):
    """Each merge joins two vocabulary tokens into a third that is in the vocabulary too, as `tokenizers`
    requires: a merge into a missing token would turn text into nothing (no id), lost on the round trip."""
    for r, (a, b) in enumerate(merges):
        for t, role in ((a, "left part"), (b, "right part"), (a + b, "result")):
            if t not in vocab:
                raise TokenizerError(f"{file}: {field}[{r}] ({_short(a, 30)}, {_short(b, 30)}): its {role} "
                                     f"{_short(t, 40)} is not in the vocabulary")


def _hf_vocab(vocab, added, file):
    """(id -> token table, added tokens) of model.vocab and added_tokens, numbered as `tokenizers` numbers
    them: vocabulary ids run 0..N-1, each once (a gap would be taken by an added token, two tokens on one id
    decode as one of them); an added token already in the vocabulary keeps that id, the others take N,
    N+1, ... in the order listed. The table has one entry per entry of the file, and every id is checked
    before it is placed: an id of 3e8 is refused, not a 2.4 GB list."""
    n = len(vocab)
    tokens = [None] * n
    for t, i in vocab.items():
        if type(i) is not int:
            raise TokenizerError(f"{file}: model.vocab[{_short(t)}] is {_short(i)}, not an integer id")
        if not 0 <= i < n:
            raise TokenizerError(f"{file}: model.vocab[{_short(t)}] has id {_short(i)}, outside 0..{n - 1} "
                                 f"(the ids of {n} tokens run 0..{n - 1}, each once)")
        if tokens[i] is not None:
            raise TokenizerError(f"{file}: model.vocab tokens {_short(tokens[i])} and {_short(t)} share id {i}")
        _check_text(t, file, "model.vocab token")
        tokens[i] = t
    specials, ids = [], {}  # content -> id, of the added tokens so far
    for k, a in enumerate(added):
        where = f"added_tokens[{k}]."
        if not isinstance(a, dict):
            raise TokenizerError(f"{file}: added_tokens[{k}] is {_short(a)}, not an object")
        content = _get(a, "content", "a string", file, where, required=True)
        i = _get(a, "id", "an integer", file, where, required=True)
        flags = {f: _get(a, f, "true or false", file, where, False)
                 for f in ("special", "lstrip", "rstrip", "single_word", "normalized")}
        if flags["single_word"]:
            raise TokenizerError(f"{file}: added tokens with single_word=true are not supported")
        if not content:
            raise TokenizerError(f"{file}: added_tokens[{k}] (id {_short(i)}) has empty content")
        _check_text(content, file, f"added_tokens[{k}].content")
        expect = vocab[content] if content in vocab else ids.get(content, len(tokens))
        if i != expect:
            why = ("its id in model.vocab" if content in vocab else "listed twice" if content in ids else
                   f"the next id after the {n} vocabulary tokens and the added ones listed before it")
            raise TokenizerError(f"{file}: added_tokens[{k}] {_short(content)} has id {_short(i)}, but "
                                 f"the tokenizers library numbers it {expect} ({why})")
        if content not in vocab and content not in ids:
            tokens.append(content)
        if content not in ids:
            ids[content] = i
            specials.append(_Added(i, content, flags["special"], flags["lstrip"], flags["rstrip"]))
    return tokens, specials


def _load_hf(file):
    """tokenizer.json -> (_BPE, pre name, tokenizer.json), every field it reads checked (as _hf_vocab says)."""
    tj = _read_json(file)
    if not isinstance(tj, dict) or not isinstance(tj.get("model"), dict):
        raise TokenizerError(f"{file}: not a tokenizer.json (no 'model' object)")
    model = tj["model"]
    if model.get("type", "BPE") != "BPE":
        raise TokenizerError(f"{file}: model type {_short(model.get('type'))} is not byte-level BPE")
    vocab = _get(model, "vocab", "an object", file, "model.", required=True)
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise TokenizerError(f"{file}: a SentencePiece-style BPE (byte_fallback / subword affixes); "
                             f"use the checkpoint's tokenizer.model")
    if model.get("dropout") not in (None, 0):
        raise TokenizerError(f"{file}: model.dropout {_short(model['dropout'])}: BPE dropout is not supported")
    nfc = (norm := tj.get("normalizer")) == {"type": "NFC"}  # Qwen2's; the family's others have none
    if norm is not None and not nfc:
        kind = norm.get("type") if isinstance(norm, dict) else norm
        raise TokenizerError(f"{file}: normalizer {_short(kind)} is not supported (byte-level BPE here has "
                             f"none, or NFC)")
    pre = _hf_pre_name(tj.get("pre_tokenizer"), file)
    tokens, specials = _hf_vocab(vocab, _get(tj, "added_tokens", "a list", file, default=[]), file)
    merges = _hf_merges(model, file)
    _check_merges(merges, vocab, file, "model.merges")
    # an unk_token missing from the vocabulary is no unknown token (`tokenizers` fails only when it needs it)
    unk = vocab.get(_get(model, "unk_token", "a string", file, "model."))
    ignore_merges = _get(model, "ignore_merges", "true or false", file, "model.", False)
    return _BPE(tokens, merges, pre, specials, unk, ignore_merges, nfc), pre, tj


def _gguf_merges(merges, file):
    """GGUF merges are 'left right' strings; a token may itself be a space, so split at the first
    space after the first character."""
    try:
        return [(m[:m.index(" ", 1)], m[m.index(" ", 1) + 1:]) for m in merges]
    except ValueError:
        bad = next(m for m in merges if " " not in m[1:])
        raise TokenizerError(f"{file}: tokenizer.ggml.merges entry {_short(bad)} is not 'left right'") from None


class Tokenizer:
    """SentencePiece or byte-level BPE, from tokenizer.model, tokenizer.json, a folder of either, or GGUF.

    Attributes: path (the file read), kind ("sentencepiece" or "bpe"), pre (the BPE pre-tokenizer name),
    vocab_size, bos_id (None when the vocabulary has none), eos_id, pad_id (never None), add_bos
    (whether encode(bos=True) adds bos), template ("inst", "chatml", "llama3" or None), and sp (the
    SentencePieceProcessor) or bpe (the byte-level encoder)."""

    def __init__(self, path):
        file = path
        if os.path.isdir(path):
            file = next((f for f in (os.path.join(path, n) for n in ("tokenizer.model", "tokenizer.json"))
                         if os.path.isfile(f)), os.path.join(path, "tokenizer.model"))
            if not os.path.isfile(file):
                raise TokenizerError(f"{file}: no such tokenizer file (nor tokenizer.json)")
        if not os.path.isfile(file):
            raise TokenizerError(f"{file}: no such tokenizer file")
        with open(file, "rb") as f:
            head = f.read(4)
        self.path, self.sp, self.bpe, self.template = file, None, None, None
        if head == gguf_file.MAGIC or file.endswith(".gguf"):
            self._init_gguf(file)
        elif file.endswith(".json") or head.lstrip()[:1] == b"{":
            self._init_hf(file)
        else:
            self._init_sentencepiece(file)
            self.template = _config_beside(file)[1]

    # -- the three ways in
    def _init_sentencepiece(self, file, proto=None, add_bos=True, pad=-1):
        self.kind, self.add_bos, self.pre = "sentencepiece", add_bos, None
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto) if proto is not None else self.sp.Load(file)
        except (OSError, RuntimeError) as e:
            what = "its llama vocabulary is not a valid SentencePiece model" if proto else "not a SentencePiece model"
            raise TokenizerError(f"{file}: {what} ({str(e).splitlines()[0]})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id, unk = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.bos_id = self.bos_id if self.bos_id >= 0 else None
        # Llama and Mistral define no pad piece; padding is masked anyway, so any valid id will do
        # (a GGUF's padding id is taken as given: SentencePiece only reports control pieces as pad)
        pad = pad if 0 <= pad < self.vocab_size else -1
        self.pad_id = next(i for i in (pad, self.sp.pad_id(), unk, self.eos_id, 0) if i >= 0)

    def _init_gguf(self, file):
        try:
            md = gguf_file.read(file).metadata
        except gguf_file.GGUFError as e:
            raise TokenizerError(str(e)) from None

        def get(key, want, default=None):  # a GGUF may hold any type under any key
            return _get(md, "tokenizer.ggml." + key, want, file, default=default)
        model, tokens = md.get("tokenizer.ggml.model"), get("tokens", "a list of strings")
        if not tokens:
            raise TokenizerError(f"{file}: no tokenizer.ggml.tokens in the GGUF metadata")
        types = get("token_type", "a list of integers", [1] * len(tokens))
        if len(types) != len(tokens):
            raise TokenizerError(f"{file}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
        ids = {k: get(f"{k}_token_id", "an integer", -1) for k in ("bos", "eos", "padding", "unknown")}
        if model == "llama":
            scores = get("scores", "a list of float32 numbers", [0.0] * len(tokens))
            if len(scores) != len(tokens):
                raise TokenizerError(f"{file}: tokenizer.ggml.scores has {len(scores)} entries for "
                                     f"{len(tokens)} tokens")
            unk = ids["unknown"] if ids["unknown"] >= 0 else next((i for i, t in enumerate(types) if t == 2), -1)
            proto = sentencepiece_proto(tokens, scores, types, unk, ids["bos"], ids["eos"], ids["padding"],
                                        get("add_space_prefix", "true or false", True))
            self._init_sentencepiece(file, proto, get("add_bos_token", "true or false", True), ids["padding"])
        elif model == "gpt2":
            pre = get("pre", "a string", "gpt2")
            pre = PRE_ALIASES.get(pre, pre)
            if pre not in PRE_TOKENIZERS:
                raise TokenizerError(f"{file}: pre-tokenizer {_short(pre)} is not one this tokenizer knows "
                                     f"({', '.join(PRE_TOKENIZERS)})")
            merges = get("merges", "a list of strings")
            if merges is None:  # llama.cpp refuses a BPE vocabulary without merges too
                raise TokenizerError(f"{file}: no tokenizer.ggml.merges (a BPE vocabulary needs its merges)")
            merges = _gguf_merges(merges, file)
            _check_merges(merges, set(tokens), file, "tokenizer.ggml.merges")
            specials = [_Added(i, t, ty == 3) for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)]
            unk = ids["unknown"] if 0 <= ids["unknown"] < len(tokens) and types[ids["unknown"]] == 2 else None
            self.kind, self.pre, self.vocab_size = "bpe", pre, len(tokens)
            # as llama.cpp reads these vocabularies: llama-bpe ignores merges for a word in the vocabulary
            # and adds bos unless the file says otherwise; qwen2 gets the NFC its tokenizer.json states
            # (llama.cpp skips it, which only matters for text that is not NFC already)
            llama3 = pre == "llama-bpe"
            self.bpe = _BPE(list(tokens), merges, pre, specials, unk, ignore_merges=llama3, nfc=pre == "qwen2")
            self._kinds = types
            self._set_ids(ids["bos"], ids["eos"], ids["padding"], unk, get("add_bos_token", "true or false", llama3))
        else:
            raise TokenizerError(f"{file}: tokenizer.ggml.model {_short(model)} is not supported (llama or gpt2)")
        self.template = _template_kind(md.get("tokenizer.chat_template"), file, "tokenizer.chat_template")

    def _init_hf(self, file):
        self.bpe, self.pre, tj = _load_hf(file)
        cfg, self.template = _config_beside(file)
        tokens = self.bpe.tokens
        self.kind, self.vocab_size = "bpe", len(tokens)
        special = {a.id for a in self.bpe.specials.values() if a.special}
        self._kinds = [3 if i in special else 1 if t is not None else 5 for i, t in enumerate(tokens)]

        def find(name, *fallbacks):
            for content in (_token_text(cfg.get(name)), *fallbacks):
                if content is not None and (i := self.bpe.vocab.get(content)) is not None:
                    return i
            return -1
        post_bos = _hf_bos(tj.get("post_processor"), file)
        bos = find("bos_token", post_bos)
        eos = find("eos_token", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
        add_bos = cfg["add_bos_token"] if cfg.get("add_bos_token") is not None else post_bos is not None
        self._set_ids(bos, eos, find("pad_token"), self.bpe.unk_id, add_bos)

    def _set_ids(self, bos, eos, pad, unk, add_bos):
        n = self.vocab_size
        if not 0 <= eos < n:
            raise TokenizerError(f"{self.path}: no end-of-sequence token (eos id {eos}, vocabulary {n})")
        self.bos_id = bos if 0 <= bos < n else None
        self.eos_id, self.add_bos = eos, bool(add_bos) and self.bos_id is not None
        self.pad_id = next(i for i in (pad, unk if unk is not None else -1, eos, 0) if 0 <= i < n)

    def __repr__(self):
        return (f"Tokenizer({self.path!r}: {self.kind}{', pre ' + self.pre if self.pre else ''}, "
                f"{self.vocab_size} tokens, bos {self.bos_id}, eos {self.eos_id}, template {self.template})")

    # -- the interface
    def encode(self, text, bos=False, eos=False):
        if self.sp is not None:
            return self.sp.encode(text, add_bos=bos and self.add_bos, add_eos=eos)
        ids = self.bpe.encode(text)
        return ([self.bos_id] if bos and self.add_bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        if self.sp is not None:
            return self.sp.decode([int(i) for i in ids])
        return self.bpe.decode(ids)

    def piece(self, i):
        if self.sp is not None:
            return self.sp.id_to_piece(int(i))
        return self.bpe.tokens[int(i)] or ""

    def ordinary_ids(self):
        """Ids of ordinary pieces: not control, unknown, byte, unused or special."""
        if self.sp is None:
            return [i for i, k in enumerate(self._kinds) if k in (1, 4)]
        sp = self.sp
        return [i for i in range(self.vocab_size)
                if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))]

    def continuation(self, text):
        """Ids of text that directly follows other text: encode() without SentencePiece's dummy
        prefix, so '\\nRating:' after a word gives ['<0x0A>', 'R', ...], not ['▁', '<0x0A>', ...].
        Byte-level BPE has no dummy prefix: this is encode(text)."""
        ids = self.encode(text)
        if self.sp is None:
            return ids
        return ids[1:] if ids and not text.startswith(" ") and self.piece(ids[0]) == "▁" else ids

    def spaced(self, text):
        """Ids of ' ' + text where it follows other text, as a rating does after 'Rating:'.
        SentencePiece: encode(text), whose dummy prefix is that space ('4' -> ['▁', '4']);
        byte-level BPE: encode(' ' + text) (SmolLM2: ['Ġ', '4'], digits stand alone)."""
        return self.encode(text) if self.sp is not None else self.encode(" " + text)

    def token_id(self, piece):
        """Id of a piece or token string, None when the vocabulary has no such entry."""
        if self.sp is not None:
            i = self.sp.piece_to_id(piece)
            return i if self.sp.id_to_piece(i) == piece else None
        return self.bpe.vocab.get(piece)

    def instruct(self, text):
        """Ids of '<s>[INST] text [/INST]', as Llama-2-chat and Mistral-Instruct expect them.
        Newer Mistral models have [INST] and [/INST] as control pieces, which text never encodes to."""
        if self.sp is None:
            b, e = self.token_id("[INST]"), self.token_id("[/INST]")
            if b is not None and e is not None and self._kinds[b] == self._kinds[e] == 3:
                return [self.bos_id] * (self.bos_id is not None) + [b] + self.encode(text) + [e]
            return self.encode(f"[INST] {text} [/INST]", bos=True)
        b, e = self.sp.piece_to_id("[INST]"), self.sp.piece_to_id("[/INST]")
        if self.sp.is_control(b) and self.sp.is_control(e) and b != e:
            return [self.bos_id, b] + self.encode(text) + [e]
        return self.encode(f"[INST] {text} [/INST]", bos=True)

    def chat(self, text, system=None, template=None):
        """Ids of one user turn and the start of the assistant's reply, in `template` (default: the
        checkpoint's, self.template). Each text between two special tokens is encoded whole, as
        `transformers` encodes a rendered template.
          inst    instruct(text); a system prompt goes before the text with a blank line, as
                  mistral-common writes it
          chatml  <|im_start|>system\\n{system}<|im_end|>\\n (only with a system prompt)
                  <|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n
          llama3  <|begin_of_text|>
                  <|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|> (only with one)
                  <|start_header_id|>user<|end_header_id|>\\n\\n{text}<|eot_id|>
                  <|start_header_id|>assistant<|end_header_id|>\\n\\n
                  with the text stripped, as Llama-3's templates strip it; the system prompt is written
                  as given (Llama-3.1's template opens it with two date lines: pass them in it to match)
        A template's default system prompt (Qwen2.5's, SmolLM2's) is written only when passed."""
        template = template or self.template
        if template == "inst":
            return self.instruct(f"{system}\n\n{text}" if system else text)
        if template not in ("chatml", "llama3"):
            raise TokenizerError(f"{self.path}: no chat template {'detected' if template is None else repr(template)};"
                                 f" pass template= one of {CHAT_TEMPLATES}")
        names = (("<|im_start|>", "<|im_end|>") if template == "chatml" else
                 ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
        ids = [self.token_id(n) for n in names]
        if None in ids:
            raise TokenizerError(f"{self.path}: the {template} template needs {', '.join(names[:-1])} and "
                                 f"{names[-1]}, which this vocabulary lacks")
        if template == "llama3":
            bot, start, end, eot = ids

            def turn(role, content):
                return [start] + self.encode(role) + [end] + self.encode("\n\n" + content) + [eot]
            head = [bot] + (turn("system", system) if system is not None else [])
            return head + turn("user", text.strip()) + [start] + self.encode("assistant") + [end] + self.encode("\n\n")
        start, end = ids
        nl = self.continuation("\n")
        turn = [start] + self.encode(f"system\n{system}") + [end] + nl if system is not None else []
        return (turn + [start] + self.encode(f"user\n{text}") + [end] + nl
                + [start] + self.encode("assistant\n"))
