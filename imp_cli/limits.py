"""What one request to `imp serve` may ask for, and the checks that hold it to that (issue 21).

Every size a client controls is bounded before work proportional to it starts, and every check
here runs in time linear in the request: a request over a limit gets an OpenAI-shaped 400 that
names the limit and the option that raises it. Defaults sit well above what a conversation that
fits the context can use, so only abuse meets them.
"""

from __future__ import annotations

from dataclasses import dataclass

# The defaults of the sizes and times imp serve's options set (--max-body, --max-image-memory,
# --remote-timeout), kept here with the others so that the options, ServeOptions and the modules
# that enforce them (images.py, remote.py) read one value.
MAX_IMAGE_BYTES = 50 * 1024 * 1024  # an image's bytes (file, stdin, URL, data: URL); a request body
# What a decode may hold in memory, in bytes: width x height x (bytes per pixel of the decoded mode
# + its 8-bit RGB copy), checked on the header before any pixel is decompressed (images.py). Pillow's
# own guard counts pixels, and a 223 KB 16-bit PNG cost 1.7 GB (issue 21). 256 MiB: a 67-megapixel
# RGB photo; IMP_MAX_IMAGE_MEMORY (bytes) or `imp serve --max-image-memory` changes it.
MAX_DECODE_BYTES = 256 * 1024 * 1024
REMOTE_DEADLINE = 20.0  # seconds for a whole remote image fetch (remote.fetch_public)

MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 256  # a stop string is a marker, not a document (OpenAI does not say; llama.cpp has none)


@dataclass(frozen=True)
class Limits:
    max_messages: int = 1024  # a 4096-token context holds far fewer (every turn costs template tokens)
    max_parts: int = 1024  # content parts, all messages together


class LimitError(Exception):
    """A request over a limit, or text that is not valid Unicode: the server answers 400."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def check_messages(messages: list, limits: Limits) -> None:
    if len(messages) > limits.max_messages:
        raise LimitError(f"'messages' holds {len(messages):,} messages; this server takes at most "
                         f"{limits.max_messages:,} (imp serve --max-messages)", "messages", "too_many_messages")


def check_parts(seen: int, param: str, limits: Limits) -> None:
    """`seen`: content parts counted so far, this message's included."""
    if seen > limits.max_parts:
        raise LimitError(f"the messages hold more than {limits.max_parts:,} content parts "
                         "(imp serve --max-content-parts)", param, "too_many_content_parts")


def check_stops(stops: list[str]) -> None:
    if len(stops) > MAX_STOPS:
        raise LimitError(f"'stop' takes at most {MAX_STOPS} strings", "stop")
    for i, s in enumerate(stops):
        if len(s) > MAX_STOP_CHARS:
            raise LimitError(f"'stop[{i}]' is {len(s):,} characters long; a stop string may have at most "
                             f"{MAX_STOP_CHARS}", "stop", "stop_too_long")


def check_unicode(texts, param: str = "messages") -> None:
    """Text a client sent must be valid Unicode: JSON's \\ud800 escapes decode to lone surrogates,
    which no tokenizer, log or response can encode."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise LimitError(f"the request holds text that is not valid Unicode (a lone surrogate "
                             f"{text[e.start]!r} at character {e.start}): send UTF-8 text", param,
                             "invalid_unicode") from None


def json_value_cap(limits: Limits, n_ctx: int, max_token_bytes: int) -> int:
    """How many JSON values a request this server can answer may hold, at most: the structure of
    max_messages messages with max_parts content parts between them, a few thousand for the
    parameters and fields we ignore (tools schemas), and text as long as the context can take
    (twice over: the count below sees the commas and brackets inside strings too)."""
    return 16 * (limits.max_messages + limits.max_parts) + 65_536 + 2 * n_ctx * max(1, max_token_bytes)


def check_json_values(body: bytes, cap: int) -> None:
    """Refuse, before parsing, a body of more JSON values than `cap`: every value but the first
    of each array or object follows a ',' and each array or object opens with '[' or '{', so
    those characters (also inside strings) bound the values. Parsing millions of tiny values
    holds the interpreter lock for seconds (a 43 MB body of content parts: 8 s), however
    off the event loop it runs; these three scans of the bytes take milliseconds."""
    n = body.count(b",") + body.count(b"{") + body.count(b"[")
    if n > cap:
        raise LimitError(f"the body holds up to {n:,} JSON values (counting ',', '{{' and '[' anywhere in it); a "
                         f"request this server can answer holds at most {cap:,}", None, "too_many_values")


def check_prompt_bytes(n_bytes: int, n_ctx: int, max_token_bytes: int) -> None:
    """Refuse, before tokenizing, a prompt whose text cannot fit the context: no token of this
    vocabulary covers more than `max_token_bytes` bytes, so the text is at least
    n_bytes / max_token_bytes tokens."""
    if max_token_bytes > 0 and n_bytes > n_ctx * max_token_bytes:
        raise LimitError(f"the prompt's text is {n_bytes:,} bytes: at least {-(-n_bytes // max_token_bytes):,} "
                         f"tokens, more than the context of {n_ctx:,} (a token of this model covers at most "
                         f"{max_token_bytes} bytes)", "messages", "context_length_exceeded")
