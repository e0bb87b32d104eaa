r"""tokenizer.py: one Tokenizer over the two vocabularies Llama-family checkpoints ship, and their chat formats.

  SentencePiece     a tokenizer.model file (Llama-2, Mistral), or a GGUF "llama" vocabulary, which is
                    turned back into a SentencePiece model in memory (the protobuf written by hand below)
  byte-level BPE    a Hugging Face tokenizer.json (GPT-2 style), or a GGUF "gpt2" vocabulary (SmolLM2,
                    Llama-3), encoded here in plain Python: bytes -> GPT-2's printable characters,
                    special tokens cut out whole, the pre-tokenizer's regex, then merges by rank

Every kind answers the same calls:

    tok = Tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")   # or a folder, tokenizer.model, tokenizer.json
    tok.encode("Rating: 4")        # [49152-vocab ids]; bos=True adds <s> only where the vocabulary's
                                   # convention does (SentencePiece yes, SmolLM2 no); eos=True appends eos
    tok.decode(ids)                # lossless for ordinary text
    tok.spaced("4")                # " 4" after other text: ['Ġ', '4'] (SmolLM2), ['▁', '4'] (Mistral)
    tok.continuation("\nRating:")  # text glued to what precedes it (no SentencePiece dummy prefix)
    tok.chat("Hi", system=None)    # one user turn + the start of the reply, in tok.template
                                   # ("chatml" or "inst", detected from the checkpoint)

Pre-tokenizers known here (others are refused, naming them): "gpt2", "smollm" (each digit alone, then
GPT-2's pattern) and "llama-bpe" (Llama-3's pattern). Python's `re` has no \p{L} or \p{N}, so those
classes are built once from `unicodedata`; \s is Unicode's White_Space, as the reference regex engine
(Oniguruma, used by `tokenizers`) has it, not Python's str.isspace (which adds \x1c-\x1f).

Left out on purpose: normalizers (byte-level BPE vocabularies of this family have none), WordPiece and
Unigram vocabularies, BPE dropout, and rendering arbitrary Jinja chat templates: only the two formats
the project prompts with. Nothing here imports torch.
"""
import functools
import json
import os
import re
import struct
import unicodedata

import sentencepiece as spm

import cli
import gguf_file

CHAT_TEMPLATES = ("inst", "chatml")  # the formats chat() writes; tok.template is one of these or None


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


GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {  # GGUF tokenizer.ggml.pre name -> (every digit its own piece first?, pattern)
    "gpt2": (False, GPT2_PATTERN),
    "smollm": (True, GPT2_PATTERN),
    "llama-bpe": (False, LLAMA3_PATTERN),
}


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
    """Byte-level BPE: special tokens cut out whole, pre-tokenizer regex, merges by rank, cached per word."""

    def __init__(self, tokens, merges, pre, specials=(), unk_id=None, ignore_merges=False):
        self.tokens = tokens                               # id -> token string (None: unused id)
        self.vocab = {t: i for i, t in enumerate(tokens) if t is not None}
        self.ranks = {pair: r for r, pair in enumerate(merges)}  # (left, right) -> merge priority
        self.unk_id, self.ignore_merges = unk_id, ignore_merges
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


# ---------------------------------------------------------------------------------------- loaders

def _template_kind(template):
    """'chatml' or 'inst' from a Jinja chat template's text, None when it is neither (or absent)."""
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if not isinstance(template, str):
        return None
    if "<|im_start|>" in template:
        return "chatml"
    if "[INST]" in template:
        return "inst"
    return None


def _read_json(file):
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{file}: not a JSON file ({str(e).splitlines()[0]})") from None


def _config_beside(file):
    """tokenizer_config.json next to a tokenizer file ({} when absent), with a chat_template.jinja
    beside it (newer Hugging Face folders) taking the place of its chat_template."""
    folder = os.path.dirname(os.path.abspath(file))
    cfg_file = os.path.join(folder, "tokenizer_config.json")
    cfg = _read_json(cfg_file) if os.path.isfile(cfg_file) else {}
    if not isinstance(cfg, dict):
        raise TokenizerError(f"{cfg_file}: expected a JSON object")
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            cfg = {**cfg, "chat_template": f.read()}
    return cfg


