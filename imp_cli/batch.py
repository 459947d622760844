"""`imp ask` over many images: a folder, a list of millions, a run that survives a crash.

A run (run_batch) is three stages joined by bounded queues, so memory holds a few images, never
the list:
  - the reader (a thread): expands folders (recursively, each directory's listing sorted on its
    own: memory is one listing per level, not the tree), streams --images-from line by line,
    keeps the images of --shard I/N, reads each image's bytes, hashes them, and drops the
    (image, question) pairs that --resume found in the output already;
  - the answerers: one Answerer (a Session) in this process, or with --jobs N one in each of N
    worker processes, each with threads/N threads (the weights are memory-mapped, so the
    processes share one copy through the page cache unless repacking makes private copies);
  - the writer (this process only): --output FILE gets each record with one os.write() of the
    whole line on an O_APPEND descriptor (fsync every --fsync N records and at the end), else
    stdout. A crash can cut at most the last line; --resume cuts it off before appending.

An image that cannot be read, decoded or fetched becomes an error record (one per question) and a
line on stderr; the run goes on and exits 1 at the end (--max-errors N stops it early). Progress
goes to stderr: a Rich bar on a terminal, else a plain line every 30 s (IMP_PROGRESS_SECONDS).
The prompt cache is read, not written, unless --cache write (see Request.cache_write).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import queue
import sys
import threading
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .ask import Request, answer_question, open_for, run_fields, sampling_of
from .errors import ImpError
from .images import ImageError, LoadedImage, decode_source, read_source
from .output import Output
from .record import error_record

# What a folder argument picks up (lower case; --glob replaces this filter): what Pillow reads.
IMAGE_EXTENSIONS = frozenset((".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib",
                              ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga"))
PROGRESS_SECONDS = 30.0


@dataclass
class BatchOptions:
    images_from: str | None = None  # FILE or - : one path or URL per line, streamed
    glob: str | None = None  # which files of a folder argument (default: image extensions)
    output: str | None = None  # JSONL file, appended crash-safely
    resume: bool = False
    fsync: int = 0  # fsync the output every N records (0: only at the end)
    max_errors: int = 0  # stop after this many failed images (0: never)
    shard: tuple[int, int] | None = None  # (I, N): keep the images whose hash falls in shard I of N
    jobs: int = 1  # worker processes
    progress: str = "auto"  # auto | off | bar | lines


def is_batch(req: Request, opts: BatchOptions) -> bool:
    """Several images, a folder, a list or an output file: one bad image is then one error
    record, not the end of the run. A single image keeps `imp ask`'s one-shot behaviour."""
    return bool(len(req.images) > 1 or opts.output or opts.images_from is not None or opts.resume
                or opts.shard or opts.jobs > 1 or any(os.path.isdir(s) for s in req.images))


# -- which images ----------------------------------------------------------------------------------
def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' with 0 <= I < N -> (I, N); ValueError with the reason otherwise."""
    i, slash, n = text.partition("/")
    if not slash or not i.strip().isdigit() or not n.strip().isdigit():
        raise ValueError(f"--shard takes I/N (e.g. 0/4), not {text!r}")
    i, n = int(i), int(n)
    if n < 1 or i >= n:
        raise ValueError(f"--shard {text}: I must be 0 to N-1 (here 0 to {max(n - 1, 0)})")
    return i, n


