"""The chat template each converted GGUF carries (`tokenizer.chat_template`) renders exactly Imp's
conversation format, as imp_cli.prompts builds it, for every family: checked with jinja2 (the
engine Hugging Face and llama-cpp-python use) on 1-, 2- and 3-turn conversations, with the media
marker llama.cpp's tools put where the image goes. That llama-mtmd-cli itself runs an imp GGUF
without --chat-template is tests/mtmd_cli_check.py, run by `make bench` (which builds the binary).
"""

from __future__ import annotations

import ctypes

import jinja2
import pytest

from convert.chat_templates import FAMILIES, IMP_SYSTEM, chat_template
from imp_cli.prompts import FAMILIES as RENDERED, PHI2_SYSTEM, Turn, build_prompt

QUESTIONS = ["What is in the picture?", "What colour is it?", "Why is it there?"]
ANSWERS = ["A red house with a garden.", "Red, with a white door.", "Someone built it."]
MTMD_CLI_MARKER = "<__media__>"  # llama-mtmd-cli's (prepended to its -p prompt)
SERVER_MARKER = "<__media_k3j9x2__>"  # llama-server's: random per process


def render(family: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    # HF's own settings for chat templates (transformers' _compile_jinja_template)
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    return env.from_string(chat_template(family)).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                          bos_token="", eos_token="")


def conversation(n_turns: int, first_user: str, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    for i in range(n_turns):
        messages.append({"role": "user", "content": first_user if i == 0 else QUESTIONS[i]})
        if i < n_turns - 1:
            messages.append({"role": "assistant", "content": ANSWERS[i]})
    return messages


def imp_text(family: str, n_turns: int, marker: str | None, system: str | None = None) -> str:
    """imp's own prompt text for the same conversation, `marker` where the image goes."""
    history = [Turn(QUESTIONS[i], ANSWERS[i]) for i in range(n_turns - 1)]
    before, after = build_prompt(family, QUESTIONS[n_turns - 1], history, system)
    if marker is None:  # no image (as session.prompt_texts: no "<image>\n" at all)
        return before + after.removeprefix("\n")
    return before + marker + after


def test_every_prompt_family_has_a_template():
    assert set(FAMILIES) == set(RENDERED)
    assert IMP_SYSTEM == PHI2_SYSTEM


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_turns", [1, 2, 3])
def test_template_renders_imps_prompt_exactly(family, n_turns):
    # llama-mtmd-cli: the marker prepended to the question
    got = render(family, conversation(n_turns, MTMD_CLI_MARKER + QUESTIONS[0]))
    assert got == imp_text(family, n_turns, MTMD_CLI_MARKER)
    # llama-server: its random marker, from content parts [image, text] or [text, image]
    for first in (SERVER_MARKER + QUESTIONS[0], QUESTIONS[0] + SERVER_MARKER, SERVER_MARKER + "\n" + QUESTIONS[0]):
        assert render(family, conversation(n_turns, first)) == imp_text(family, n_turns, SERVER_MARKER)
    # Imp's own placeholder written by hand, a system message of one's own, no image at all
    assert render(family, conversation(n_turns, "<image>\n" + QUESTIONS[0])) == imp_text(family, n_turns, "<image>")
    system = "You describe pictures for blind readers."
    assert (render(family, conversation(n_turns, MTMD_CLI_MARKER + QUESTIONS[0], system))
            == imp_text(family, n_turns, MTMD_CLI_MARKER, system))
    assert render(family, conversation(n_turns, QUESTIONS[0])) == imp_text(family, n_turns, None)


@pytest.mark.parametrize("family", FAMILIES)
def test_rendering_a_conversation_grows_by_appending(family):
    """llama.cpp renders each new message as the difference between the conversation with and
    without it (common_chat_format_single): earlier text must never change."""
    messages = conversation(3, MTMD_CLI_MARKER + QUESTIONS[0])
    for k in range(1, len(messages)):
        shorter = render(family, messages[:k], add_generation_prompt=False)
        assert render(family, messages[:k + 1], add_generation_prompt=False).startswith(shorter)


def test_converted_gguf_carries_the_template(converted):
    from gguf import GGUFReader

    text, mmproj = converted("new", "float16", "square")
    field = GGUFReader(str(text)).fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == chat_template("phi2")
    assert "tokenizer.chat_template" not in GGUFReader(str(mmproj)).fields


@pytest.mark.parametrize("family,builtin", [("phi2", "USER: "), ("phi3", "<|user|>\n"), ("qwen2", "<|im_start|>user\n")])
def test_llama_cpp_recognises_the_template_without_jinja(family, builtin):
    """Without --jinja (llama-mtmd-cli's default) llama.cpp maps a GGUF's template to one of its
    built-in formats by its text: ours must be recognised (vicuna, phi3, chatml), not refused."""
    import llama_cpp as lc

    chat = (lc.llama_chat_message * 1)(lc.llama_chat_message(b"user", b"Hi?"))
    buf = ctypes.create_string_buffer(4096)
    n = lc.llama_chat_apply_template(chat_template(family).encode(), chat, 1, True, buf, len(buf))
    assert n > 0, f"llama.cpp does not recognise the {family} template"
    assert builtin in buf.raw[:n].decode()
