"""A byte-level BPE tokenizer as llama.cpp's `gpt2` vocabulary, from whichever file set a repo ships.

Two sets carry the same vocabulary: the fast tokenizer's `tokenizer.json`, and the slow one's
`vocab.json` + `merges.txt` with its added tokens in `added_tokens.json` and/or
`tokenizer_config.json`'s `added_tokens_decoder` (Phi-2-era repos may ship only the latter).
`tokenizer.json` is read when present (it is what Imp's transformers loaded); every other set
present must agree with it (same ids, same merges, same added tokens and special flags), so that a
repo whose files contradict each other is refused instead of converted by a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import TokenType

from .checkpoint import Checkpoint
from .errors import ConvertError

# Special-token names of tokenizer_config.json / special_tokens_map.json.
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass
class BpeVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    eos_id: int
    special: dict[str, int]  # content -> id of every special added token
    source: str = "tokenizer.json"  # which files it was read from (and checked against)

    def write_to(self, writer, pre: str) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        writer.add_eos_token_id(self.eos_id)
        writer.add_add_bos_token(False)


@dataclass
class _FileSet:
    """What one tokenizer file set says: base vocabulary, merges, added tokens."""

    files: list[str]
    vocab: dict[int, str]
    merges: list[str]
    added: dict[int, str]  # id -> content
    special: dict[int, bool]  # id -> special flag, for the added tokens whose flag the files state


def read_bpe_vocab(ckpt: Checkpoint, n_rows: int, eos_id: int | None, eos_token: str) -> BpeVocab:
    """Read the tokenizer; pad the vocabulary with unused tokens up to the embedding rows.

    Special added tokens become CONTROL (never printed), other added tokens (Phi-2's runs of
    whitespace) USER_DEFINED, stored as their raw text as llama.cpp expects. The end-of-turn
    token is `eos_id` (config.json's eos_token_id) when given, else the special `eos_token`.
    """
    fast, slow = _read_fast(ckpt), _read_slow(ckpt)
    if fast is None and slow is None:
        raise ConvertError(f"{ckpt.folder}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt)")
    used = fast or slow
    source = " + ".join(used.files)
    if fast is not None and slow is not None:
        _check_agree(fast, slow)
        source += f" (agrees with {' + '.join(slow.files)})"
    for i, content in used.added.items():
        if used.vocab.get(i, content) != content:
            raise ConvertError(f"{used.files[0]}: id {i} is {used.vocab[i]!r} in the vocabulary but "
                               f"{content!r} as an added token")
    special_ids = {i for i in used.added if used.special.get(i, False)}
    if fast is None:
        # Without a flag in the files, a token is special when it is one of the named special
        # tokens (Phi-2's <|endoftext|> sits in vocab.json) or the image placeholder (never text).
        named = _special_names(ckpt)
        image_id = ckpt.config.get("image_token_index")
        used.added.update({i: t for i, t in used.vocab.items() if t in named and i not in used.added})
        special_ids |= {i for i, t in used.added.items()
                        if i not in used.special and (t in named or i == image_id)}

    by_id: dict[int, tuple[str, int]] = {i: (t, TokenType.NORMAL) for i, t in used.vocab.items()}
    special: dict[str, int] = {}
    for i, content in used.added.items():
        if i in special_ids:
            by_id[i] = (content, TokenType.CONTROL)
            special[content] = i
        else:
            by_id[i] = (content, TokenType.USER_DEFINED)

    n_tok = max(by_id) + 1
    if n_tok > n_rows:
        raise ConvertError(f"tokenizer has {n_tok} tokens but the embedding has only {n_rows} rows")
    tokens, types = [], []
    for i in range(n_rows):
        text, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))

    if eos_id is not None and (not isinstance(eos_id, int) or isinstance(eos_id, bool)):
        raise ConvertError(f"config.json: eos_token_id must be an integer, not {eos_id!r}")
    if eos_id is None:
        if eos_token not in special:
            raise ConvertError(f"{used.files[0]} has no special token {eos_token!r}")
        eos_id = special[eos_token]
    if not 0 <= eos_id < n_tok:
        raise ConvertError(f"eos_token_id {eos_id} is not a token of {used.files[0]}")
    return BpeVocab(tokens, types, used.merges, eos_id, special, source)


def _read_fast(ckpt: Checkpoint) -> _FileSet | None:
    tj = ckpt.read_json("tokenizer.json")
    if tj is None:
        return None
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConvertError(f"{ckpt.folder}: tokenizer.json is not a byte-level BPE tokenizer")
    try:
        vocab = _invert(model["vocab"], "tokenizer.json")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        added, special = {}, {}
        for token in tj.get("added_tokens") or []:
            i, content = int(token["id"]), str(token["content"])
            added[i], special[i] = content, bool(token.get("special"))
    except (KeyError, TypeError, ValueError):
        raise ConvertError(f"{ckpt.folder}: tokenizer.json is malformed") from None
    return _FileSet(["tokenizer.json"], vocab, merges, added, special)


def _read_slow(ckpt: Checkpoint) -> _FileSet | None:
    """vocab.json + merges.txt, added tokens from added_tokens.json and tokenizer_config.json."""
    has_vocab, has_merges = (ckpt.folder / "vocab.json").is_file(), (ckpt.folder / "merges.txt").is_file()
    if not (has_vocab or has_merges):
        return None
    if not (has_vocab and has_merges):
        missing, present = ("merges.txt", "vocab.json") if has_vocab else ("vocab.json", "merges.txt")
        if (ckpt.folder / "tokenizer.json").is_file():
            return None  # a stray half of the slow set: tokenizer.json is complete on its own
        raise ConvertError(f"{ckpt.folder}: {present} without {missing} (and no tokenizer.json)")
    files = ["vocab.json", "merges.txt"]
    vocab = _invert(ckpt.read_json("vocab.json"), "vocab.json")
    try:
        lines = (ckpt.folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConvertError(f"{ckpt.folder / 'merges.txt'}: not UTF-8 text") from None
    merges = [line for line in lines if line.strip() and not line.startswith("#version")]

    added: dict[int, str] = {}
    special: dict[int, bool] = {}
    table = ckpt.read_json("added_tokens.json")
    if table is not None:
        files.append("added_tokens.json")
        added.update(_invert(table, "added_tokens.json"))
    decoder = (ckpt.read_json("tokenizer_config.json") or {}).get("added_tokens_decoder")
    if decoder is not None:
        files.append("tokenizer_config.json")
        try:
            for key, token in decoder.items():
                i, content = int(key), str(token["content"])
                if added.get(i, content) != content:
                    raise ConvertError(
                        f"tokenizer files disagree: added_tokens.json has id {i} = {added[i]!r}, "
                        f"tokenizer_config.json has {content!r}"
                    )
                added[i], special[i] = content, bool(token.get("special"))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ConvertError(f"{ckpt.folder}: tokenizer_config.json has a malformed added_tokens_decoder") from None
    return _FileSet(files, vocab, merges, added, special)


def _check_agree(fast: _FileSet, slow: _FileSet) -> None:
    """One line naming the first difference between tokenizer.json and the slow file set."""
    def differ(what: str, a, b) -> ConvertError:
        return ConvertError(f"tokenizer files disagree on {what}: tokenizer.json has {a}, {'/'.join(slow.files)} {b}")

    if fast.vocab != slow.vocab:
        i = min(i for i in fast.vocab.keys() | slow.vocab.keys() if fast.vocab.get(i) != slow.vocab.get(i))
        raise differ(f"token {i}", repr(fast.vocab.get(i)), repr(slow.vocab.get(i)))
    if fast.merges != slow.merges:
        k = next((k for k, (a, b) in enumerate(zip(fast.merges, slow.merges)) if a != b), None)
        if k is None:
            raise differ("the merges", f"{len(fast.merges)}", f"{len(slow.merges)}")
        raise differ(f"merge {k}", repr(fast.merges[k]), repr(slow.merges[k]))
    # Added tokens: those the slow set lists must be the fast set's; an added token that the
    # slow set keeps in vocab.json instead (Phi-2's <|endoftext|>) must have the same text there.
    for i in sorted(fast.added.keys() | slow.added.keys()):
        a, b = fast.added.get(i, fast.vocab.get(i)), slow.added.get(i, slow.vocab.get(i))
        if a != b:
            raise differ(f"added token {i}", repr(a), repr(b))
        if i in slow.special and slow.special[i] != fast.special.get(i, False):
            raise differ(f"whether token {i} {a!r} is special", fast.special.get(i, False), slow.special[i])


def _special_names(ckpt: Checkpoint) -> set[str]:
    """Contents of the named special tokens in tokenizer_config.json / special_tokens_map.json."""
    names: set[str] = set()
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        data = ckpt.read_json(file) or {}
        values = [data.get(k) for k in _SPECIAL_NAMES] + list(data.get("additional_special_tokens") or [])
        for v in values:
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                names.add(v)
    return names


def _invert(table, name: str) -> dict[int, str]:
    """A {text: id} table -> {id: text}, refusing two texts for one id."""
    if not isinstance(table, dict):
        raise ConvertError(f"{name} is not a token table (a JSON object of text -> id)")
    out: dict[int, str] = {}
    for text, i in table.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ConvertError(f"{name}: token {text!r} has an invalid id {i!r}")
        if i in out:
            raise ConvertError(f"{name}: id {i} is given to both {out[i]!r} and {text!r}")
        out[i] = text
    return out
