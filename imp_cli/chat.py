"""`imp chat`: a conversation about an image, in a terminal (a REPL) or from a pipe (a line, a turn).

Each question is answered with the whole conversation in the model's template, earlier answers
re-rendered as text exactly as Imp's own conversation does. The previous turns stay in the KV
cache (kept up to the first token where the generated ids differ from that re-rendering: most
often none), so a follow-up evaluates only its own tokens; the [system, image] prefix comes from
the prompt cache when the image was seen before.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .ask import Request, sampling_of
from .errors import ImpError
from .output import Output
from .prompts import Turn

PROMPT = ">>> "
HISTORY_LENGTH = 1000
COMMANDS_HELP = """\
/image PATH|URL   talk about another image (a new conversation: Imp takes one image per conversation)
/reset            forget the conversation, keep the image and the system text
/system [TEXT]    replace the system text (without TEXT: show it)
/save FILE        write the transcript as JSON (model, image, system, turns)
/stats            timings of the last answer
/help             this list
/exit             leave (also Ctrl-D, or Ctrl-C at an empty prompt)
Ctrl-C during an answer stops it; what was said stays in the conversation."""


@dataclass
class Said:
    """A turn as it happened: the Turn fed back to the model, and why its answer ended."""

    turn: Turn
    finish_reason: str


class Exit(Exception):
    """/exit"""


class Chat:
    """The conversation's state, and what each input line does to it."""

    def __init__(self, session, output: Output, opts: Request, interactive: bool):
        self.session, self.output, self.opts = session, output, opts
        self.sampling = sampling_of(opts)
        self.interactive = interactive  # a person at a terminal (Ctrl-C stops an answer, not the chat)
        self.stream_answers = not output.json_mode  # --json: one record per turn instead
        self.image = None  # session.Staged
        self.system = opts.system
        self.said: list[Said] = []  # the whole conversation, for /save
        self.context: list[Said] = []  # the turns still given to the model (the oldest may be dropped)
        self.last = None  # the last Answer, for /stats
        self.commands = {"/image": self.cmd_image, "/reset": self.cmd_reset, "/system": self.cmd_system,
                         "/save": self.cmd_save, "/stats": self.cmd_stats, "/help": self.cmd_help,
                         "/exit": self.cmd_exit, "/quit": self.cmd_exit}

    # -- input lines ----------------------------------------------------------------------------
    def handle(self, line: str) -> None:
        """One line: a /command or a question. Raises ImpError for bad input, Exit for /exit."""
        line = line.strip()
        if not line:
            return
        if line.startswith("/"):
            name, _, arg = line.partition(" ")
            command = self.commands.get(name.lower())
            if command is None:
                raise ImpError(f"unknown command {name} (/help lists them)")
            command(arg.strip())
        else:
            self.ask(line)

    def set_image(self, loaded) -> None:
        self.image = self.session.stage(loaded)
        self.said, self.context = [], []

    # -- a question -----------------------------------------------------------------------------
    def ask(self, question: str) -> None:
        context = self._fitting(question)
        stream = self.session.answer(self.image, question, [s.turn for s in context], self.system,
                                     self.sampling, self.opts.max_tokens)
        if len(context) < len(self.context):
            n = len(self.context) - len(context)
            self.output.warn(f"the conversation no longer fits the context of {self.session.engine.n_ctx} "
                             f"tokens: dropped the oldest {n} turn{'s' if n > 1 else ''} (the image and "
                             "system text stay)")
            self.context = context
        stopped = False
        try:
            for piece in stream:
                if self.stream_answers:
                    self.output.answer(piece)
        except KeyboardInterrupt:
            if not self.interactive:  # a script interrupted: the whole run ends (exit 130)
                raise
            stopped = True
            if stream.text and self.stream_answers:
                self.output.answer("\n")  # end the partial answer's line
            self.output.info("(stopped)")
        answer, text = stream.result, stream.text
        reason = answer.finish_reason if answer else "interrupted"
        if reason == "interrupted" and not text:
            return  # nothing said: as if not asked
        self.last = answer or self.last
        # The text goes back with the next question as Imp's conversation has it (see make_prompt)
        said = Said(Turn(question, text, tuple(answer.tokens) if answer else None), reason)
        self.said.append(said)
        self.context.append(said)
        if not self.stream_answers:
            self._record(question, answer, text)
        elif not stopped:
            self.output.answer("\n\n")  # a blank line after each answer
        if reason == "context":
            self.output.warn("the answer was cut off: the context is full (raise --ctx or /reset)")

    def _fitting(self, question: str) -> list[Said]:
        """The most recent turns that leave room for an answer of --max-tokens after the prompt
        (all of them while they fit). The question alone not fitting is for the session to say."""
        keep = self.session.turns_that_fit(self.image, question, [s.turn for s in self.context], self.system,
                                           self.opts.max_tokens)
        return self.context[len(self.context) - keep:]

    def _record(self, question: str, answer, text: str) -> None:
        from .record import from_session

        if answer is None:  # interrupted before anything was generated: nothing to record
            return
        self.output.record(from_session(self.session, answer, question=question, image=self.image,
                                        sampling=self.sampling, max_tokens=self.opts.max_tokens, answer=text,
                                        turn=len(self.said)))

    # -- commands -------------------------------------------------------------------------------
    def cmd_image(self, arg: str) -> None:
        from .images import load_image

        if not arg:
            self.output.info(f"image: {self.image.source if self.image else '(none)'}")
            return
        if arg == "-":
            raise ImpError("/image reads a path or a URL (standard input carries the conversation)")
        self.set_image(load_image(arg))
        self.output.info(f"new conversation about {arg} ({self.image.width}x{self.image.height})")

    def cmd_reset(self, arg: str) -> None:
        self.said, self.context = [], []
        self.output.info("new conversation")

    def cmd_system(self, arg: str) -> None:
        if not arg:
            if self.system is not None:
                self.output.info(f"system: {self.system}")
            else:
                from .prompts import PHI2_SYSTEM  # every family's template uses Imp's own sentence

                self.output.info(f"system (the model's own): {PHI2_SYSTEM}")
            return
        self.system = arg  # the turns stay; the whole conversation is evaluated again once
        self.output.info("system text replaced")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise ImpError("/save needs a file name")
        text = json.dumps(self.transcript(), ensure_ascii=False, indent=2) + "\n"
        write_atomically(os.path.expanduser(arg), text)
        self.output.info(f"saved {len(self.said)} turn{'s' if len(self.said) != 1 else ''} to {arg}")

    def cmd_stats(self, arg: str) -> None:
        if self.last is None:
            self.output.info("no answer yet")
            return
        from .stats import summary

        self.output.table("timings (last answer)", summary(self.last.timings))

    def cmd_help(self, arg: str) -> None:
        self.output.info(COMMANDS_HELP)

    def cmd_exit(self, arg: str) -> None:
        raise Exit()

    def transcript(self) -> dict:
        from .record import image_info, model_info

        pair = self.session.pair
        image = self.image
        return {
            "model": model_info(pair),
            "image": image_info(image),
            "system": self.system,  # null: the model's own
            "turns": [{"question": s.turn.question, "answer": s.turn.answer, "finish_reason": s.finish_reason}
                      for s in self.said],
        }