def shard_of(source: str, n: int) -> int:
    """The shard (0..n-1) of an image: a stable hash of the path or URL exactly as given, so any
    scheduler's N independent processes split any list the same way without talking."""
    digest = hashlib.sha256(source.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % n


def walk(root: str, glob: str | None = None) -> Iterator[tuple[str, str | None]]:
    """(path, None) for each image file under `root`, recursively, in sorted order; (path, reason)
    for a directory that cannot be listed. Names starting with '.' are skipped; symlinked folders
    are not followed (no loops). `glob` matches the path relative to `root` instead of the
    extension filter. Memory: one directory's sorted listing per level of depth."""
    def listing(folder: str) -> Iterator[tuple[str, str | None]]:
        try:
            with os.scandir(folder) as it:
                entries = sorted(((e.name, e.is_dir(follow_symlinks=False)) for e in it if not e.name.startswith(".")))
        except OSError as e:
            yield folder, f"cannot read folder '{folder}': {e.strerror or e}"
            return
        for name, is_dir in entries:
            path = os.path.join(folder, name)
            if is_dir:
                yield from listing(path)
            elif glob is not None:
                if fnmatch.fnmatchcase(os.path.relpath(path, root).replace(os.sep, "/"), glob):
                    yield path, None
            elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield path, None

    yield from listing(root)


def list_lines(source: str, stdin=None) -> Iterator[str]:
    """--images-from FILE|-: one path or URL per line, read as it comes (blank lines skipped)."""
    try:
        f = (stdin or sys.stdin) if source == "-" else open(source, encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        raise ImpError(f"image list '{source}' not found") from None
    except OSError as e:
        raise ImpError(f"cannot read image list '{source}': {e.strerror or e}") from None
    try:
        for line in f:
            line = line.strip()
            if line:
                yield line
    finally:
        if f is not stdin and f is not sys.stdin:
            f.close()


def sources(images: list[str], images_from: str | None = None, glob: str | None = None,
            shard: tuple[int, int] | None = None, stdin=None) -> Iterator[tuple[str, str | None]]:
    """Every image of the run, in order, as (source, None), or (source, why it cannot be read)
    for a folder that cannot be listed: the positional arguments (a folder: its images), then
    the lines of --images-from (a folder there too). Only --shard's images, when given."""
    def expand(source: str) -> Iterator[tuple[str, str | None]]:
        if not source.lower().startswith(("http://", "https://")) and source != "-" and os.path.isdir(source):
            yield from walk(source, glob)
        else:
            yield source, None

    def everything() -> Iterator[tuple[str, str | None]]:
        for source in images:
            yield from expand(source)
        if images_from is not None:
            for line in list_lines(images_from, stdin):
                yield from expand(line)

    for source, problem in everything():
        if shard is None or shard_of(source, shard[1]) == shard[0]:
            yield source, problem


# -- --resume --------------------------------------------------------------------------------------
def pair_key(sha256: str, question: str) -> int:
    """64 bits naming an (image bytes, question) pair (a false match: ~1 in 10^9 at 10^5 x 10^5)."""
    return int.from_bytes(hashlib.sha256(f"{sha256}\0{question}".encode("utf-8", "surrogateescape")).digest()[:8],
                          "big")


class Done:
    """The pairs an output file already answers with this run's model and settings: 8 bytes a
    pair in a sorted array (100,000 answers: 0.8 MB), looked up by bisection."""

    def __init__(self) -> None:
        self._keys = array("Q")
        self._sorted = None
        self.count = 0

    def add(self, key: int) -> None:
        self._keys.append(key)
        self.count += 1

    def freeze(self) -> "Done":
        import numpy as np

        self._sorted = np.unique(np.frombuffer(self._keys, dtype=np.uint64)) if len(self._keys) else None
        self._keys = array("Q")
        return self

    def __contains__(self, key: int) -> bool:
        import numpy as np

        s = self._sorted
        if s is None:
            return False
        i = int(np.searchsorted(s, np.uint64(key)))
        return i < len(s) and int(s[i]) == key


@dataclass
class Scan:
    done: Done
    lines: int  # whole lines read
    good_bytes: int  # where the last whole line ends
    torn_bytes: int  # bytes after it (a line cut by a crash), 0 if none
    other_settings: int = 0  # answers made with another model or settings: not counted as done
    errors: int = 0  # error records: tried again


def same_run(record: dict, fields: dict) -> bool:
    """Was `record` answered with this run's model files and settings (ask.run_fields)? The seed
    counts only when this run gives one: greedy and scored answers have none, and without --seed
    each sampled answer draws its own, any of which is as good."""
    if record.get("model") != fields["model"] or record.get("settings") != fields["settings"]:
        return False
    got, want = record.get("sampling"), fields["sampling"]
    if not isinstance(got, dict):
        return False
    if want.get("seed") is None:
        got, want = ({k: v for k, v in d.items() if k != "seed"} for d in (got, want))
    return got == want


def scan_output(path: str, fields: dict) -> Scan:
    """Read an output file written by an earlier run: the (image sha256, question) pairs answered
    with this model and these settings. A last line without its newline is a crash's torn write:
    reported in torn_bytes, never parsed. Any other line that is not a record is an error (the
    file is not what --resume thinks it is). Error lines (an image that failed) are not done."""
    done, scan = Done(), None
    lines = good = other = errors = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                scan = Scan(done, lines, good, len(raw))
                break
            lines += 1
            good += len(raw)
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                if "error" in record and "answer" not in record:
                    errors += 1
                    continue
                sha, question = record["image"]["sha256"], record["question"]
                same = same_run(record, fields)
            except (ValueError, KeyError, TypeError) as e:
                raise ImpError(f"line {lines} of '{path}' is not an `imp ask` record ({e}): "
                               "--resume continues only a file that imp wrote") from None
            if same:
                done.add(pair_key(sha, question))
            else:
                other += 1
    scan = scan or Scan(done, lines, good, 0)
    scan.other_settings, scan.errors = other, errors
    scan.done.freeze()
    return scan


# -- where records go ------------------------------------------------------------------------------
class RecordFile:
    """--output FILE: JSON lines appended with one os.write() each on an O_APPEND descriptor (a
    crash leaves whole lines and at most one torn last line), fsync'd every `fsync_every` records
    and at the end; an exclusive lock keeps a second imp from writing the same file."""

    def __init__(self, path: str, fsync_every: int = 0):
        self.path, self.fsync_every = path, fsync_every
        self.written = 0
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise ImpError(f"cannot open output file '{path}': {e.strerror or e}") from None
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not on POSIX: no lock
            pass
        except OSError:
            os.close(self.fd)
            raise ImpError(f"output file '{path}' is being written by another imp process") from None

    def cut(self, size: int) -> None:
        """Drop everything after `size` bytes (a torn last line) before appending."""
        os.ftruncate(self.fd, size)

    def write(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "surrogateescape")
        view = memoryview(data)
        while view:  # one write() in practice; a short write (full disk) is completed or fails
            view = view[os.write(self.fd, view):]
        self.written += 1
        if self.fsync_every and self.written % self.fsync_every == 0:
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None


def open_output(opts: BatchOptions, fields: dict, output: Output) -> tuple[RecordFile | None, Done | None]:
    """The output file, locked, with a torn last line cut off; with --resume, what it already holds."""
    if opts.output is None:
        return None, None
    path = opts.output
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    if exists and not opts.resume:
        raise ImpError(f"output file '{path}' already exists: --resume continues it (or remove it)")
    records = RecordFile(path, opts.fsync)
    if not opts.resume:
        return records, None
    try:
        scan = scan_output(path, fields)
    except OSError as e:
        records.close()
        raise ImpError(f"cannot read output file '{path}': {e.strerror or e}") from None
    except ImpError:
        records.close()
        raise
    if scan.torn_bytes:
        records.cut(scan.good_bytes)
        output.warn(f"'{path}' ended in a line cut short ({scan.torn_bytes} bytes, from a crash): removed")
    if exists:
        said = f"resuming '{path}': {scan.done.count} answers already there"
        if scan.other_settings:
            said += f", {scan.other_settings} with another model or settings (answered again)"
        if scan.errors:
            said += f", {scan.errors} error records (tried again)"
        output.info(said)
    return records, scan.done


class Sink:
    """Where each record goes: the output file, or stdout (--json: the record; plain: the answer
    under a `==> IMAGE <==` header, unless it was already streamed there)."""

    def __init__(self, output: Output, records: RecordFile | None, streamed: bool, n_questions: int,
                 stats: bool):
        self.output, self.records, self.streamed = output, records, streamed
        self.n_questions, self.stats = n_questions, stats
        self.shown = 0

    def header(self, source: str, question: str) -> None:
        title = source if self.n_questions == 1 else f"{source} | {question}"
        self.output.answer(("\n" if self.shown else "") + f"==> {title} <==\n")
        self.shown += 1

    def emit(self, record: dict) -> None:
        failed = bool(record.get("error"))
        if self.records is not None:
            self.records.write(record)
        elif self.output.json_mode:
            self.output.record(record)
        elif not failed and not self.streamed:
            answer = record["answer"]
            if answer is not None:
                self.header(record["image"]["source"], record["question"])
                self.output.answer((answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)) + "\n")
        if self.stats and not failed:
            from .stats import from_record, summary

            self.output.table(f"timings ({record['image']['source']}: {record['question']})",
                              summary(from_record(record)))


# -- the per-image step ----------------------------------------------------------------------------
class Answerer:
    """One Session answering images: the one per-image step of `imp ask`'s batches, its --jobs
    worker processes, Ray Data's actors (imp_cli/ray_data.py) and the benchmark."""

    def __init__(self, pair, req: Request, output: Output, *, cache_write: bool = False,
                 threads: int | None = None):
        self.req, self.output = req, output
        self.session = open_for(pair, req, output, threads=threads, cache_write=cache_write)
        self.sampling = sampling_of(req)
        self.fields = run_fields(pair, self.session.engine.tuning, req)

    def answer(self, source: str, data: bytes | None = None, *, image: LoadedImage | None = None,
               sha256: str | None = None, questions: list[str] | None = None, show: bool = False,
               header=None) -> Iterator[tuple[dict, bool]]:
        """(record, complete) for each question about one image, as each answer ends. The image
        comes as `image` (decoded), `data` (its bytes) or is read from `source`. One that cannot
        be read, decoded or preprocessed gives an error record per question instead. `show`:
        stream the answer to stdout (after `header(source, question)`)."""
        questions = self.req.questions if questions is None else questions
        try:
            if image is None:
                image = decode_source(source, read_source(source) if data is None else data)
            staged = self.session.stage(image)
        except ImageError as e:
            for q in questions:
                yield error_record(source, q, str(e), self.fields, sha256), True
            return
        del image, data
        for q in questions:
            if header is not None:
                header(source, q)
            record, _, ok = answer_question(self.session, staged, q, self.req, self.sampling, self.output, show)
            yield record, ok

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "Answerer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- progress --------------------------------------------------------------------------------------
class Progress:
    """Images done (answered, failed, skipped by --resume) of the total (counted by a thread that
    walks the list a second time; unknown for a list on stdin), answers per minute, ETA, errors.
    mode: bar (Rich, on a terminal), lines (one plain line every `interval` s), off."""

    def __init__(self, output: Output, mode: str, interval: float = PROGRESS_SECONDS):
        self.output, self.mode, self.interval = output, mode, interval
        self.total: int | None = None
        self.answered = self.failed = self.skipped = self.answers = 0
        self.started = time.monotonic()
        self.lines_said = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._bar = self._task = None
        self._thread = None

    def start(self) -> None:
        if self.mode == "bar":
            from rich.progress import BarColumn, Progress as Bar, TextColumn

            self._bar = Bar(TextColumn("imp ask"), BarColumn(), TextColumn("{task.fields[status]}"),
                            console=self.output.err, transient=False,
                            redirect_stdout=sys.stdout.isatty(), redirect_stderr=False)
            self._bar.start()
            self._task = self._bar.add_task("imp ask", total=None, status=self.status())
        if self.mode in ("bar", "lines"):
            self._thread = threading.Thread(target=self._tick, daemon=True, name="imp-progress")
            self._thread.start()

    def _tick(self) -> None:
        every = 0.5 if self.mode == "bar" else self.interval
        while not self._stop.wait(every):
            if self.mode == "bar":
                self._refresh()
            else:
                self.output.info(f"imp ask: {self.status()}")
                self.lines_said += 1

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.answered + self.failed + self.skipped, total=self.total,
                             status=self.status())

    def status(self) -> str:
        seen = self.answered + self.failed + self.skipped
        elapsed = time.monotonic() - self.started
        parts = [f"{seen}/{self.total} images" if self.total is not None else _n(seen, "image")]
        if self.skipped:
            parts.append(f"{self.skipped} done before")
        if self.answers and elapsed > 0:
            parts.append(f"{self.answers / elapsed * 60:.1f} answers/min")
        worked = self.answered + self.failed
        if self.total is not None and worked and self.total > seen:
            eta = (self.total - seen) * elapsed / worked
            parts.append(f"ETA {_clock(eta)}")
        parts.append(_n(self.failed, "error"))
        return ", ".join(parts)

    def image_done(self, answers: int, failed: bool) -> None:
        with self._lock:
            if failed:
                self.failed += 1
            else:
                self.answered += 1
            self.answers += answers

    def image_skipped(self) -> None:
        with self._lock:
            self.skipped += 1

    def close(self, summary: bool) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._bar is not None:
            self._refresh()
            self._bar.stop()
        elif self.mode == "lines" and (summary or self.lines_said):
            elapsed = time.monotonic() - self.started
            self.output.info(f"imp ask: {_n(self.answered, 'image')} answered, {self.failed} failed, {self.skipped} "
                             f"done before, {_n(self.answers, 'answer')} in {_clock(elapsed)}")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def count_images(images: list[str], opts: BatchOptions, progress: Progress) -> None:
    """The total for the progress display: the list walked a second time (a list on stdin cannot)."""
    if opts.images_from == "-" or "-" in images:
        return
    try:
        n = sum(1 for _ in sources(images, opts.images_from, opts.glob, opts.shard))
    except Exception:  # the run itself reports a list it cannot read
        return
    progress.total = n


