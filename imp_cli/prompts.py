"""Conversation templates per model family, as each Imp model was trained on them.

The text before and after the image is returned separately: Imp tokenizes the two sides of
`<image>` independently (its `tokenizer_image_token`), and so must we for identical tokens.
Stop tokens and the BOS are not here: they are the GGUF's (eos/eot ids, add_bos_token), which
the converter writes from the checkpoint's own tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from convert.chat_templates import FAMILIES, IMP_SYSTEM, turn_tags  # noqa: F401 - FAMILIES: the families it renders

PHI2_SYSTEM = IMP_SYSTEM  # every family's template uses Imp's own sentence


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str
    # The answer's token ids as the model generated them, when known (a record of what was said).
    # A follow-up's prompt never uses them: it re-renders `answer` as Imp's conversation does, and
    # the KV cache keeps the generated ids only as far as they equal that prompt's.
    tokens: tuple[int, ...] | None = None


def _conversation(head: str, user: str, bodies: list[str], image_turn: int) -> tuple[str, str]:
    """`head`, then `user` + body for each turn, cut where the image opens user turn
    `image_turn`: (text before the image, "\n" + the rest)."""
    if not 0 <= image_turn < len(bodies):
        raise ValueError(f"image_turn {image_turn} is not one of the {len(bodies)} user turns")
    before, after = head, ""
    for i, body in enumerate(bodies):
        if i < image_turn:
            before += user + body
        elif i == image_turn:  # the image opens the turn: "{user}<image>\n{question} ..."
            before += user
            after += "\n" + body
        else:
            after += user + body
    return before, after


def _render(family: str, question: str, history: list[Turn] = (), system: str | None = None,
            image_turn: int = 0) -> tuple[str, str]:
    """(text before the image, text after it) in `family`'s format, each turn `{open}{text}{close}`
    with the tags of convert/chat_templates.py (the GGUF's chat template is written from the same
    table). The image opens user turn `image_turn` (the first by default, as Imp was trained):

    phi2:  `{system} USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:`
    phi3:  `<|system|>\n{system}<|end|>\n<|user|>\n<image>\n{q1}<|end|>\n<|assistant|>\n{a1}<|end|>\n...`
    qwen2: the same with `<|im_start|>system\n` ... `<|im_end|>\n`
    """
    sys_open, sys_close, user_open, user_close, asst_open, asst_close, generation = turn_tags(family)
    system = PHI2_SYSTEM if system is None else system
    bodies = [t.question + user_close + (asst_open + t.answer + asst_close if t.answer else generation)
              for t in [*history, Turn(question, "")]]
    return _conversation(sys_open + system + sys_close, user_open, bodies, image_turn)


def build_prompt(family: str, question: str, history: list[Turn] = (), system: str | None = None,
                 image_turn: int = 0) -> tuple[str, str]:
    return _render(family, question, list(history), system, image_turn)


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
