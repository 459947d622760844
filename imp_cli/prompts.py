"""Conversation templates per model family, as each Imp model was trained on them.

The text before and after the image is returned separately: Imp tokenizes the two sides of
`<image>` independently (its `tokenizer_image_token`), and so must we for identical tokens.
Stop tokens and the BOS are not here: they are the GGUF's (eos/eot ids, add_bos_token), which
the converter writes from the checkpoint's own tokenizer.
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


def _tagged(system_tag: str, user_tag: str, assistant_tag: str, end: str):
    """A template of tagged turns, `{tag}{text}{end}` each (Phi-3 and Qwen2 chat formats):

    `{system_tag}{system}{end}{user_tag}<image>\\n{q1}{end}{assistant_tag}{a1}{end}{user_tag}{q2}...`
    """
    def prompt(question: str, history: list[Turn] = (), system: str | None = None) -> tuple[str, str]:
        system = PHI2_SYSTEM if system is None else system
        before = f"{system_tag}{system}{end}{user_tag}"
        after = "\n"
        for turn in [*history, Turn(question, "")]:
            after += f"{turn.question}{end}{assistant_tag}"
            if turn.answer:
                after += f"{turn.answer}{end}{user_tag}"
        return before, after

    return prompt


phi3_prompt = _tagged("<|system|>\n", "<|user|>\n", "<|assistant|>\n", "<|end|>\n")
qwen2_prompt = _tagged("<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n")

TEMPLATES = {"phi2": phi2_prompt, "phi3": phi3_prompt, "qwen2": qwen2_prompt}


def build_prompt(family: str, question: str, history: list[Turn] = (), system: str | None = None) -> tuple[str, str]:
    return TEMPLATES[family](question, list(history), system)