# -- the reader ------------------------------------------------------------------------------------
@dataclass
class Item:
    source: str
    questions: list[str]
    data: bytes | None = None
    sha256: str | None = None
    error: str | None = None


def read_items(images: list[str], opts: BatchOptions, questions: list[str], done: Done | None,
               progress: Progress) -> Iterator[Item]:
    """Each image of the run with its bytes read and the questions still to answer about it."""
    for source, problem in sources(images, opts.images_from, opts.glob, opts.shard):
        if problem is not None:
            yield Item(source, questions, error=problem)
            continue
        try:
            data = read_source(source)
        except ImageError as e:
            yield Item(source, questions, error=str(e))
            continue
        sha = hashlib.sha256(data).hexdigest()
        todo = questions if done is None else [q for q in questions if pair_key(sha, q) not in done]
        if not todo:
            progress.image_skipped()
            continue
        yield Item(source, todo, data, sha)


class _Reader:
    """read_items in a thread, a few images ahead of the answering (bounded by the queue `put`
    blocks on); an exception there (an unreadable list) is raised where the items are taken."""

    END = object()

    def __init__(self, items: Iterator[Item], put):
        self._items, self._put = items, put
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="imp-reader")

    def _run(self) -> None:
        try:
            for item in self._items:
                if self.stop.is_set():
                    return
                self._put(item)
            self._put(self.END)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self._put(e)


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class Outcome:
    failed_images: int = 0
    incomplete: int = 0  # constrained answers that could not be completed
    stopped: bool = False  # --max-errors
    counts: dict = field(default_factory=dict)


