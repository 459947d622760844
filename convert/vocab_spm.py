"""A SentencePiece tokenizer (Llama-style, as Phi-3's) as llama.cpp's `llama` vocabulary.

The source is the checkpoint's tokenizer.json, the file Imp itself ran: a byte-fallback BPE whose
merges were generated from the SentencePiece scores. llama.cpp's SPM tokenizer merges the
adjacent pair whose joined text has the highest score, so each piece's score is minus the rank of
the first merge that builds it: the same merge order as the reference, without the `sentencepiece`
package or tokenizer.model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import TokenType

from .checkpoint import Checkpoint
from .errors import ConvertError

_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPACE = "\u2581"  # SentencePiece's visible space


@dataclass
class SpmVocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    add_bos: bool
    add_space_prefix: bool
    special: dict[str, int]  # content -> id of every added token
    source: str = "tokenizer.json"  # the file it was read from (reported by the converter)

    def write_to(self, writer) -> None:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(self.tokens)
        writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        writer.add_bos_token_id(self.bos_id)
        writer.add_eos_token_id(self.eos_id)
        writer.add_unk_token_id(self.unk_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(self.add_space_prefix)


def _space_prefix(tj: dict) -> bool:
    """Whether every piece of text between special tokens gets a leading "▁", as llama.cpp's
    add_space_prefix does. A legacy tokenizer.json prepends it in the normalizer; a newer one in a
    Metaspace pre-tokenizer, where "first" (only at the very start) has no llama.cpp equivalent."""
    def parts(node):
        if not node:
            return []
        if node.get("type") == "Sequence":
            return [p for child in node.get("normalizers") or node.get("pretokenizers") or [] for p in parts(child)]
        return [node]

    normalizers, pre = parts(tj.get("normalizer")), parts(tj.get("pre_tokenizer"))
    if any(n.get("type") == "Prepend" and n.get("prepend") == SPACE for n in normalizers):
        return True
    meta = next((p for p in pre if p.get("type") == "Metaspace"), None)
    if meta is None:
        return False
    scheme = meta.get("prepend_scheme", "always" if meta.get("add_prefix_space", True) else "never")
    if scheme == "first":
        raise ConvertError("tokenizer.json prefixes a space only at the start of the text (Metaspace "
                           "prepend_scheme 'first'), which llama.cpp cannot reproduce")
    return scheme == "always"


def _adds_bos(ckpt: Checkpoint, tj: dict, bos: str) -> bool:
    """tokenizer_config.json's add_bos_token (transformers rebuilds the post-processor from it),
    else whether tokenizer.json's post-processor puts the BOS first."""
    config = ckpt.read_json("tokenizer_config.json") or {}
    if "add_bos_token" in config:
        return bool(config["add_bos_token"])
    post = tj.get("post_processor") or {}
    single = post.get("single") or []
    first = single[0] if single else {}
    return post.get("type") == "TemplateProcessing" and (first.get("SpecialToken") or {}).get("id") == bos


def read_spm_vocab(ckpt: Checkpoint, n_rows: int, bos_id: int | None, eos_id: int | None) -> SpmVocab:
    tj = ckpt.read_json("tokenizer.json")
    if tj is None:
        raise ConvertError(f"{ckpt.folder}: no tokenizer.json")
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback") or not isinstance(model.get("vocab"), dict):
        raise ConvertError(f"{ckpt.folder}: tokenizer.json is not a SentencePiece (byte-fallback BPE) tokenizer")

    vocab: dict[str, int] = model["vocab"]
    merges = model.get("merges") or []
    score: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        score.setdefault(left + right, -float(rank))
    unk = model.get("unk_token") or "<unk>"
    by_id: dict[int, tuple[str, float, int]] = {}
    for piece, i in vocab.items():
        if piece == unk or _BYTE.fullmatch(piece):
            by_id[i] = (piece, 0.0, TokenType.UNKNOWN if piece == unk else TokenType.BYTE)
        else:  # pieces no merge builds (single characters) rank after all merged ones, as in SentencePiece
            by_id[i] = (piece, score.get(piece, -float(len(merges) + i)), TokenType.NORMAL)
    special: dict[str, int] = {}
    for added in tj.get("added_tokens") or []:
        content, i = added["content"], added["id"]
        special[content] = i
        if content == unk:
            kind = TokenType.UNKNOWN
        else:
            kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        by_id[i] = (content, 0.0, kind)

    n_tok = max(by_id) + 1
    if n_tok > n_rows:
        raise ConvertError(f"tokenizer has {n_tok} tokens but the embedding has only {n_rows} rows")
    tokens, scores, types = [], [], []
    for i in range(n_rows):
        text, s, kind = by_id.get(i, (f"[PAD{i}]", 0.0, TokenType.UNUSED))
        tokens.append(text)
        scores.append(s)
        types.append(int(kind))

    config = ckpt.read_json("tokenizer_config.json") or {}

    def token_id(given: int | None, key: str) -> int:
        if given is not None and (isinstance(given, bool) or not isinstance(given, int)):
            raise ConvertError(f"config.json: {key}_id must be an integer, not {given!r}")
        if given is None:
            name = config.get(key)
            name = name.get("content") if isinstance(name, dict) else name
            if name not in special:
                raise ConvertError(f"cannot tell the tokenizer's {key} (config.json has no id for it)")
            given = special[name]
        if not 0 <= given < n_tok:
            raise ConvertError(f"{key} id {given} is not a token of tokenizer.json")
        return int(given)

    bos, eos = token_id(bos_id, "bos_token"), token_id(eos_id, "eos_token")
    if unk not in vocab:
        raise ConvertError(f"tokenizer.json's unk_token {unk!r} is not in its vocabulary")
    return SpmVocab(tokens, scores, types, bos, eos, vocab[unk], _adds_bos(ckpt, tj, tokens[bos]),
                    _space_prefix(tj), special)
