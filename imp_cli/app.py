"""The `imp` command line: parses options, calls the converter or the engine, nothing else.

Heavy modules (numpy, Pillow, gguf, llama_cpp) are imported inside commands so that
`imp --help` stays instant.
"""

from __future__ import annotations

import contextlib
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import click
import typer

from convert.formats import DEFAULT_MMPROJ_TYPE, DEFAULT_TEXT_TYPE, MMPROJ_TYPES, TEXT_TYPES

from . import netguard
from .limits import MAX_DECODE_BYTES, MAX_IMAGE_BYTES, REMOTE_DEADLINE, Limits

try:  # typer >= 0.21 vendors its own parser; older releases use click's exceptions
    from typer import TyperException as _ParserError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import ClickException as _ParserError

app = typer.Typer(
    name="imp",
    help="Run Imp vision-language models locally, quantized, through llama.cpp.",
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# The choices come from the one list of types (convert/formats.py, no heavy imports).
Switch = Enum("Switch", {v: v for v in ("auto", "on", "off")}, type=str)
CacheMode = Enum("CacheMode", {v: v for v in ("auto", "read", "write", "off")}, type=str)
ProgressMode = Enum("ProgressMode", {v: v for v in ("auto", "bar", "lines", "off")}, type=str)


class _Choice(click.Choice):
    """Accepted in any case, shown as the README writes them (click shows them casefolded)."""

    def __init__(self, choices):
        super().__init__(list(choices), case_sensitive=False)

    def get_metavar(self, param, ctx=None) -> str:
        return "[" + "|".join(self.choices) + "]"

    def get_invalid_choice_message(self, value, ctx=None) -> str:
        return f"{value!r} is not one of {', '.join(self.choices)} (any case)"


# -q is `imp ask`'s --question everywhere; the quantization has no short form. Shown as the README
# writes the types (F16, Q8_0, Q4_K_M), accepted in any case.
QUANT_OPTION = typer.Option(DEFAULT_TEXT_TYPE, "--quant", envvar="IMP_QUANT", click_type=_Choice(TEXT_TYPES), help="Language model type.")

# Options shared by the commands that answer (ask, chat, serve): declared once.
MODEL_OPTION = typer.Option(None, "--model", "-m", envvar="IMP_MODEL", help="Store name, known name, repo id, text GGUF (mmproj found beside it) or folder holding the pair.")
MMPROJ_OPTION = typer.Option(None, "--mmproj", envvar="IMP_MMPROJ", help="The vision projector GGUF, if not beside the model.")
MAX_TOKENS_OPTION = typer.Option(512, "--max-tokens", "-n", envvar="IMP_MAX_TOKENS", min=1, help="Stop after this many tokens.")
TEMPERATURE_OPTION = typer.Option(0.0, "--temperature", "--temp", envvar="IMP_TEMPERATURE", min=0.0, help="0 is greedy (deterministic); above 0 the answer is sampled (random unless --seed).")
TOP_P_OPTION = typer.Option(1.0, "--top-p", envvar="IMP_TOP_P", min=0.0, max=1.0)
TOP_K_OPTION = typer.Option(0, "--top-k", envvar="IMP_TOP_K", min=0, help="0 disables top-k.")
SEED_OPTION = typer.Option(None, "--seed", envvar="IMP_SEED", help="Sampling seed (with --temperature > 0); default: a fresh random seed per answer, recorded in --json.")
SYSTEM_OPTION = typer.Option(None, "--system", envvar="IMP_SYSTEM", help="Replace the model's system prompt.")
THREADS_HELP = "CPU threads (0: one per physical core)."
THREADS_OPTION = typer.Option(0, "--threads", "-t", envvar="IMP_THREADS", min=0, help=THREADS_HELP)
CTX_OPTION = typer.Option(4096, "--ctx", envvar="IMP_CTX", min=64, help="Context size (capped at the model's trained context).")
NO_CACHE_OPTION = typer.Option(False, "--no-cache", help="Neither read nor write the prompt cache (also IMP_CACHE=off).")
VERBOSE = typer.Option(False, "--verbose", "-v", envvar="IMP_VERBOSE", help="Show llama.cpp logs and tracebacks.")
REPACK_OPTION = typer.Option(Switch.auto, "--repack", envvar="IMP_REPACK", case_sensitive=False, help="Repack the weights at load (llama.cpp's use_extra_bufts); auto: as `imp tune` measured, else the CPU family's default.")
FLASH_ATTN_OPTION = typer.Option(Switch.auto, "--flash-attn", envvar="IMP_FLASH_ATTN", case_sensitive=False, help="Flash attention; auto: as `imp tune` measured, else the CPU family's default.")


@app.command()
def convert(
    source: str = typer.Argument(..., help="Checkpoint folder, or Hugging Face repo id (owner/name[@revision])."),
    out: Path = typer.Option(Path("."), "--out", "-o", help="Folder for the two GGUF files."),
    quant: str = QUANT_OPTION,
    mmproj_type: str = typer.Option(DEFAULT_MMPROJ_TYPE, "--mmproj-type", click_type=_Choice(MMPROJ_TYPES), help="Vision projector type."),
    name: Optional[str] = typer.Option(None, "--name", help="Base name of the output files (default: the checkpoint's)."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace existing output files."),
    threads: int = typer.Option(0, "--threads", "-t", envvar="IMP_THREADS", min=0, help="Quantization threads (0: one per physical core)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    verbose: bool = VERBOSE,
) -> None:
    """Convert an Imp checkpoint into a language-model GGUF and a vision (mmproj) GGUF."""
    with _command(json_mode=json_out, verbose=verbose) as output:
        from convert.pipeline import convert as run_convert

        result = run_convert(source, out, quant=quant, mmproj_type=mmproj_type, force=force,
                             progress=output, threads=_threads(threads, output) or _physical_cores(),
                             name=name, verbose=verbose)
        if json_out:
            output.record(conversion_record(result))
        else:
            output.answer(
                f"{result.text_path}\t{result.text_type}\t{_size(result.text_bytes)}\n"
                f"{result.mmproj_path}\t{result.mmproj_type}\t{_size(result.mmproj_bytes)}\n"
            )
            output.info(f"converted {result.source} ({result.family}, {result.layout} layout) in {result.seconds:.1f} s")
            output.info(f"read the vocabulary from {result.tokenizer_from}, the context length "
                        f"({result.context_length}) from {result.context_from}, the vision tower from "
                        f"{result.vision_config_from}")


@app.command()
def ask(
    args: Optional[List[str]] = typer.Argument(None, metavar="IMAGE... [QUESTION]", help="Image(s): a path, a folder (its images, recursively), - for standard input, or an http(s) URL; then the question, unless given with -q."),
    questions: Optional[List[str]] = typer.Option(None, "--question", "-q", help="A question (repeatable); every positional argument is then an image."),
    questions_from: Optional[str] = typer.Option(None, "--questions-from", metavar="FILE|-", help="Questions, one per line, from a file or standard input."),
    model: Optional[str] = MODEL_OPTION,
    mmproj: Optional[str] = MMPROJ_OPTION,
    max_tokens: int = MAX_TOKENS_OPTION,
    temperature: float = TEMPERATURE_OPTION,
    top_p: float = TOP_P_OPTION,
    top_k: int = TOP_K_OPTION,
    seed: int = SEED_OPTION,
    system: Optional[str] = SYSTEM_OPTION,
    threads: int = THREADS_OPTION,
    ctx: int = CTX_OPTION,
    no_cache: bool = NO_CACHE_OPTION,
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Generate exactly --max-tokens (for benchmarks)."),
    choices: Optional[str] = typer.Option(None, "--choices", metavar="A,B,...|@FILE", help="Print the likeliest of these answers (scored, not generated; --json adds their probabilities)."),
    json_schema: Optional[str] = typer.Option(None, "--json-schema", metavar="SCHEMA|@FILE", help="Generate JSON valid against this JSON schema (inline or a file)."),
    grammar: Optional[str] = typer.Option(None, "--grammar", metavar="@FILE", help="Generate only what this GBNF grammar (root rule `root`) allows."),
    json_out: bool = typer.Option(False, "--json", help="One JSON record per answer (README: Records; imp_cli/schema/record.schema.json)."),
    stats: bool = typer.Option(False, "--stats", envvar="IMP_STATS", help="Print timings to stderr."),
    repack: Switch = REPACK_OPTION,
    flash_attn: Switch = FLASH_ATTN_OPTION,
    images_from: Optional[str] = typer.Option(None, "--images-from", metavar="FILE|-", help="Images (paths, folders or URLs), one per line, from a file or standard input; read as the run goes.", rich_help_panel="Batches"),
    glob: Optional[str] = typer.Option(None, "--glob", metavar="PATTERN", help="Which files of a folder argument (matched against the path inside it, e.g. '*.jpg' or 'cams/*/*.png'; default: image extensions).", rich_help_panel="Batches"),
    output_file: Optional[str] = typer.Option(None, "--output", "-o", metavar="FILE", help="Write the --json records to FILE (JSON lines, each written whole and flushed).", rich_help_panel="Batches"),
    resume: bool = typer.Option(False, "--resume", help="Continue --output FILE: skip each (image, question) it already answers with this model and these settings (images known by the sha256 of their bytes).", rich_help_panel="Batches"),
    fsync: int = typer.Option(0, "--fsync", metavar="N", min=0, help="Also fsync FILE every N records (0: at the end only).", rich_help_panel="Batches"),
    max_errors: int = typer.Option(0, "--max-errors", metavar="N", min=0, help="Stop after N images failed (0: never; each failure is an error record).", rich_help_panel="Batches"),
    shard: Optional[str] = typer.Option(None, "--shard", metavar="I/N", help="Only the images whose stable hash (of the path or URL as given) falls in shard I of N (0 <= I < N).", rich_help_panel="Batches"),
    jobs: int = typer.Option(1, "--jobs", "-j", envvar="IMP_JOBS", min=1, help="Worker processes, each with its share of --threads (the weights are shared through the page cache).", rich_help_panel="Batches"),
    progress: ProgressMode = typer.Option(ProgressMode.auto, "--progress", case_sensitive=False, help="Batch progress on stderr: bar, lines (one every 30 s), off; auto: bar on a terminal, else lines.", rich_help_panel="Batches"),
    cache_mode: CacheMode = typer.Option(CacheMode.auto, "--cache", case_sensitive=False, help="Prompt cache: read, write (read and write), off; auto: one image reads and writes, a batch only reads.", rich_help_panel="Batches"),
    verbose: bool = VERBOSE,
) -> None:
    """Answer a question about an image (or each question about each of several), streaming to stdout."""
    from .output import Output

    images, asked = _split_ask_args(list(args or []), list(questions or []), questions_from, images_from)
    output = Output(json_mode=json_out, verbose=verbose)
    choice_list, constraint = _constraints(choices, json_schema, grammar, output)
    _threads(threads, output)
    batch = _batch_options(images_from, glob, output_file, resume, fsync, max_errors, shard, jobs, progress)
    cache_read = not no_cache and cache_mode != CacheMode.off
    cache_write = {CacheMode.write: True, CacheMode.read: False}.get(cache_mode)
    with _errors(output):
        from .ask import Request, read_questions
        from .batch import run_ask

        if questions_from:
            asked += read_questions(questions_from)
        request = Request(images=images, questions=asked, model=model, mmproj=mmproj, max_tokens=max_tokens,
                          temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, system=system,
                          threads=threads, ctx=ctx, verbose=verbose, ignore_eos=ignore_eos, cache=cache_read,
                          cache_write=cache_write, choices=choice_list, constraint=constraint, repack=repack.value,
                          flash_attn=flash_attn.value)
        status = run_ask(request, output, stats=stats, batch=batch)
    if status:
        raise typer.Exit(status)


def _constraints(choices: str | None, json_schema: str | None, grammar: str | None, output):
    """--choices / --json-schema / --grammar, checked before any model work: a value that cannot
    be used is a one-line usage error (exit 2)."""
    if choices is None and json_schema is None and grammar is None:
        return None, None
    from .constrain import ConstraintError, from_options

    try:
        return from_options(choices, json_schema, grammar)
    except ConstraintError as e:
        output.error(str(e))
        raise typer.Exit(2) from None


@app.command()
def chat(
    image: Optional[str] = typer.Argument(None, metavar="[IMAGE]", help="The image to talk about: a path, - for standard input, or an http(s) URL (/image changes it)."),
    model: Optional[str] = MODEL_OPTION,
    mmproj: Optional[str] = MMPROJ_OPTION,
    max_tokens: int = MAX_TOKENS_OPTION,
    temperature: float = TEMPERATURE_OPTION,
    top_p: float = TOP_P_OPTION,
    top_k: int = TOP_K_OPTION,
    seed: int = SEED_OPTION,
    system: Optional[str] = SYSTEM_OPTION,
    threads: int = THREADS_OPTION,
    ctx: int = CTX_OPTION,
    no_cache: bool = NO_CACHE_OPTION,
    repack: Switch = REPACK_OPTION,
    flash_attn: Switch = FLASH_ATTN_OPTION,
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Generate exactly --max-tokens per answer."),
    json_out: bool = typer.Option(False, "--json", help="One JSON record per turn instead of the streamed text (the record of imp ask --json, plus turn)."),
    verbose: bool = VERBOSE,
) -> None:
    """Talk about an image: a REPL in a terminal (/help for its commands), or one question per input line from a pipe."""
    with _command(json_mode=json_out, verbose=verbose) as output:
        _threads(threads, output)
        from .ask import Request
        from .chat import run_chat

        options = Request(images=[image] if image is not None else [], questions=[], model=model, mmproj=mmproj,
                          max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                          system=system, threads=threads, ctx=ctx, verbose=verbose, ignore_eos=ignore_eos,
                          cache=not no_cache, repack=repack.value, flash_attn=flash_attn.value)
        code = run_chat(options, output)
    if code:
        raise typer.Exit(code)


@app.command()
def serve(
    model: Optional[str] = MODEL_OPTION,
    mmproj: Optional[str] = MMPROJ_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", envvar="IMP_HOST", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8080, "--port", "-p", envvar="IMP_PORT", min=0, max=65535, help="Port (0: any free port, printed at start)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="IMP_API_KEY", help="Require `Authorization: Bearer KEY` on every request but /health and the web page."),
    max_queue: int = typer.Option(16, "--max-queue", envvar="IMP_MAX_QUEUE", min=0, help="Requests that may wait for the engine; more get 503."),
    max_messages: int = typer.Option(Limits.max_messages, "--max-messages", envvar="IMP_MAX_MESSAGES", min=1, help="Messages in one request (400 beyond)."),
    max_parts: int = typer.Option(Limits.max_parts, "--max-content-parts", envvar="IMP_MAX_CONTENT_PARTS", min=1, help="Content parts in one request, all messages together (400 beyond)."),
    max_image_memory: int = typer.Option(MAX_DECODE_BYTES, "--max-image-memory", envvar="IMP_MAX_IMAGE_MEMORY", min=1, help="Bytes an image's decode may take: width x height x bytes per pixel, + its RGB copy (400 beyond)."),
    remote_timeout: float = typer.Option(REMOTE_DEADLINE, "--remote-timeout", envvar="IMP_REMOTE_TIMEOUT", min=0.1, help="Seconds for a whole remote image fetch (400 beyond)."),
    max_body_total: int = typer.Option(0, "--max-body-total", envvar="IMP_MAX_BODY_TOTAL", min=0, help="Bytes of request bodies held at once, all clients together (503 beyond; 0: 3 x --max-body)."),
    max_connections: int = typer.Option(netguard.MAX_CONNECTIONS, "--max-connections", envvar="IMP_MAX_CONNECTIONS", min=1, help="Open connections (503 and closed beyond)."),
    header_timeout: float = typer.Option(netguard.HEADER_TIMEOUT, "--header-timeout", envvar="IMP_HEADER_TIMEOUT", min=0.1, help="Seconds for a request's line and headers to arrive (408 and closed beyond)."),
    body_timeout: float = typer.Option(netguard.BODY_TIMEOUT, "--body-timeout", envvar="IMP_BODY_TIMEOUT", min=0.1, help="Seconds for a request's body to arrive (408 beyond)."),
    keep_alive: float = typer.Option(netguard.KEEP_ALIVE, "--keep-alive", envvar="IMP_KEEP_ALIVE", min=0.1, help="Seconds an idle kept-alive connection stays open."),
    max_body: int = typer.Option(MAX_IMAGE_BYTES, "--max-body", envvar="IMP_MAX_BODY", min=1024, help="Largest request body in bytes (413 beyond)."),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images", help="Fetch http(s) image URLs (never from loopback or private addresses)."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", envvar="IMP_MAX_TOKENS", min=1, help="Default max_tokens of a request that gives none."),
    temperature: float = typer.Option(0.0, "--temperature", "--temp", envvar="IMP_TEMPERATURE", min=0.0, max=2.0, help="Default temperature of a request that gives none (0: greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", envvar="IMP_TOP_P", min=0.0, max=1.0, help="Default top_p of a request that gives none."),
    top_k: int = typer.Option(0, "--top-k", envvar="IMP_TOP_K", min=0, help="Default top_k of a request that gives none (0: off)."),
    seed: Optional[int] = typer.Option(None, "--seed", envvar="IMP_SEED", help="Default seed of a request that gives none (default: a fresh random seed per answer, returned as `seed`)."),
    system: Optional[str] = typer.Option(None, "--system", envvar="IMP_SYSTEM", help="System text for a conversation that has no system message (default: the model's own)."),
    cors_origin: Optional[List[str]] = typer.Option(None, "--cors-origin", envvar="IMP_CORS_ORIGIN", help="Let web pages from this origin (e.g. http://localhost:3000, or *) call the API from a browser; repeatable. Off by default."),
    threads: int = THREADS_OPTION,
    ctx: int = CTX_OPTION,
    no_cache: bool = NO_CACHE_OPTION,
    repack: Switch = REPACK_OPTION,
    flash_attn: Switch = FLASH_ATTN_OPTION,
    no_ui: bool = typer.Option(False, "--no-ui", help="No web page at GET / (the API and /health are unchanged)."),
    verbose: bool = VERBOSE,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (POST /v1/chat/completions), with a web page at GET /."""
    with _command(verbose=verbose) as output:
        from .serve import ServeOptions, run_serve

        _threads(threads, output)
        run_serve(ServeOptions(model=model, mmproj=mmproj, host=host, port=port, api_key=api_key, max_queue=max_queue,
                               max_body=max_body, allow_remote_images=allow_remote_images, max_tokens=max_tokens,
                               temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, system=system,
                               cors_origins=list(cors_origin or []), threads=threads, ctx=ctx, cache=not no_cache,
                               verbose=verbose, repack=repack.value, flash_attn=flash_attn.value,
                               max_messages=max_messages, max_parts=max_parts, max_image_memory=max_image_memory,
                               remote_timeout=remote_timeout, max_body_total=max_body_total,
                               max_connections=max_connections, header_timeout=header_timeout,
                               body_timeout=body_timeout, keep_alive=keep_alive, ui=not no_ui), output)


def _split_ask_args(args: list[str], questions: list[str], questions_from: str | None,
                    images_from: str | None = None) -> tuple[list[str], list[str]]:
    """`imp ask IMAGE... QUESTION`, or with -q/--questions-from every positional is an image;
    with --images-from the positional images may be none. The mistakes newcomers make (no image,
    no question, the two swapped) are usage errors that say so."""
    import shlex

    if questions_from == "-" and ("-" in args or images_from == "-"):
        raise click.UsageError("standard input (-) cannot hold both images and the questions")
    if questions or questions_from:
        if not args and images_from is None:
            raise click.UsageError("no image: give images before -q (or with --images-from FILE)")
        return args, questions
    if images_from is not None:
        if not args:
            raise click.UsageError("no question: give it after the images (or with -q)")
        return args[:-1], [args[-1]]
    if len(args) < 2:
        given = args[0] if args else ""
        if args and (_is_image(given) or _looks_like_a_file(given)):
            missing = "" if _is_image(given) else f" (and there is no file {given!r})"
            raise click.UsageError(f"no question{missing}: put it after the image, e.g. imp ask {shlex.quote(given)} "
                                   "\"What is in the picture?\" (or give questions with -q)")
        raise click.UsageError(f"no image: imp ask takes the image(s) first, then the question, e.g. "
                               f"imp ask photo.jpg {shlex.quote(given or 'What is in the picture?')}")
    images, question = args[:-1], args[-1]
    if _is_image(question) and not any(_is_image(a) for a in images):
        raise click.UsageError(f"the image comes first, then the question: imp ask {shlex.quote(question)} "
                               + " ".join(shlex.quote(a) for a in images))
    return images, [question]


def _is_image(arg: str) -> bool:
    """An argument that can only be meant as an image: standard input, a URL, an existing file or
    a folder (its images)."""
    import os

    return arg == "-" or arg.lower().startswith(("http://", "https://")) or os.path.exists(arg)


def _looks_like_a_file(arg: str) -> bool:
    import os

    return (os.sep in arg or arg.lower().endswith((".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"))) \
        and "\n" not in arg and "?" not in arg


def _threads(threads: int, output) -> int:
    """--threads as given (0: one per physical core); a warning when it exceeds the CPUs this
    process may run on (llama.cpp's threads then wait for each other)."""
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads > cpus:
        output.warn(f"--threads {threads} is more than the {cpus} CPU{'s' if cpus != 1 else ''} here: "
                    "llama.cpp gets slower with more threads than cores (0: one per physical core)")
    return threads


def _physical_cores() -> int:
    from .cpuinfo import physical_cores

    return physical_cores()


def conversion_record(result) -> dict:
    """`imp convert --json`: the names the answer records use (quant, mmproj_type, *_ms)."""
    d = result.as_dict()
    out = {"text": d.pop("text_path"), "quant": d.pop("text_type"), "text_bytes": d.pop("text_bytes"),
           "mmproj": d.pop("mmproj_path"), "mmproj_type": d.pop("mmproj_type"), "mmproj_bytes": d.pop("mmproj_bytes")}
    out.update(d)
    out["total_ms"] = round(out.pop("seconds") * 1000, 1)
    return out


def _batch_options(images_from, glob, output_file, resume, fsync, max_errors, shard, jobs, progress):
    """The batch options, checked before any model work: a value that cannot be used is a usage
    error (exit 2)."""
    from .batch import BatchOptions, parse_shard

    if resume and output_file is None:
        raise click.UsageError("--resume needs --output FILE (the file to continue)")
    if output_file == "-":
        raise click.UsageError("--output takes a file: leave it out to write the records (--json) to standard output")
    try:
        shard_value = parse_shard(shard) if shard is not None else None
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    return BatchOptions(images_from=images_from, glob=glob, output=output_file, resume=resume, fsync=fsync,
                        max_errors=max_errors, shard=shard_value, jobs=jobs, progress=progress.value)


@app.command()
def pull(
    model: str = typer.Argument("imp-v1-3b", help="A known model name, a Hugging Face repo id (owner/name[@revision]), or a local checkpoint folder (converted and installed)."),
    quant: str = QUANT_OPTION,
    name: Optional[str] = typer.Option(None, "--name", help="Store name for a local checkpoint (default: its folder's name, lowercased)."),
    force: bool = typer.Option(False, "--force", "-f", help="Download and convert again even if installed; install under a known model's name."),
    threads: int = typer.Option(0, "--threads", "-t", envvar="IMP_THREADS", min=0, help="Quantization threads, also those `imp tune` measures with (0: one per physical core)."),
    no_tune: bool = typer.Option(False, "--no-tune", help="Do not run `imp tune` after a conversion."),
    verbose: bool = VERBOSE,
) -> None:
    """Download and convert a model into the model store (see `imp models`), then tune llama.cpp for it."""
    with _command(verbose=verbose) as output:
        from .pull import pull as run_pull

        entry = run_pull(model, output, quant=quant, force=force, threads=_threads(threads, output),
                         tune=not no_tune, name=name)
        output.answer(f"{entry.folder}\n")


@app.command()
def tune(
    model: Optional[str] = MODEL_OPTION,
    mmproj: Optional[str] = MMPROJ_OPTION,
    threads: int = THREADS_OPTION,
    rounds: int = typer.Option(1, "--rounds", min=1, help="Measure each setting this many times, interleaved, and keep its best figures (on a busy machine)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object on stdout (key, choice, measurements)."),
    verbose: bool = VERBOSE,
) -> None:
    """Measure weight repacking and flash attention on/off for this model and machine; keep the fastest."""
    with _command(json_mode=json_out, verbose=verbose) as output:
        from .opening import open_pair
        from .tune import run_tune

        _threads(threads, output)
        run_tune(open_pair(model, mmproj, output, pull=False), output, threads=threads, verbose=verbose, rounds=rounds)


models_app = typer.Typer(help="List, locate, import and remove models in the store.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(json_out: bool = typer.Option(False, "--json", help="One JSON array on stdout.")) -> None:
    """The installed models: name, source, quant, size, folder."""
    with _command(json_mode=json_out) as output:
        from . import store

        rows = [e.summary() for e in store.entries()]
        if json_out:
            import json

            output.answer(json.dumps(rows, indent=2) + "\n")
            return
        if not rows:
            output.info(f"no models installed in {store.models_dir()}: try `imp pull`")
        elif sys.stdout.isatty():  # a header for people; a pipe gets the rows only (cut, awk)
            output.answer("NAME\tSOURCE\tQUANT\tSIZE\tFOLDER\n")
        for r in rows:
            output.answer(f"{r['name']}\t{r['source']}\t{r['quant']}\t{_size(r['bytes'])}\t{r['path']}\n")


models_app.command("ls", hidden=True, help="Same as `imp models list`.")(models_list)


@models_app.command("path")
def models_path(name: str = typer.Argument(..., help="Store name.")) -> None:
    """Print the folder of an installed model."""
    with _command() as output:
        from . import store
        from .errors import ImpError

        entry = store.get(name)
        if entry is None:
            raise ImpError(f"no model named {name!r} in the store ({store.models_dir()})")
        output.answer(f"{entry.folder}\n")


YES_OPTION = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation (needed when standard input is not a terminal).")


@models_app.command("rm")
def models_rm(
    names: List[str] = typer.Argument(..., metavar="NAME...", help="Store names."),
    yes: bool = YES_OPTION,
) -> None:
    """Remove installed models (asks first unless --yes)."""
    with _command() as output:
        from . import store
        from .errors import ImpError

        folders = {}
        for name in dict.fromkeys(names):  # all checked before any is removed
            folder = store.entry_dir(name)
            if not folder.is_dir():
                raise ImpError(f"no model named {name!r} in the store ({store.models_dir()})")
            folders[name] = folder
        listed = ", ".join(f"{n} ({f})" for n, f in folders.items())
        _confirm(f"Remove {listed}?", f"not removing {', '.join(folders)} without confirmation", yes)
        for name in folders:
            store.remove(name)
            output.info(f"removed {name}")


models_app.command("remove", hidden=True, help="Same as `imp models rm`.")(models_rm)


def _confirm(question: str, refusal: str, yes: bool) -> None:
    """The one confirmation rule for what cannot be undone (models rm, cache clear): --yes goes
    ahead; a terminal is asked; anything else (a script) must say --yes."""
    from .errors import ImpError

    if yes:
        return
    if not sys.stdin.isatty():
        raise ImpError(f"{refusal}: pass --yes")
    if not typer.confirm(question, err=True):
        raise typer.Exit(1)


@models_app.command("import")
def models_import(
    text: Path = typer.Argument(..., help="Language-model GGUF."),
    mmproj: Optional[Path] = typer.Argument(None, help="Vision projector GGUF (default: found beside TEXT)."),
    name: str = typer.Option(..., "--name", help="Store name for the pair."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace an installed model of that name, or use a known model's name."),
) -> None:
    """Copy an existing GGUF pair into the store under NAME."""
    with _command() as output:
        from .imports import import_pair

        entry = import_pair(text, mmproj, name, force=force)
        output.answer(f"{entry.folder}\n")


cache_app = typer.Typer(help="The prompt cache: saved KV states of system-text + image prefixes.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info(json_out: bool = typer.Option(False, "--json", help="One JSON object on stdout.")) -> None:
    """Where the cache is, how many entries, how many bytes, the budget."""
    with _command(json_mode=json_out) as output:
        from .prompt_cache import PromptCache

        info = PromptCache().info()
        if json_out:
            output.record(info)
        else:
            output.answer(f"folder\t{info['folder']}\nentries\t{info['entries']}\n"
                          f"size\t{_size(info['bytes'])}\nbudget\t{_size(info['budget'])}\n")


@cache_app.command("clear")
def cache_clear(yes: bool = YES_OPTION) -> None:
    """Remove every entry (asks first unless --yes)."""
    with _command() as output:
        from .prompt_cache import PromptCache

        cache = PromptCache()
        n = cache.info()["entries"]
        if n:
            _confirm(f"Remove {n} entr{'y' if n == 1 else 'ies'} from {cache.folder}?",
                     f"not clearing the prompt cache ({n} entr{'y' if n == 1 else 'ies'}) without confirmation", yes)
        n = cache.clear()
        output.info(f"removed {n} entr{'y' if n == 1 else 'ies'} from {cache.folder}")


def _size(n: float) -> str:
    """Decimal units, as disks and IMP_CACHE_SIZE count them: 1 GB = 10^9 bytes."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"


@contextlib.contextmanager
def _command(json_mode: bool = False, verbose: bool = False):
    """Every command's frame: the one Output for what is not the answer, and the error table."""
    from .output import Output

    output = Output(json_mode=json_mode, verbose=verbose)
    with _errors(output):
        yield output


class _errors:
    """Known problems: one line on stderr, exit 1. Anything else: the same, traceback with -v."""

    def __init__(self, output):
        self.output = output

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, KeyboardInterrupt):
            self.output.err.print("interrupted")
        if exc is None or isinstance(exc, (typer.Exit, KeyboardInterrupt, SystemExit)):
            return False
        if isinstance(exc, BrokenPipeError):  # the reader went away (`| head`): stop quietly
            _silence_stdout()
            raise typer.Exit(141)
        self.output.failure(exc)
        raise typer.Exit(1)


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the final flush cannot fail again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main() -> None:
    """Entry point: exit 0 ok, 1 error, 2 usage, 130 interrupted."""
    try:
        # Without standalone mode the CLI library returns (not raises) the code of typer.Exit,
        # and leaves usage errors and Ctrl-C to us.
        result = app(standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except _ParserError as e:  # usage errors (exit_code 2) and other CLI errors
        code = getattr(e, "exit_code", 2)
        _show_cli_error(e)
    except (KeyboardInterrupt, typer.Abort):  # interrupted outside a command
        code = 130
    sys.stdout.flush()
    sys.exit(code)


def _show_cli_error(e) -> None:
    """A usage error as every other error is shown: one `error:` line naming the problem (and
    the fix, where we know it), then where the usage is."""
    from .output import Output

    ctx = getattr(e, "ctx", None)
    message = _explain(e, ctx) or _once(e.format_message())
    if ctx is not None and isinstance(e, click.UsageError):
        message += f" (`{ctx.command_path} --help` shows the usage)"
    Output().error(message)


def _explain(e, ctx) -> str | None:
    """What click says for the mistakes newcomers make, said as what to do instead."""
    if not isinstance(e, click.NoSuchOption) or ctx is None:
        return None
    option, command = e.option_name, ctx.command
    if option == "-q" and command.name in ("convert", "pull"):
        return f"-q is `imp ask`'s --question; the quantization is --quant (e.g. imp {command.name} ... --quant Q8_0)"
    if isinstance(command, click.Group):  # `imp --model X ask`: an option before its command
        owners = [name for name, sub in sorted(command.commands.items())
                  if not getattr(sub, "hidden", False)
                  and any(option in p.opts + p.secondary_opts for p in getattr(sub, "params", []))]
        if owners:
            where = ", ".join(f"`{ctx.command_path} {n}`" for n in owners)
            return (f"{option} is an option of {where}: give it after the command, "
                    f"e.g. {ctx.command_path} {owners[0]} {option} ...")
    return None


def _once(message: str) -> str:
    """Click and typer may each add a "Did you mean ...?": say it once."""
    import re

    seen, out = set(), []
    for sentence in re.split(r"(?<=[.?!])\s+", message.strip()):
        if sentence.startswith("Did you mean"):
            if any(s.startswith("Did you mean") for s in seen):
                continue
        if sentence in seen:
            continue
        seen.add(sentence)
        out.append(sentence)
    return " ".join(out)


if __name__ == "__main__":
    main()
