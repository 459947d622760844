"""Conversation templates per model family, as each Imp model was trained on them.

The text before and after the image is returned separately: Imp tokenizes the two sides of
`<image>` independently (its `tokenizer_image_token`), and so must we for identical tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

PHI2_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str
    # The answer's token ids as the model generated them, when known: a conversation feeds these
    # back rather than re-tokenizing the text, which can split it otherwise (then the KV cache
    # would no longer match and the whole answer would be evaluated again).
    tokens: tuple[int, ...] | None = None


def phi2_prompt(question: str, history: list[Turn] = (), system: str | None = None,
                image_turn: int = 0) -> tuple[str, str]:
    """(text before the image, text after it). The image opens user turn `image_turn` (the
    first by default, as Imp was trained):

    `{system} USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:`
    """
    system = PHI2_SYSTEM if system is None else system
    turns = [*history, Turn(question, "")]
    if not 0 <= image_turn < len(turns):
        raise ValueError(f"image_turn {image_turn} is not one of the {len(turns)} user turns")
    before, after = f"{system} USER: ", ""
    for i, turn in enumerate(turns):
        user = "USER: " if i else ""  # the first one ends `before` already
        body = f"{turn.question} ASSISTANT:" + (f" {turn.answer}</s>" if turn.answer else "")
        if i < image_turn:
            before += user + body
        elif i == image_turn:  # the image opens the turn: "USER: <image>\n{question} ..."
            before += user
            after += "\n" + body
        else:
            after += user + body
    return before, after


TEMPLATES = {"phi2": phi2_prompt}


def build_prompt(family: str, question: str, history: list[Turn] = (), system: str | None = None,
                 image_turn: int = 0) -> tuple[str, str]:
    return TEMPLATES[family](question, list(history), system, image_turn)


def answer_frame(family: str) -> tuple[str, str]:
    """(text before an answer, text after it) as the family's template writes an answered turn:
    Phi-2 `ASSISTANT: {answer}</s>` gives (" ", "</s>USER: ..."). Read off the template itself
    (an answered turn with a marker for the answer), so every family scores its own way."""
    marker = "\x00answer\x00"
    _, asked = build_prompt(family, "?")
    _, answered = build_prompt(family, "!", [Turn("?", marker)])
    if not answered.startswith(asked) or marker not in answered:
        raise ValueError(f"the {family} template does not put an answer right after the question")
    lead, _, after = answered[len(asked):].partition(marker)
    return lead, after
