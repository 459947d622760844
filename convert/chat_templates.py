"""`tokenizer.chat_template` for each family: Imp's own conversation format as a Jinja template in
the Hugging Face convention (`messages`, `add_generation_prompt`), which llama.cpp's tools
(llama-server, llama-mtmd-cli --jinja) and llama.cpp-based apps read from the GGUF.

Rendered, a template gives exactly the text imp_cli.prompts builds (tests/test_chat_templates.py
checks 1-, 2- and 3-turn conversations of every family, character for character):
- no system message: Imp's own system sentence; a system message replaces it;
- the image: llama.cpp puts a media marker into the user message's text where the image goes
  (`<__media__>` in llama-mtmd-cli, prepended to the prompt; `<__media_RANDOM__>` in
  llama-server, in the order of the content parts). The template moves it to where Imp was
  trained to see the image, the start of its user turn, followed by a newline:
  `USER: <__media__>\\n{question}`. llama.cpp then tokenizes the text on each side of the
  marker on its own, as Imp's tokenizer_image_token does. `<image>` written by hand (Imp's own
  placeholder) is left as written.

Only the text is the same: llama.cpp preprocesses the image its own way (keeps the aspect, pads with
another colour), where imp reproduces Imp's (pad or squash, bicubic). The BOS (Phi-3's) is not in
the template: llama.cpp adds it from the GGUF's add_bos_token, as imp does.

The tags and Imp's system sentence are defined here, at the bottom (imports only go down), and
imp_cli.prompts renders imp's own prompts from them (turn_tags): one table for both.
"""

from __future__ import annotations

IMP_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# (system open, system close, user open, user close, assistant open, assistant close): each turn
# is `{open}{text}{close}`. The generation prompt is the assistant's open.
_TAGS = {
    # {system} USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:
    "phi2": ("", " ", "USER: ", "", " ASSISTANT: ", "</s>"),
    "phi3": ("<|system|>\n", "<|end|>\n", "<|user|>\n", "<|end|>\n", "<|assistant|>\n", "<|end|>\n"),
    "qwen2": ("<|im_start|>system\n", "<|im_end|>\n", "<|im_start|>user\n", "<|im_end|>\n",
              "<|im_start|>assistant\n", "<|im_end|>\n"),
}
# Phi-2's generation prompt is the assistant's open without its trailing space (the model writes it).
_GENERATION = {"phi2": " ASSISTANT:"}

# The user's text with llama.cpp's media marker (if any) moved to its start, then a newline.
_USER_TEXT = [
    "{%- set content = message['content'] if message['content'] is string else '' -%}",
    "{%- if '<__media' in content and '__>' in content.split('<__media', 1)[1] -%}",
    "  {%- set tail = content.split('<__media', 1)[1] -%}",
    "  {%- set marker = '<__media' + tail.split('__>', 1)[0] + '__>' -%}",
    "  {%- set text = content.split('<__media', 1)[0] + tail.split('__>', 1)[1] -%}",
    "  {%- if text.startswith('\\n') -%}",
    "    {%- set content = marker + text -%}",
    "  {%- else -%}",
    "    {%- set content = marker + '\\n' + text -%}",
    "  {%- endif -%}",
    "{%- endif -%}",
]


def turn_tags(family: str) -> tuple[str, str, str, str, str, str, str]:
    """(system open, system close, user open, user close, assistant open, assistant close,
    generation prompt) of `family`'s conversation format."""
    tags = _TAGS[family]
    return (*tags, _GENERATION.get(family, tags[4]))


def _q(text: str) -> str:
    """A Jinja string literal."""
    quote = '"' if "'" in text and '"' not in text else "'"
    return quote + text.replace("\\", "\\\\").replace("\n", "\\n").replace(quote, "\\" + quote) + quote


def chat_template(family: str) -> str:
    """The Jinja chat template rendering `family`'s Imp conversation format (one statement a line;
    every tag trims the blanks around it, so the lines add nothing to the text)."""
    sys_open, sys_close, user_open, user_close, asst_open, asst_close, generation = turn_tags(family)
    lines = [
        f"{{#- Imp's conversation format ({family}), written by imp. -#}}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "  {%- set system = messages[0]['content'] -%}",
        "  {%- set turns = messages[1:] -%}",
        "{%- else -%}",
        f"  {{%- set system = {_q(IMP_SYSTEM)} -%}}",
        "  {%- set turns = messages -%}",
        "{%- endif -%}",
        f"{{{{- {_q(sys_open)} + system + {_q(sys_close)} -}}}}",
        "{%- for message in turns -%}",
        "{%- if message['role'] == 'user' -%}",
        *["  " + line for line in _USER_TEXT],
        f"  {{{{- {_q(user_open)} + content + {_q(user_close)} -}}}}",
        "{%- elif message['role'] == 'assistant' -%}",
        f"  {{{{- {_q(asst_open)} + message['content'] + {_q(asst_close)} -}}}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}",
        f"  {{{{- {_q(generation)} -}}}}",
        "{%- endif -%}",
    ]
    return "\n".join(lines) + "\n"


FAMILIES = tuple(_TAGS)