def write_atomically(path: str, text: str) -> None:
    """Written beside `path` under a temporary name, then renamed: never half a file."""
    from convert.atomic import write_text

    try:
        write_text(Path(path), text)
    except OSError as e:
        raise ImpError(f"cannot write '{path}': {e.strerror or e}") from None


# -- reading lines ------------------------------------------------------------------------------
class Terminal:
    """Lines typed at a prompt, with line editing and a history file (GNU readline, when there)."""

    def __init__(self, output: Output, commands=()):
        from . import store

        self.output = output
        self.commands = sorted(commands)
        self.history = store.home() / "chat_history"
        colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        # \001 and \002 tell readline the colour codes take no room on the line
        self.prompt = f"\001\033[1;32m\002{PROMPT}\001\033[0m\002" if colour else PROMPT
        try:
            import readline
        except ImportError:  # no line editing on this Python: input() still works
            readline = None
        self.readline = readline
        if readline is not None:
            readline.set_history_length(HISTORY_LENGTH)
            try:
                readline.read_history_file(str(self.history))
            except OSError:
                pass  # none yet (or unreadable: start afresh)
            self._loaded = readline.get_current_history_length()
            readline.set_completer(self._complete)  # Tab completes /commands
            readline.set_completer_delims(" \t\n")
            readline.parse_and_bind("tab: complete")

    def _complete(self, text: str, state: int) -> str | None:
        line = self.readline.get_line_buffer()
        if line.startswith("/") and " " not in line:
            matches = [c + " " for c in self.commands if c.startswith(text)]
            return matches[state] if state < len(matches) else None
        return None

    def read(self) -> str | None:
        """The next line; None to leave (Ctrl-D, or Ctrl-C at an empty prompt)."""
        while True:
            try:
                if sys.stdout.isatty():
                    return input(self.prompt)
                sys.stderr.write(PROMPT)  # stdout carries answers only
                sys.stderr.flush()
                return input()
            except EOFError:
                self.output.err.print()
                return None
            except KeyboardInterrupt:
                typed = self.readline.get_line_buffer() if self.readline is not None else ""
                self.output.err.print()
                if not typed:
                    return None
                # Ctrl-C on a half-typed line drops the line, as a shell does

    def close(self) -> None:
        if self.readline is None:
            return
        new = self.readline.get_current_history_length() - self._loaded
        if new <= 0:
            return
        try:
            # Appended (then trimmed to HISTORY_LENGTH), so that two chats at once both keep theirs
            self.history.parent.mkdir(parents=True, exist_ok=True)
            self.history.touch()
            self.readline.append_history_file(new, str(self.history))
        except OSError as e:
            self.output.note(f"could not save the chat history: {e}")