def _token_text(v):
    """A tokenizer_config token entry: "<s>" or {"content": "<s>", ...} or None."""
    return v.get("content") if isinstance(v, dict) else v


def _hf_pre_name(pre, file):
    """The PRE_TOKENIZERS name of a tokenizer.json pre_tokenizer, or a TokenizerError naming it."""
    def bytelevel(p, regex):
        return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space", False)
                and p.get("use_regex", True) == regex)

    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0] and bytelevel(steps[0], True):
        return "gpt2"
    if len(steps) == 2 and steps[0] and steps[1]:
        a, b = steps
        if a.get("type") == "Digits" and a.get("individual_digits") and bytelevel(b, True):
            return "smollm"
        if (a.get("type") == "Split" and a.get("pattern", {}).get("Regex") == LLAMA3_PATTERN
                and a.get("behavior") == "Isolated" and not a.get("invert") and bytelevel(b, False)):
            return "llama-bpe"
    desc = json.dumps(pre, separators=(",", ":"))
    raise TokenizerError(f"{file}: pre_tokenizer {desc[:200]} is not one this tokenizer knows "
                         f"(byte-level BPE with {', '.join(PRE_TOKENIZERS)})")


def _hf_bos(post):
    """Content of the special token a tokenizer.json post_processor puts before every sequence, or None."""
    if not isinstance(post, dict):
        return None
    if post.get("type") == "Sequence":
        return next((c for p in post.get("processors", []) if (c := _hf_bos(p))), None)
    if post.get("type") == "TemplateProcessing":
        single = post.get("single") or [{}]
        return single[0].get("SpecialToken", {}).get("id")
    return None


