"""A byte-level BPE tokenizer (tokenizer.json) as llama.cpp's `gpt2` vocabulary."""

from __future__ import annotations

from dataclasses import dataclass

from gguf import TokenType

from .checkpoint import Checkpoint
from .errors import ConvertError


@dataclass
class BpeVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    eos_id: int
    special: dict[str, int]  # content -> id of every special added token

    def write_to(self, writer, pre: str) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        writer.add_eos_token_id(self.eos_id)
        writer.add_add_bos_token(False)


def read_bpe_vocab(ckpt: Checkpoint, n_rows: int, eos_id: int | None, eos_token: str) -> BpeVocab:
    """Read tokenizer.json; pad the vocabulary with unused tokens up to the embedding rows.

    Special added tokens become CONTROL (never printed), other added tokens (Phi-2's runs of
    whitespace) USER_DEFINED, stored as their raw text as llama.cpp expects. The end-of-turn
    token is `eos_id` (config.json's eos_token_id) when given, else the special `eos_token`.
    """
    tj = ckpt.read_json("tokenizer.json")
    if tj is None:
        raise ConvertError(f"{ckpt.folder}: no tokenizer.json")
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConvertError(f"{ckpt.folder}: tokenizer.json is not a byte-level BPE tokenizer")

    by_id: dict[int, tuple[str, int]] = {i: (t, TokenType.NORMAL) for t, i in model["vocab"].items()}
    special: dict[str, int] = {}
    for added in tj.get("added_tokens", []):
        content, i = added["content"], added["id"]
        if added.get("special"):
            by_id[i] = (content, TokenType.CONTROL)
            special[content] = i
        else:
            by_id[i] = (content, TokenType.USER_DEFINED)

    n_tok = max(by_id) + 1
    if n_tok > n_rows:
        raise ConvertError(
            f"tokenizer has {n_tok} tokens but the embedding has only {n_rows} rows"
        )
    tokens, types = [], []
    for i in range(n_rows):
        text, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))

    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if eos_id is None:
        if eos_token not in special:
            raise ConvertError(f"tokenizer.json has no special token {eos_token!r}")
        eos_id = special[eos_token]
    if not 0 <= eos_id < n_tok:
        raise ConvertError(f"eos_token_id {eos_id} is not a token of tokenizer.json")
    return BpeVocab(tokens, types, merges, eos_id, special)