def piped_lines():
    """Standard input, a line at a time as it arrives (a script, or another program talking)."""
    stream = sys.stdin.buffer
    n = 0
    while True:
        raw = stream.readline()
        if not raw:
            return
        n += 1
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            yield ImpError(f"input line {n} is not UTF-8 text")


# -- the command --------------------------------------------------------------------------------
def run_chat(opts: Request, output: Output) -> int:
    """`opts`: ask's options (images: the one to start with, if any; questions: unused).
    The conversation until the input ends or the user leaves; the exit code (piped input:
    1 if any line failed, each failure said on its own line)."""
    from .images import load_image
    from .opening import open_session

    interactive = sys.stdin.isatty()
    loaded = None
    if opts.images:  # (one: the command takes [IMAGE])
        loaded = load_image(opts.images[0])  # a bad image fails before the model loads
        if opts.images[0] == "-":
            interactive = _talk_on_terminal()
    with open_session(opts.model, opts.mmproj, output, use_cache=opts.cache, threads=opts.threads,
                      ctx=opts.ctx, verbose=opts.verbose, note=output.note, repack=opts.repack,
                      flash_attn=opts.flash_attn) as session:
        chat = Chat(session, output, opts, interactive)
        if loaded is not None:
            chat.set_image(loaded)
            del loaded
        if not interactive:
            failed = False
            for line in piped_lines():
                result = _turn(chat, line, output)
                if result == "exit":
                    break
                failed |= result == "failed"
            return 1 if failed else 0
        image = f", image {chat.image.source}" if chat.image else ""
        output.info(f"imp chat: model {session.pair.name}{image}. /help for commands, Ctrl-D to leave.")
        terminal = Terminal(output, chat.commands)
        try:
            while (line := terminal.read()) is not None and _turn(chat, line, output) != "exit":
                pass
        finally:
            terminal.close()
        return 0


def _turn(chat: Chat, line, output: Output) -> str:
    """One input line -> "ok", "failed" or "exit". Nothing a user types ends the conversation
    with a traceback: bad input is one line on stderr, then the next line."""
    try:
        if isinstance(line, ImpError):
            raise line
        chat.handle(line)
        return "ok"
    except Exit:
        return "exit"
    except KeyboardInterrupt:  # outside an answer (loading an image, evaluating the prompt)
        if not chat.interactive:
            raise
        output.err.print()
        output.info("(stopped)")
        return "ok"
    except Exception as e:  # bad input, or a bug: one line (Output.failure), and the chat goes on
        output.failure(e)
    return "failed"


def _talk_on_terminal() -> bool:
    """The image came on standard input: the conversation then needs the terminal."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR)
    except OSError:
        raise ImpError("the image came on standard input and there is no terminal for the conversation: "
                       "give the image as a path or URL") from None
    os.dup2(fd, sys.stdin.fileno())
    os.close(fd)
    return True