def _load_hf(file):
    """tokenizer.json (+ tokenizer_config.json beside it) -> (_BPE, pre name, tokenizer.json, config)."""
    tj = _read_json(file)
    if not isinstance(tj, dict) or not isinstance(tj.get("model"), dict):
        raise TokenizerError(f"{file}: not a tokenizer.json (no 'model' object)")
    model = tj["model"]
    if model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{file}: model type {model.get('type')!r} is not byte-level BPE")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise TokenizerError(f"{file}: a SentencePiece-style BPE (byte_fallback / subword affixes); "
                             f"use the checkpoint's tokenizer.model")
    if tj.get("normalizer"):
        raise TokenizerError(f"{file}: normalizer {tj['normalizer'].get('type')!r} is not supported "
                             f"(byte-level BPE here has none)")
    pre = _hf_pre_name(tj.get("pre_tokenizer"), file)
    added = tj.get("added_tokens") or []
    if any(a.get("single_word") for a in added):
        raise TokenizerError(f"{file}: added tokens with single_word=true are not supported")
    n = max([*model["vocab"].values(), *(a["id"] for a in added)], default=-1) + 1
    tokens = [None] * n
    for t, i in model["vocab"].items():
        tokens[i] = t
    for a in added:
        tokens[a["id"]] = a["content"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    specials = [_Added(a["id"], a["content"], a.get("special", False), a.get("lstrip", False),
                       a.get("rstrip", False)) for a in added]
    unk = model["vocab"].get(model["unk_token"]) if model.get("unk_token") else None
    bpe = _BPE(tokens, merges, pre, specials, unk, bool(model.get("ignore_merges")))
    return bpe, pre, tj, _config_beside(file)


def _gguf_merges(merges, file):
    """GGUF merges are 'left right' strings; a token may itself be a space, so split at the first
    space after the first character."""
    try:
        return [(m[:m.index(" ", 1)], m[m.index(" ", 1) + 1:]) for m in merges]
    except ValueError:
        bad = next(m for m in merges if " " not in m[1:])
        raise TokenizerError(f"{file}: tokenizer.ggml.merges entry {bad!r} is not 'left right'") from None


class Tokenizer:
    """SentencePiece or byte-level BPE, from tokenizer.model, tokenizer.json, a folder of either, or GGUF.

    Attributes: path (the file read), kind ("sentencepiece" or "bpe"), pre (the BPE pre-tokenizer name),
    vocab_size, bos_id (None when the vocabulary has none), eos_id, pad_id (never None), add_bos
    (whether encode(bos=True) adds bos), template ("inst", "chatml" or None), and sp (the
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
            self.template = _template_kind(_config_beside(file).get("chat_template"))

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
        model, tokens = md.get("tokenizer.ggml.model"), md.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError(f"{file}: no tokenizer.ggml.tokens in the GGUF metadata")
        types = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        ids = {k: md.get(f"tokenizer.ggml.{k}_token_id", -1) for k in ("bos", "eos", "padding", "unknown")}
        if model == "llama":
            scores = md.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            unk = ids["unknown"] if ids["unknown"] >= 0 else next((i for i, t in enumerate(types) if t == 2), -1)
            proto = sentencepiece_proto(tokens, scores, types, unk, ids["bos"], ids["eos"], ids["padding"],
                                        md.get("tokenizer.ggml.add_space_prefix", True))
            self._init_sentencepiece(file, proto, md.get("tokenizer.ggml.add_bos_token", True), ids["padding"])
        elif model == "gpt2":
            pre = md.get("tokenizer.ggml.pre", "gpt2")
            if pre not in PRE_TOKENIZERS:
                raise TokenizerError(f"{file}: pre-tokenizer {pre!r} is not one this tokenizer knows "
                                     f"({', '.join(PRE_TOKENIZERS)})")
            merges = _gguf_merges(md.get("tokenizer.ggml.merges", []), file)
            specials = [_Added(i, t, ty == 3) for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)]
            unk = ids["unknown"] if 0 <= ids["unknown"] < len(tokens) and types[ids["unknown"]] == 2 else None
            self.kind, self.pre, self.vocab_size = "bpe", pre, len(tokens)
            self.bpe = _BPE(list(tokens), merges, pre, specials, unk, ignore_merges=pre == "llama-bpe")
            self._kinds = types
            self._set_ids(ids["bos"], ids["eos"], ids["padding"], unk, md.get("tokenizer.ggml.add_bos_token", False))
        else:
            raise TokenizerError(f"{file}: tokenizer.ggml.model {model!r} is not supported (llama or gpt2)")
        self.template = _template_kind(md.get("tokenizer.chat_template"))

    def _init_hf(self, file):
        self.bpe, self.pre, tj, cfg = _load_hf(file)
        tokens = self.bpe.tokens
        self.kind, self.vocab_size = "bpe", len(tokens)
        special = {a.id for a in self.bpe.specials.values() if a.special}
        self._kinds = [3 if i in special else 1 if t is not None else 5 for i, t in enumerate(tokens)]

        def find(name, *fallbacks):
            for content in (_token_text(cfg.get(name)), *fallbacks):
                if content is not None and (i := self.bpe.vocab.get(content)) is not None:
                    return i
            return -1
        post_bos = _hf_bos(tj.get("post_processor"))
        bos = find("bos_token", post_bos)
        eos = find("eos_token", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
        add_bos = cfg.get("add_bos_token", post_bos is not None)
        self._set_ids(bos, eos, find("pad_token"), self.bpe.unk_id, add_bos)
        self.template = _template_kind(cfg.get("chat_template"))

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
        checkpoint's, self.template).
          inst    instruct(text); a system prompt goes before the text with a blank line, as
                  mistral-common writes it
          chatml  <|im_start|>system\\n{system}<|im_end|>\\n (only with a system prompt)
                  <|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n
                  with <|im_start|> and <|im_end|> as their single ids"""
        template = template or self.template
        if template == "inst":
            return self.instruct(f"{system}\n\n{text}" if system else text)
        if template != "chatml":
            raise TokenizerError(f"{self.path}: no chat template {'detected' if template is None else repr(template)};"
                                 f" pass template= one of {CHAT_TEMPLATES}")
        start, end = self.token_id("<|im_start|>"), self.token_id("<|im_end|>")
        if start is None or end is None:
            raise TokenizerError(f"{self.path}: the chatml template needs <|im_start|> and <|im_end|>, "
                                 f"which this vocabulary lacks")
        nl = self.continuation("\n")
        turn = [start] + self.encode(f"system\n{system}") + [end] + nl if system is not None else []
        return (turn + [start] + self.encode(f"user\n{text}") + [end] + nl
                + [start] + self.encode("assistant\n"))
