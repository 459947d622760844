"""Whitespace stripping around special tokens, as llama.cpp can express it.

Hugging Face added tokens may swallow the whitespace after them (`rstrip`) or before them
(`lstrip`): Phi-3's `<|end|>`, `<|user|>`, ... eat the newline that follows them in its template,
which changes the tokens of the text after them. A GGUF has no key for this: llama.cpp turns rstrip
on for every special token (except `<unk>`, `<s>`, `<|endoftext|>`; `</s>` included) exactly when
general.name contains "phi3" or "phi-3", whatever the architecture. So the converter decides the
name from the checkpoint's flags, never from what the user called the model.
"""

from __future__ import annotations

import re

from .errors import ConvertError

_PHI3_MARK = re.compile(r"phi-?3", re.IGNORECASE)


def needs_phi3_rstrip(added: list[dict], chat_tokens: tuple[str, ...]) -> bool:
    """Whether the GGUF must be named so that llama.cpp rstrips special tokens.

    Decided by the tokens the family's template puts in every prompt (`chat_tokens`, all special
    for llama.cpp): they must all rstrip or none, and none may lstrip, else the checkpoint is
    refused. The flags of other added tokens only matter for a question that types them out
    literally, and do not block a conversion. `added` is tokenizer.json's added_tokens.
    """
    used = [a for a in added if a.get("content") in chat_tokens]
    lstripped = [a["content"] for a in used if a.get("lstrip")]
    if lstripped:
        raise ConvertError(
            f"tokenizer.json: chat token {lstripped[0]!r} strips the whitespace before it (lstrip), "
            "which llama.cpp cannot reproduce"
        )
    rstripped = [a["content"] for a in used if a.get("rstrip")]
    if rstripped and len(rstripped) != len(used):
        kept = next(a["content"] for a in used if not a.get("rstrip"))
        raise ConvertError(
            f"tokenizer.json: chat token {rstripped[0]!r} strips the whitespace after it (rstrip) but "
            f"{kept!r} does not; llama.cpp strips after every special token or after none"
        )
    return bool(rstripped)


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
