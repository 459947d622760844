"""The inference engine: the only module that touches llama-cpp-python's ctypes (libllama, libmtmd).

Why not the stock Llava chat handlers: they re-encode the image on every call, clear the KV
cache, force GPU use and only take URLs. Here an image is encoded once (its embeddings copied
out of mtmd's buffer, which the next encode overwrites), a prompt is a list of segments (token
lists and image embeddings), and a prompt sharing a prefix with what is already in the KV cache
only evaluates the rest.
"""

from __future__ import annotations

import codecs
import ctypes
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Union

import numpy as np

from convert.native import native_log

from .cpuinfo import machine, physical_cores
from .errors import ImpError
from .modelfiles import ModelPair


class EngineError(ImpError):
    pass


class Interrupted(EngineError):
    """Prompt evaluation stopped because the interrupt check said so (Engine.set_interrupt)."""


# -- data types ------------------------------------------------------------------------------
@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # None (or negative): a fresh random seed for each answer (see with_seed)
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks compare fixed counts)
    grammar: str = ""  # GBNF: only tokens it allows; check_grammar() it first
    grammar_root: str = "root"
    logprobs: int = -1  # >= 0: record each answer token's log-probability and this many alternatives


def with_seed(sampling: Sampling) -> Sampling:
    """The one sampling rule of ask, chat, serve and the Python API: with temperature > 0 an
    answer is random unless a seed is given; the seed actually used is a fresh one per answer
    (recorded with the answer, so that giving it back reproduces the answer). Greedy sampling
    needs none (seed None)."""
    import secrets
    from dataclasses import replace

    if sampling.temperature <= 0:
        return replace(sampling, seed=None) if sampling.seed is not None else sampling
    if sampling.seed is None or sampling.seed < 0:
        return replace(sampling, seed=secrets.randbits(32))
    return sampling


@dataclass
class Timings:
    load_ms: float = 0.0
    vision_load_ms: float = 0.0
    image_encode_ms: float = 0.0
    prompt_tokens: int = 0
    prompt_ms: float = 0.0
    reused_tokens: int = 0
    cache_read_ms: float = 0.0  # the prompt cache: restoring a prefix's KV state from disk
    # copying a prefix's KV state out for the prompt cache, when that happened during this request
    # (it is deferred until the prefix's cells would be dropped: a later image, or the session's end)
    cache_save_ms: float = 0.0
    scored_tokens: int = 0  # decoded to score continuations (score_continuations)
    generated_tokens: int = 0
    generation_ms: float = 0.0
    ttft_ms: float = 0.0  # request start (start_request) to the first answer token, in-process
    finish_reason: str = ""
    _started: float = field(default_factory=time.perf_counter, repr=False)  # perf_counter at start_request
    _first_sample_ms: float = field(default=0.0, repr=False)  # within generation: the first token's sampling

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        d["prompt_tokens_per_s"] = round(self.prompt_tokens / self.prompt_ms * 1000, 2) if self.prompt_ms else None
        # the first token comes from the prompt's logits; the rate is over the tokens after it
        steps = self.generated_tokens - 1
        gen = self.generation_ms - self._first_sample_ms
        d["generation_tokens_per_s"] = round(steps / gen * 1000, 2) if steps > 0 and gen > 0 else None
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in d.items()}


@dataclass
class ImageRef:
    """An image's place in a prompt: its key and token count. Enough to reuse a prefix that is
    already in the KV cache (restored from the prompt cache) without encoding the image."""

    key: str
    n_tokens: int


@dataclass
class ImageEmbedding:
    """A projected image: n_tokens x n_embd float32, plus mtmd's chunk (needed to decode it)."""

    key: str
    data: np.ndarray
    _chunk: int = field(repr=False, default=0)

    @property
    def n_tokens(self) -> int:
        return self.data.shape[0]


Segment = Union[list, ImageRef, ImageEmbedding]  # list[int] of token ids, or an image

# Embeddings kept for re-use: the image being asked about. More would let memory grow with the
# number of images in one run (7.5 MB each for the 3B), and answers go image by image.
KEEP_IMAGES = 1