def check_options(req: Request, opts: BatchOptions) -> None:
    """What the options mean together for this request (each option alone was checked as it
    was parsed: app._batch_options, a usage error)."""
    if opts.images_from == "-" and "-" in req.images:
        raise ImpError("standard input (-) cannot hold both an image and the list of images")
    if req.images.count("-") > 1:
        raise ImpError("standard input (-) can be given as an image only once")
    if opts.jobs > 1 and "-" in req.images:
        raise ImpError("an image on standard input (-) cannot be shared with --jobs workers: save it to a file")
    if not req.images and opts.images_from is None:
        raise ImpError("no images: give image paths, folders, URLs or --images-from FILE")
    if opts.images_from not in (None, "-") and not os.path.isfile(opts.images_from):  # before the model loads
        raise ImpError(f"image list '{opts.images_from}' "
                       + ("is not a file" if os.path.exists(opts.images_from) else "not found"))


def worker_threads(req: Request, jobs: int) -> int:
    """Each of `jobs` workers' share of --threads (0: the physical cores)."""
    if jobs <= 1:
        return req.threads
    from .cpuinfo import physical_cores

    return max(1, (req.threads or physical_cores()) // jobs)


def run_ask(req: Request, output: Output, stats: bool = False, batch: BatchOptions | None = None) -> int:
    """`imp ask`: answer each question about each image in turn. One model load serves every
    pair; each image is loaded when its turn comes (memory stays that of one image), and the
    questions after the first about an image evaluate only their own tokens. Several images (or a
    folder, --images-from, --output: `batch`) go through run_batch, where one bad image is one
    error record; one image through ask.run_single. Returns the exit status: 1 if a constrained
    answer could not be completed (or, in a batch, an image failed). (Here, not in ask.py: ask.py
    is below this module, which imports it.)"""
    from .ask import check_questions, run_single

    check_questions(req)
    batch = batch or BatchOptions()
    if is_batch(req, batch):
        return run_batch(req, batch, output, stats=stats)
    return run_single(req, output, stats)


def run_batch(req: Request, opts: BatchOptions, output: Output, stats: bool = False) -> int:
    """Answer every (image, question) of a batch; returns the exit status (1 if any image failed,
    a constrained answer could not be completed, or --max-errors stopped the run)."""
    from .opening import open_pair
    from .tune import choose

    check_options(req, opts)
    pair = open_pair(req.model, req.mmproj, output)
    threads = worker_threads(req, opts.jobs)
    fields = run_fields(pair, choose(pair, threads, req.repack, req.flash_attn), req)
    records, done = open_output(opts, fields, output)
    if opts.jobs > 1 and fields["settings"]["repack"]:  # each worker's own copy of the weights
        output.warn(f"weight repacking is on: each of the {opts.jobs} workers holds its own repacked copy of the "
                    "weights (--repack off shares one memory-mapped copy)")
    mode = opts.progress
    if mode == "auto":
        mode = "bar" if output.interactive else "lines"
    interval = float(os.environ.get("IMP_PROGRESS_SECONDS") or PROGRESS_SECONDS)
    progress = Progress(output, mode, interval)
    streamed = records is None and not output.json_mode and opts.jobs == 1
    sink = Sink(output, records, streamed, len(req.questions), stats)
    outcome = Outcome()
    cache_write = req.cache_write is True  # a batch writes the prompt cache only when asked (--cache write)
    items = read_items(req.images, opts, req.questions, done, progress)
    try:
        threading.Thread(target=count_images, args=(req.images, opts, progress), daemon=True).start()
        progress.start()
        if opts.jobs > 1:
            _run_workers(pair, req, opts, output, items, sink, progress, outcome, threads, cache_write, fields)
        else:
            _run_here(pair, req, opts, output, items, sink, progress, outcome, cache_write)
    finally:
        progress.close(summary=records is not None or bool(progress.failed or progress.skipped))
        if records is not None:
            records.close()
    where = f" (error records in '{opts.output}')" if opts.output else ""
    if outcome.stopped:
        output.error(f"stopped after {outcome.failed_images} images failed (--max-errors {opts.max_errors}){where}")
        return 1
    if outcome.failed_images:
        output.error(f"{_n(outcome.failed_images, 'image')} could not be answered{where}")
        return 1
    return 1 if outcome.incomplete else 0


def _account(item_records: list[tuple[dict, bool]], source: str, output: Output, progress: Progress,
             outcome: Outcome, opts: BatchOptions, said_error: bool = False) -> bool:
    """Count one image's records; True if --max-errors is reached."""
    failed = any(r.get("error") for r, _ in item_records)
    if failed:
        outcome.failed_images += 1
        if not said_error:
            output.error(item_records[0][0]["error"])
    outcome.incomplete += sum(1 for r, ok in item_records if not ok)
    progress.image_done(sum(1 for r, _ in item_records if not r.get("error")), failed)
    if failed and opts.max_errors and outcome.failed_images >= opts.max_errors:
        outcome.stopped = True
    return outcome.stopped


def _run_here(pair, req, opts, output, items, sink, progress, outcome, cache_write) -> None:
    """--jobs 1: one Answerer in this process; the reader thread reads ahead by two images."""
    ahead: queue.Queue = queue.Queue(maxsize=2)
    reader = _Reader(items, ahead.put)
    with Answerer(pair, req, output, cache_write=cache_write) as answerer:
        reader.thread.start()
        try:
            while True:
                item = ahead.get()
                if item is _Reader.END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    got = [(error_record(item.source, q, item.error, answerer.fields), True) for q in item.questions]
                    for record, _ in got:
                        sink.emit(record)
                else:
                    got = []
                    for record, ok in answerer.answer(item.source, item.data, sha256=item.sha256,
                                                      questions=item.questions, show=sink.streamed,
                                                      header=sink.header if sink.streamed else None):
                        sink.emit(record)  # written as each answer ends: a crash loses at most the current one
                        got.append((record, ok))
                if _account(got, item.source, output, progress, outcome, opts):
                    return
        finally:
            reader.stop.set()


# -- --jobs N: worker processes ----------------------------------------------------------------------
def _die_with_parent() -> None:
    """Linux: end this worker when the parent dies (kill -9 included), not wait for work forever."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_main(config: dict, tasks, results) -> None:
    """One --jobs worker: load the Session once, answer images from `tasks` until None, put
    ("records", [(record, ok), ...]) per image on `results`; ("fatal", message) ends the run."""
    import signal

    _die_with_parent()
    if os.getppid() != config["parent"]:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    from .modelfiles import read_pair

    output = Output(json_mode=True, verbose=config["verbose"])
    try:
        pair = read_pair(Path(config["text"]), Path(config["mmproj"]))
        answerer = Answerer(pair, config["req"], output, cache_write=config["cache_write"], threads=config["threads"])
    except BaseException as e:  # noqa: BLE001 - reported by the parent as one line
        results.put(_fatal(e))
        return
    with answerer:
        while True:
            task = tasks.get()
            if task is None:
                break
            source, data, sha, questions = task
            try:
                got = list(answerer.answer(source, data, sha256=sha, questions=questions))
            except BaseException as e:  # noqa: BLE001
                results.put(_fatal(e))
                return
            results.put(("records", (source, got)))
    results.put(("exit", None))


def _fatal(e: BaseException) -> tuple[str, str]:
    """A worker's error as the message that ends the run: an ImpError as it is, anything else
    as an internal error."""
    return "fatal", str(e) if isinstance(e, ImpError) else f"internal error in a worker: {type(e).__name__}: {e}"


def _run_workers(pair, req, opts, output, items, sink, progress, outcome, threads, cache_write, fields) -> None:
    """--jobs N: N spawned worker processes, each an Answerer with `threads` threads; this process
    reads (a thread), writes, and counts. Records are written in the order answers end."""
    import multiprocessing as mp
    from dataclasses import replace

    ctx = mp.get_context("spawn")  # a fresh interpreter: no llama.cpp state or threads forked
    tasks, results = ctx.Queue(maxsize=2 * opts.jobs), ctx.Queue()
    tasks.cancel_join_thread()  # an interrupted run must not wait to flush work nobody will take
    results.cancel_join_thread()
    config = {"text": str(pair.text_path), "mmproj": str(pair.mmproj_path), "req": replace(req, images=[]),
              "verbose": req.verbose, "cache_write": cache_write, "threads": threads, "parent": os.getpid()}
    procs = [ctx.Process(target=_worker_main, args=(config, tasks, results), daemon=True, name=f"imp-worker-{i}")
             for i in range(opts.jobs)]
    for p in procs:
        p.start()

    def feed(item) -> None:
        if item is _Reader.END:
            for _ in procs:
                tasks.put(None)
            results.put(("fed", None))
        elif isinstance(item, BaseException):
            results.put(("fatal-exc", item))
        elif item.error is not None:
            results.put(("failed", (item.source, [(error_record(item.source, q, item.error, fields), True)
                                                  for q in item.questions])))
        else:
            tasks.put((item.source, item.data, item.sha256, item.questions))

    reader = _Reader(items, feed)
    reader.thread.start()
    exited, fed = 0, False
    try:
        while not (fed and exited == len(procs)):
            try:
                kind, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise ImpError(f"a worker process died (exit code {dead[0].exitcode})")
                continue
            if kind == "fatal":
                raise ImpError(value)
            if kind == "fatal-exc":
                raise value
            if kind == "fed":
                fed = True
            elif kind == "exit":
                exited += 1
            else:
                source, got = value
                for record, _ in got:
                    sink.emit(record)
                if _account(got, source, output, progress, outcome, opts):
                    return
    finally:
        reader.stop.set()
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)

