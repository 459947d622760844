"""Whitespace stripping around special tokens, as llama.cpp can express it.

Hugging Face added tokens may swallow the whitespace after them (`rstrip`) or before them
(`lstrip`): Phi-3's `<|end|>`, `<|user|>`, ... eat the newline that follows them in its template,
which changes the tokens of the text after them. A GGUF has no key for this: llama.cpp turns rstrip
on for every special token (except `<unk>`, `<s>`, `<|endoftext|>`, and with `</s>`) exactly when
general.name contains "phi3" or "phi-3", whatever the architecture. So the converter decides the
name from the checkpoint's flags, never from what the user called the model.
"""

from __future__ import annotations

import re

from gguf import TokenType

from .errors import ConvertError

_PHI3_MARK = re.compile(r"phi-?3", re.IGNORECASE)
_SPECIAL_TYPES = (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)
_NEVER_RSTRIPPED = ("<unk>", "<s>", "<|endoftext|>")  # llama.cpp's exceptions under a phi3 name
_ALWAYS_RSTRIPPED = ("</s>",)


def llama_cpp_phi3_rstrip(tokens: list[str], types: list[int]) -> set[int]:
    """The ids llama.cpp rstrips when general.name contains "phi3"."""
    ids = {i for i, t in enumerate(types) if t in _SPECIAL_TYPES}
    ids |= {i for i, t in enumerate(tokens) if t in _ALWAYS_RSTRIPPED}
    return {i for i in ids if tokens[i] not in _NEVER_RSTRIPPED}


def needs_phi3_rstrip(added: list[dict], tokens: list[str], types: list[int], ignore: tuple[str, ...] = ()) -> bool:
    """Whether the GGUF must be named so that llama.cpp rstrips special tokens.

    `added` is tokenizer.json's added_tokens; tokens in `ignore` (the image placeholder, which is
    cut out of the prompt before tokenizing) do not count. Refuses flags llama.cpp cannot follow.
    """
    added = [a for a in added if a.get("content") not in ignore]
    lstripped = [a["content"] for a in added if a.get("lstrip")]
    if lstripped:
        raise ConvertError(
            f"tokenizer.json: added token {lstripped[0]!r} strips the whitespace before it (lstrip), "
            "which llama.cpp cannot reproduce"
        )
    want = {a["id"] for a in added if a.get("rstrip")}
    if not want:
        return False
    ignored = {i for i, t in enumerate(tokens) if t in ignore}
    if want == llama_cpp_phi3_rstrip(tokens, types) - ignored:
        return True
    raise ConvertError(
        "tokenizer.json: its added tokens strip the whitespace after them (rstrip) in a pattern "
        "llama.cpp cannot reproduce (it strips after every special token or after none)"
    )


def gguf_name(name: str, phi3_rstrip: bool) -> str:
    """`name`, marked "phi3" exactly when llama.cpp must rstrip special tokens."""
    if phi3_rstrip:
        return name if _PHI3_MARK.search(name) else f"{name} (phi3 tokenizer)"
    return _PHI3_MARK.sub(lambda m: m.group(0)[:3] + " " + m.group(0)[-1], name)


def added_tokens(ckpt) -> list[dict]:
    """The checkpoint's added tokens with their flags: tokenizer.json's list, else the
    `added_tokens_decoder` of tokenizer_config.json (repos that ship no tokenizer.json)."""
    tj = ckpt.read_json("tokenizer.json")
    if tj is not None:
        return list(tj.get("added_tokens") or [])
    decoder = (ckpt.read_json("tokenizer_config.json") or {}).get("added_tokens_decoder") or {}
    return [{**flags, "id": int(i)} for i, flags in decoder.items()]