# -- the engine ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tuning:
    """How llama.cpp runs the model on this machine: neither changes the answer, both change the
    speed, and which is faster depends on the CPU (see `imp tune`). The defaults are
    llama-cpp-python's: weights repacked at load (llama.cpp's `use_extra_bufts`), flash
    attention off."""

    repack: bool = True
    flash_attn: bool = False

    def describe(self) -> str:
        return f"repack {'on' if self.repack else 'off'}, flash attention {'on' if self.flash_attn else 'off'}"


_backend_ready = False


def llama_bindings():
    """The `llama_cpp` module for what imp calls: llama-cpp-python's ctypes bindings (its
    `llama_cpp.llama_cpp` names, as `import llama_cpp` offers them) without running the package's
    `__init__`, which also imports its high-level `Llama` class and with it jinja2, diskcache
    and sqlite3 (a sixth of a warm answer's imports; none is used here). The rest of the package
    is imported on first use of a name that is not a binding (`llama_cpp.Llama`), and
    `import llama_cpp` anywhere later gets this same module; submodules (`llama_cpp.mtmd_cpp`)
    import as usual. If the package is imported already, that is the module."""
    import importlib
    import importlib.util
    import re
    import sys

    module = sys.modules.get("llama_cpp")
    if module is not None:
        return module
    spec = importlib.util.find_spec("llama_cpp")
    module = importlib.util.module_from_spec(spec)  # the package (its __path__), __init__ not run
    sys.modules["llama_cpp"] = module
    try:
        low = importlib.import_module("llama_cpp.llama_cpp")
    except BaseException:
        del sys.modules["llama_cpp"]
        raise
    module.__dict__.update({k: v for k, v in vars(low).items() if not k.startswith("_")})
    found = re.search(r"""^__version__\s*=\s*["']([^"']+)""", Path(spec.origin).read_text(encoding="utf-8"), re.M)
    module.__version__ = found[1] if found else "unknown"

    submodules = {p.stem for p in Path(spec.origin).parent.iterdir() if p.suffix == ".py" or p.is_dir()}

    def rest(name: str):  # PEP 562: the package's other names (`from .llama import *`), when asked for
        if name.startswith("__") or name in submodules:  # `from llama_cpp import mtmd_cpp` asks first
            raise AttributeError(name)
        high = importlib.import_module("llama_cpp.llama")
        module.__dict__.update({k: v for k, v in vars(high).items() if not k.startswith("_") and k not in module.__dict__})
        if native_log._callback is not None:  # its import set llama-cpp-python's own log callback
            native_log.install(native_log.verbose)
        if name in module.__dict__:
            return module.__dict__[name]
        raise AttributeError(f"module 'llama_cpp' has no attribute {name!r}")

    module.__getattr__ = rest
    return module


# Tokens per llama_decode call (batch = ubatch). 256, not llama.cpp's 512: a 775-token prompt of the
# 3B (Q4_K_M, repack off, 2 threads, AVX2 EPYC, 2026-12-05) evaluated in 22.8-23.6 s against
# 23.8-24.6 s at 512 and 26.0 s at 1024 (the activations of a smaller batch stay in cache);
# the compute buffer is smaller too.
N_BATCH = 256


