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


def phi2_prompt(question: str, history: list[Turn] = (), system: str | None = None) -> tuple[str, str]:
    """(text before the image, text after it). The image sits in the first user turn:

    `{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:`
    """
    system = PHI2_SYSTEM if system is None else system
    before = f"{system} USER: "
    turns = [*history, Turn(question, "")]
    after = ""
    for i, turn in enumerate(turns):
        after += ("\n" if i == 0 else "USER: ") + f"{turn.question} ASSISTANT:"
        if turn.answer:
            after += f" {turn.answer}</s>"
    return before, after


TEMPLATES = {"phi2": phi2_prompt}


def build_prompt(family: str, question: str, history: list[Turn] = (), system: str | None = None) -> tuple[str, str]:
    return TEMPLATES[family](question, list(history), system)


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