class Engine:
    _interrupt = None  # the ctypes callback while set_interrupt() is in force (kept alive here)

    def __init__(self, pair: ModelPair, n_ctx: int = 4096, threads: int = 0, verbose: bool = False,
                 n_batch: int = N_BATCH, tuning: Tuning = Tuning()):
        lc = llama_bindings()

        global _backend_ready
        t0 = time.perf_counter()  # load time: the text model, not the Python import

        self._llama_cpp = lc
        native_log.install(verbose)
        self.pair = pair
        self.tuning = tuning
        self.timings = Timings()
        self.n_ctx = max(64, min(n_ctx, pair.n_ctx_train))  # past the trained context Phi-2 degrades
        self.threads = threads or physical_cores()
        self.verbose = verbose
        self.n_batch = min(n_batch, self.n_ctx)
        self.model = self._ctx = None
        self._mtmd = None
        self._mtmd_ctx = None  # the vision tower: loaded on the first image that must be encoded
        self._cached: list = []  # one key per KV-cache position: token id or (image key, i)
        self.generated: list[int] = []  # the last answer's token ids (a conversation feeds them back)
        # with Sampling.logprobs >= 0: per answer token (id, logprob, [(id, logprob), ...]) of the
        # model's own distribution (log-softmax of the logits, before temperature/top-k/top-p)
        self.generated_logprobs: list = []
        self._images: list[ImageEmbedding] = []
        self._candidates = None  # the sampler's token array, allocated on the first sample
        self._pending_state = None  # (n, keys, save): a prefix's KV copy put off (keep_prefix_state)
        if not _backend_ready:
            lc.llama_backend_init()
            _backend_ready = True
        # The low-level API, not llama_cpp.Llama: that class does not expose use_extra_bufts.
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = tuning.repack
        native_log.clear()
        self.model = lc.llama_model_load_from_file(str(pair.text_path).encode(), mp)
        if not self.model:
            raise EngineError(f"llama.cpp could not load {pair.text_path.name}: {native_log.last_error() or 'unknown error'}")
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = self.n_ctx, self.n_batch, self.n_batch
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if tuning.flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.context_params = cp
        self._ctx = lc.llama_init_from_model(self.model, cp)
        if not self._ctx:
            error = native_log.last_error() or "unknown error"
            self.close()
            raise EngineError(f"llama.cpp could not create a context for {pair.text_path.name}: {error}")
        self._vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self.timings.load_ms = (time.perf_counter() - t0) * 1000

    @property
    def vision_loaded(self) -> bool:
        return self._mtmd_ctx is not None

    def _load_vision(self) -> None:
        from llama_cpp import mtmd_cpp

        native_log.install_vision()  # mtmd's own log, routed like llama.cpp's (only now: a hit never loads it)
        t0 = time.perf_counter()
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = self.threads
        params.warmup = False  # a whole extra image encode at start-up; one-shot runs don't want it
        native_log.clear()
        ctx = mtmd_cpp.mtmd_init_from_file(str(self.pair.mmproj_path).encode(), self.model, params)
        if not ctx:
            raise EngineError(f"llama.cpp could not load {self.pair.mmproj_path.name}: "
                              f"{native_log.last_error() or 'unknown error'}")
        self._mtmd, self._mtmd_ctx = mtmd_cpp, ctx
        self.timings.vision_load_ms += (time.perf_counter() - t0) * 1000

    def start_request(self) -> None:
        """Fresh per-answer timings (the load time stays: it was paid once); `ttft_ms` counts
        from here."""
        self.timings = Timings(load_ms=self.timings.load_ms)

    # -- text -----------------------------------------------------------------------------------
    def tokenize(self, text: str, first: bool = False) -> list[int]:
        """Tokens of `text` with special tokens parsed, as Imp's HF tokenizer does. `first`: the
        start of the prompt, which gets the BOS if the model's tokenizer adds one (Phi-3's)."""
        if not text and not first:
            return []
        lc, data = self._llama_cpp, text.encode("utf-8")
        size = len(data) + 2  # a token is at least one byte; and the BOS
        ids = (lc.llama_token * size)()
        # add_special: a BOS only where the GGUF's add_bos_token says (Phi-3's), and only at the start
        n = lc.llama_tokenize(self._vocab, data, len(data), ids, size, first, True)
        if n < 0:
            raise EngineError(f"llama.cpp could not tokenize {len(data)} bytes of text")
        return list(ids[:n])

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (a piece of a UTF-8 character, for some)."""
        return self._piece(token)

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self._piece(t) for t in tokens).decode("utf-8", "replace")

    def max_token_bytes(self) -> int:
        """The most bytes one token of the vocabulary stands for, special tokens as written
        (tokenize parses them): a text of n bytes is at least n / this many tokens."""
        lc, buf = self._llama_cpp, ctypes.create_string_buffer(256)
        longest = 1
        for token in range(self.n_vocab):
            n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
            longest = max(longest, -n if n < 0 else n)  # negative: the piece's size, too big for buf
        return longest

    # -- images ---------------------------------------------------------------------------------
    def encode_image(self, pixels: np.ndarray, key: str) -> ImageEmbedding:
        """Encode an already-preprocessed RGB image (H x W x 3 uint8) through the vision tower."""
        for img in self._images:
            if img.key == key:
                return img
        if self._mtmd_ctx is None:
            self._load_vision()
        m = self._mtmd
        t0 = time.perf_counter()
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        h, w, _ = pixels.shape
        bitmap = m.mtmd_bitmap_init(w, h, pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = m.mtmd_input_chunks_init()
        try:
            marker = m.mtmd_default_marker()
            text = m.mtmd_input_text(marker, len(marker), False, True)
            bitmaps = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if m.mtmd_tokenize(self._mtmd_ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise EngineError("mtmd could not prepare the image")
            chunk = next(
                (c for c in (m.mtmd_input_chunks_get(chunks, i) for i in range(m.mtmd_input_chunks_size(chunks)))
                 if m.mtmd_input_chunk_get_type(c) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE),
                None,
            )
            if chunk is None:
                raise EngineError("mtmd produced no image chunk")
            n_tokens = m.mtmd_input_chunk_get_n_tokens(chunk)
            if m.mtmd_encode_chunk(self._mtmd_ctx, chunk) != 0:
                raise EngineError(f"image encoding failed: {native_log.last_error() or 'unknown error'}")
            out = m.mtmd_get_output_embd(self._mtmd_ctx)
            # Copy out: mtmd reuses this buffer on the next encode.
            data = np.ctypeslib.as_array(out, shape=(n_tokens * self.pair.n_embd,)).copy().reshape(n_tokens, -1)
            owned = m.mtmd_input_chunk_copy(chunk)
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bitmap)
        img = ImageEmbedding(key, data, owned)
        while len(self._images) >= KEEP_IMAGES:
            self._free_image(self._images.pop(0))
        self._images.append(img)
        self.timings.image_encode_ms += (time.perf_counter() - t0) * 1000
        return img

    # -- prompt evaluation with prefix reuse ----------------------------------------------------
    def evaluate(self, segments: list[Segment], logits: bool = True) -> None:
        """Bring the KV cache to exactly `segments`, evaluating only what is not cached yet.

        With `logits` (the default) the prompt must end with text and its last token is always
        re-run, so last_logits() is the next-token distribution. Without, the segments are a
        prefix to keep (e.g. [system, image] before it is saved) and may end with an image."""
        if not segments or (logits and (isinstance(segments[-1], (ImageRef, ImageEmbedding)) or not segments[-1])):
            raise EngineError("a prompt must end with text")
        keys = prompt_keys(segments)
        if len(keys) >= self.n_ctx:
            raise ImpError(f"prompt is {len(keys)} tokens, more than the context of {self.n_ctx} (raise --ctx or shorten it)")
        keep = common_prefix(self._cached, keys)
        if logits:
            keep = min(keep, len(keys) - 1)  # the last token is always re-run: we need its logits
        while 0 < keep < len(keys) and isinstance(keys[keep], tuple) and keys[keep][1] > 0:
            keep -= 1  # never resume inside an image
        self._truncate(keep)

        t0 = time.perf_counter()
        pos = 0
        for s in segments:
            n = s.n_tokens if isinstance(s, (ImageRef, ImageEmbedding)) else len(s)
            if pos + n > keep:
                skip = max(0, keep - pos)
                if isinstance(s, ImageEmbedding):
                    self._decode_image(s, pos)
                elif isinstance(s, ImageRef):
                    raise EngineError(f"image {s.key[:12]} is not in the KV cache and was not encoded")
                else:
                    self._decode_tokens(s[skip:])
            pos += n
        self._cached = keys
        self.timings.reused_tokens = keep
        self.timings.prompt_tokens = len(keys) - keep
        self.timings.prompt_ms += (time.perf_counter() - t0) * 1000

    def cached_prefix(self, segments: list[Segment]) -> int:
        """How many leading positions of `segments` the KV cache already holds."""
        return common_prefix(self._cached, prompt_keys(segments))

    def _truncate(self, keep: int) -> None:
        if self._pending_state is not None and keep < self._pending_state[0]:
            self.flush_prefix_state()  # its cells are about to go: copy them out first
        self._drop_after(keep)

    def _drop_after(self, keep: int) -> None:
        mem = self._llama_cpp.llama_get_memory(self._ctx)
        self._llama_cpp.llama_memory_seq_rm(mem, 0, keep, -1)
        self._cached = self._cached[:keep]

    # -- KV state of a prefix (the prompt cache's payload) --------------------------------------
    def kv_layout(self) -> dict:
        """What a saved KV state depends on besides the model files: restoring a state into a
        context that differs in any of these is refused (llama.cpp may not notice)."""
        p = self.context_params  # flash attention stores the V cache untransposed: part of the layout
        # arch: an entry written on ARM (another build of llama.cpp, other kernels) is never
        # restored on x86 or the other way round, e.g. in an IMP_HOME on a shared disk
        return {"llama_cpp": self._llama_cpp.__version__, "type_k": int(p.type_k), "type_v": int(p.type_v),
                "flash_attn": int(p.flash_attn_type), "n_embd": self.pair.n_embd, "arch": machine()}

    def keep_prefix_state(self, n: int, save: Callable[[np.ndarray | None, str], None]) -> None:
        """Copy the KV state of the first `n` positions (all the cache holds now) out later, off
        the answer's path: `save(state, "")` is called just before anything would drop those
        cells (a prompt with another prefix, a restore) or at flush_prefix_state(), with the
        positions after `n` dropped first. What is evaluated after a prefix never changes its
        cells, so that copy is the very bytes a copy made now would be (tests/test_fast.py
        checks it) and the answer streams 0.5 s sooner (the copy of a 384-px prefix).
        `save(None, why)` if llama.cpp could not copy it."""
        self.flush_prefix_state()  # an earlier prefix still waiting goes first
        self._pending_state = (n, list(self._cached[:n]), save)

    def flush_prefix_state(self) -> None:
        """Make the copy keep_prefix_state() put off, now (the session's end calls this)."""
        pending, self._pending_state = self._pending_state, None
        if pending is None or not self._ctx:
            return
        n, keys, save = pending
        if self._cached[:n] != keys:  # cannot happen: _truncate flushes before dropping them
            save(None, "the prefix left the KV cache before it was copied")
            return
        t0 = time.perf_counter()
        self._drop_after(n)  # the answer's positions go; the prefix's cells stay as they were
        try:
            state = self.save_state()
        except EngineError as e:
            save(None, str(e))
            return
        self.timings.cache_save_ms += (time.perf_counter() - t0) * 1000
        save(state, "")

    def save_state(self) -> np.ndarray:
        """The KV cells of sequence 0 (what the cache holds now) as a byte array."""
        lc = self._llama_cpp
        size = lc.llama_state_seq_get_size(self._ctx, 0)
        buf = np.empty(size, dtype=np.uint8)
        written = lc.llama_state_seq_get_data(self._ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, 0)
        if written != size:
            raise EngineError(f"llama.cpp saved {written} of {size} bytes of KV state")
        return buf

    def restore_state(self, payload, keys: list) -> bool:
        """Replace sequence 0 by a saved state covering `keys`; False (cache emptied) if llama.cpp
        refuses it."""
        lc = self._llama_cpp
        self._truncate(0)
        data = np.frombuffer(payload, dtype=np.uint8)
        read = lc.llama_state_seq_set_data(self._ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), data.size, 0)
        if read != data.size:
            self._truncate(0)
            return False
        self._cached = list(keys)
        return True

    def set_interrupt(self, check=None) -> None:
        """While `check` is set, llama.cpp asks it between the steps of every evaluation (ggml's
        abort callback: a fraction of a second apart even in a 512-token batch); once it answers
        True the evaluation stops with Interrupted, and the KV cache holds only what it held
        before (the next evaluate() drops any part-written positions). `imp serve` sets it for a
        prompt's evaluation, so that a client that leaves frees the engine at once (issue 21).
        None removes it (generation then pays no callback per step)."""
        lc = self._llama_cpp
        if check is None:
            self._interrupt = None
            lc.llama_set_abort_callback(self._ctx, lc.ggml_abort_callback(), None)  # NULL: none
            return
        self._interrupt = lc.ggml_abort_callback(lambda _data: bool(check()))
        lc.llama_set_abort_callback(self._ctx, self._interrupt, None)

    def _decode_tokens(self, tokens: list[int]) -> None:
        lc = self._llama_cpp
        for start in range(0, len(tokens), self.n_batch):
            part = tokens[start:start + self.n_batch]
            arr = (lc.llama_token * len(part))(*part)
            rc = lc.llama_decode(self._ctx, lc.llama_batch_get_one(arr, len(part)))
            if rc == 2 and self._interrupt is not None:
                raise Interrupted("prompt evaluation interrupted")
            if rc != 0:
                raise EngineError(f"llama_decode failed (code {rc}): {native_log.last_error()}")

    def _decode_image(self, img: ImageEmbedding, n_past: int) -> None:
        m, lc = self._mtmd, self._llama_cpp
        new_n_past = lc.llama_pos(0)
        rc = m.mtmd_helper_decode_image_chunk(
            self._mtmd_ctx, self._ctx, img._chunk,
            img.data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            n_past, 0, self.n_batch, ctypes.byref(new_n_past),
            m.mtmd_helper_post_decode_callback(), None,  # a typed NULL: None is rejected
        )
        if rc != 0 and self._interrupt is not None:
            raise Interrupted("image evaluation interrupted")
        if rc != 0:
            raise EngineError(f"decoding the image embeddings failed (code {rc}): {native_log.last_error()}")

    def score_continuations(self, continuations: list[list[int]]) -> list[float]:
        """log P(continuation | what the KV cache holds) for each token list, teacher-forced: the
        sum of each token's log-probability given the ones before it. Call after evaluate(); the
        cached prompt is evaluated once for all, each continuation only decodes its own tokens
        but the last, and is dropped again (the cache ends as it began, last_logits() does not)."""
        base = len(self._cached)
        first = _log_softmax(self.last_logits())
        totals = []
        for tokens in continuations:
            if not tokens:
                raise EngineError("an empty continuation cannot be scored")
            if base + len(tokens) >= self.n_ctx:
                raise ImpError(f"prompt and continuation are {base + len(tokens)} tokens, more than the "
                               f"context of {self.n_ctx} (raise --ctx or shorten it)")
            total = float(first[tokens[0]])
            if len(tokens) > 1:
                rows = self._decode_all_logits(tokens[:-1])
                self.timings.scored_tokens += len(tokens) - 1
                total += sum(float(_log_softmax(row)[tok]) for row, tok in zip(rows, tokens[1:]))
                self._truncate(base)
            totals.append(total)
        return totals

    def _decode_all_logits(self, tokens: list[int]) -> np.ndarray:
        """Decode `tokens` after the cached ones with the logits of every position (a plain
        decode returns only the last); returns them, n x n_vocab."""
        lc = self._llama_cpp
        rows = []
        for start in range(0, len(tokens), self.n_batch):
            part = tokens[start:start + self.n_batch]
            batch = lc.llama_batch_init(len(part), 0, 1)
            try:
                for i, tok in enumerate(part):
                    batch.token[i] = tok
                    batch.pos[i] = len(self._cached) + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = 1
                batch.n_tokens = len(part)
                rc = lc.llama_decode(self._ctx, batch)
                if rc != 0:
                    raise EngineError(f"llama_decode failed (code {rc}): {native_log.last_error()}")
            finally:
                lc.llama_batch_free(batch)
            self._cached += part
            for i in range(len(part)):
                ptr = lc.llama_get_logits_ith(self._ctx, i)
                rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return np.stack(rows)

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def last_logits(self) -> np.ndarray:
        ptr = self._llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    # -- generation -----------------------------------------------------------------------------
    def generate(self, sampling: Sampling, max_tokens: int) -> Iterator[str]:
        """Stream text pieces after evaluate(); stops on end-of-generation, max_tokens or a full
        context. Timings and the finish reason are in self.timings when the iterator ends."""
        lc = self._llama_cpp
        chain = self._sampler(sampling)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        t = self.timings
        t.generated_tokens, t.finish_reason = 0, "length"
        self.generated = []
        self.generated_logprobs = []
        t0 = time.perf_counter()
        try:
            while t.generated_tokens < max_tokens:
                dist = _log_softmax(self.last_logits()) if sampling.logprobs >= 0 else None
                token = self._sample(chain)
                if token is None:  # a grammar that allows nothing here (cannot complete)
                    t.finish_reason = "grammar"
                    break
                t.generated_tokens += 1
                if t.generated_tokens == 1:
                    now = time.perf_counter()
                    t._first_sample_ms = (now - t0) * 1000
                    t.ttft_ms = (now - t._started) * 1000
                if lc.llama_vocab_is_eog(self._vocab, token) and not sampling.ignore_eos:
                    t.finish_reason = "stop"
                    break
                self.generated.append(token)
                if dist is not None:
                    top = np.argsort(-dist, kind="stable")[:sampling.logprobs] if sampling.logprobs else []
                    self.generated_logprobs.append((token, float(dist[token]), [(int(i), float(dist[i])) for i in top]))
                text = decoder.decode(self._piece(token))
                if text:
                    yield text
                if len(self._cached) + 1 >= self.n_ctx:
                    t.finish_reason = "context"
                    break
                if t.generated_tokens < max_tokens:
                    self._decode_tokens([token])
                    self._cached.append(token)
            tail = decoder.decode(b"", final=True)
            if tail:
                yield tail
        finally:
            t.generation_ms = (time.perf_counter() - t0) * 1000
            lc.llama_sampler_free(chain)

    def _sampler(self, s: Sampling):
        lc = self._llama_cpp
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if s.grammar:  # first: top-k after it could otherwise leave only forbidden tokens
            grammar = lc.llama_sampler_init_grammar(self._vocab, s.grammar.encode("utf-8"),
                                                   s.grammar_root.encode("utf-8"))
            if not grammar:
                lc.llama_sampler_free(chain)
                raise EngineError(f"llama.cpp refused the grammar: {native_log.last_error() or 'parse error'}")
            lc.llama_sampler_chain_add(chain, grammar)
        if s.temperature <= 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            return chain
        if s.top_k > 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(s.top_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(s.temperature))
        seed = lc.LLAMA_DEFAULT_SEED if s.seed is None or s.seed < 0 else s.seed & 0xFFFFFFFF  # default: random
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
        return chain

    def _sample(self, chain) -> int | None:
        """llama_sampler_sample, but a token the samplers all forbid (logit -inf: a grammar with
        no way forward) is None instead of being accepted, which aborts inside llama.cpp."""
        lc = self._llama_cpp
        if self._candidates is None:
            self._candidates = (lc.llama_token_data * self.n_vocab)()
            self._candidate_view = np.ctypeslib.as_array(self._candidates)  # fields id, logit, p
            self._token_ids = np.arange(self.n_vocab, dtype=np.int32)
        view = self._candidate_view
        view["id"] = self._token_ids  # the samplers reorder the array: ids are reset every step
        view["logit"] = np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, -1), shape=(self.n_vocab,))
        view["p"] = 0.0
        cur = lc.llama_token_data_array(self._candidates, self.n_vocab, -1, False)
        lc.llama_sampler_apply(chain, ctypes.byref(cur))
        if not 0 <= cur.selected < cur.size or not np.isfinite(cur.data[cur.selected].logit):
            return None
        token = int(cur.data[cur.selected].id)
        lc.llama_sampler_accept(chain, token)
        return token

    def _free_image(self, img: ImageEmbedding) -> None:
        if img._chunk:
            self._mtmd.mtmd_input_chunk_free(img._chunk)
            img._chunk = 0

    def close(self) -> None:
        self._pending_state = None  # a copy not flushed is not made
        for img in self._images:
            self._free_image(img)
        self._images = []
        if self._mtmd_ctx:
            self._mtmd.mtmd_free(self._mtmd_ctx)
            self._mtmd_ctx = None
        if self._ctx:
            self._llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self.model:
            self._llama_cpp.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max()
    return x - np.log(np.exp(x).sum())


def check_grammar(grammar: str) -> str:
    """'' if llama.cpp parses this GBNF grammar (root rule `root`), else its one-line complaint.
    No model needed: the parser runs with no vocabulary (a grammar naming tokens as <...> then
    fails: the text of a token needs the model's). Its fprintf to stderr is captured, not shown."""
    import os
    import tempfile

    import llama_cpp

    native_log.install(native_log.verbose)
    native_log.clear()
    with tempfile.TemporaryFile() as capture:
        import sys

        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            sampler = llama_cpp.llama_sampler_init_grammar(None, grammar.encode("utf-8"), b"root")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        printed = capture.read().decode("utf-8", "replace")
    if sampler:
        llama_cpp.llama_sampler_free(sampler)
        return ""
    # The parser prints "...: error parsing grammar: WHAT\n\n<the grammar>"; llama.cpp logs the rest.
    for line in printed.splitlines():
        if "error parsing grammar:" in line:
            return line.split("error parsing grammar:", 1)[1].strip()
    return native_log.last_error() or "llama.cpp could not parse the grammar"


def prompt_keys(segments: list[Segment]) -> list:
    """One key per KV position: a token id, or (image key, index) for an image's positions."""
    keys: list = []
    for s in segments:
        keys += [(s.key, i) for i in range(s.n_tokens)] if isinstance(s, (ImageRef, ImageEmbedding)) else list(s)
    return keys


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


