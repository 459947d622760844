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
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

import numpy as np

from .errors import ImpError
from .modelfiles import ModelPair


class EngineError(ImpError):
    pass


# -- native logging --------------------------------------------------------------------------
class _NativeLog:
    """Routes llama.cpp/ggml/mtmd logs: printed with -v, else swallowed but the last lines kept,
    so a native failure can be reported in one line. The callback must outlive every call."""

    def __init__(self) -> None:
        self.verbose = False
        self.recent: deque[str] = deque(maxlen=8)
        self._callback = None

    def install(self, verbose: bool) -> None:
        import llama_cpp

        self.verbose = verbose
        if self._callback is None:
            @llama_cpp.llama_log_callback
            def callback(level, text, user_data):
                line = text.decode("utf-8", "replace") if text else ""
                if self.verbose:
                    sys.stderr.write(line)
                    sys.stderr.flush()
                elif line.strip() and level in (2, 3):  # GGML_LOG_LEVEL_WARN, _ERROR
                    self.recent.append(line.strip())

            self._callback = callback
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        try:
            from llama_cpp import mtmd_cpp

            mtmd_cpp.mtmd_log_set(self._callback, ctypes.c_void_p(0))
            mtmd_cpp.mtmd_helper_log_set(self._callback, ctypes.c_void_p(0))
        except (ImportError, OSError, AttributeError):
            pass

    def last_error(self) -> str:
        return self.recent[-1] if self.recent else ""


native_log = _NativeLog()


def quantize_model(src: Path, dst: Path, ftype: int, threads: int, verbose: bool = False) -> int:
    """llama_model_quantize on a GGUF file; returns llama.cpp's status code (0 = ok)."""
    import llama_cpp

    native_log.install(verbose)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    return int(llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)))


# -- data types ------------------------------------------------------------------------------
@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks compare fixed counts)


@dataclass
class Timings:
    load_ms: float = 0.0
    image_encode_ms: float = 0.0
    prompt_tokens: int = 0
    prompt_ms: float = 0.0
    reused_tokens: int = 0
    generated_tokens: int = 0
    generation_ms: float = 0.0
    first_token_ms: float = 0.0
    finish_reason: str = ""

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["prompt_tokens_per_s"] = round(self.prompt_tokens / self.prompt_ms * 1000, 2) if self.prompt_ms else None
        # the first token's time is prompt eval; rate over the tokens after it
        steps = self.generated_tokens - 1
        gen = self.generation_ms - self.first_token_ms
        d["generation_tokens_per_s"] = round(steps / gen * 1000, 2) if steps > 0 and gen > 0 else None
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in d.items()}


@dataclass
class ImageEmbedding:
    """A projected image: n_tokens x n_embd float32, plus mtmd's chunk (needed to decode it)."""

    key: str
    data: np.ndarray
    _chunk: int = field(repr=False, default=0)

    @property
    def n_tokens(self) -> int:
        return self.data.shape[0]


Segment = Union[list, ImageEmbedding]  # list[int] of token ids, or an image


# -- the engine ------------------------------------------------------------------------------
class Engine:
    def __init__(self, pair: ModelPair, n_ctx: int = 4096, threads: int = 0, verbose: bool = False,
                 n_batch: int = 512):
        import llama_cpp
        from llama_cpp import mtmd_cpp

        t0 = time.perf_counter()  # load time: the two files, not the Python import

        self._llama_cpp, self._mtmd = llama_cpp, mtmd_cpp
        native_log.install(verbose)
        self.pair = pair
        self.timings = Timings()
        self.n_ctx = max(64, min(n_ctx, pair.n_ctx_train))  # past the trained context Phi-2 degrades
        threads = threads or _physical_cores()
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(pair.text_path), n_ctx=self.n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, verbose=verbose,
            )
        except (ValueError, RuntimeError, OSError) as e:
            raise EngineError(f"llama.cpp could not load {pair.text_path.name}: {native_log.last_error() or e}") from None
        # Llama() re-registers its own logger on import paths; make ours win again.
        native_log.install(verbose)
        self._ctx = self.llm._ctx.ctx
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_batch = n_batch

        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = threads
        params.warmup = False  # a whole extra image encode at start-up; one-shot runs don't want it
        self._mtmd_ctx = mtmd_cpp.mtmd_init_from_file(str(pair.mmproj_path).encode(), self.llm.model, params)
        if not self._mtmd_ctx:
            self.llm.close()
            raise EngineError(f"llama.cpp could not load {pair.mmproj_path.name}: {native_log.last_error() or 'unknown error'}")
        self._cached: list = []  # one key per KV-cache position: token id or (image key, i)
        self._images: list[ImageEmbedding] = []
        self.timings.load_ms = (time.perf_counter() - t0) * 1000

    def start_request(self) -> None:
        """Fresh per-answer timings (the load time stays: it was paid once)."""
        self.timings = Timings(load_ms=self.timings.load_ms)

    # -- text -----------------------------------------------------------------------------------
    def tokenize(self, text: str, first: bool = False) -> list[int]:
        """Tokens of `text` with special tokens parsed, as Imp's HF tokenizer does. `first`: the
        start of the prompt, which gets the BOS if the model's tokenizer adds one (Phi-3's)."""
        if not text and not first:
            return []
        # add_bos here is llama.cpp's add_special: a BOS only where the GGUF's add_bos_token says
        return self.llm.tokenize(text.encode("utf-8"), add_bos=first, special=True)

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self._piece(t) for t in tokens).decode("utf-8", "replace")

    # -- images ---------------------------------------------------------------------------------
    def encode_image(self, pixels: np.ndarray, key: str) -> ImageEmbedding:
        """Encode an already-preprocessed RGB image (H x W x 3 uint8) through the vision tower."""
        for img in self._images:
            if img.key == key:
                return img
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
        self._images.append(img)
        self.timings.image_encode_ms += (time.perf_counter() - t0) * 1000
        return img

    # -- prompt evaluation with prefix reuse ----------------------------------------------------
    def evaluate(self, segments: list[Segment]) -> None:
        """Bring the KV cache to exactly `segments`, evaluating only what is not cached yet."""
        if not segments or isinstance(segments[-1], ImageEmbedding) or not segments[-1]:
            raise EngineError("a prompt must end with text")
        keys: list = []
        for s in segments:
            keys += [(s.key, i) for i in range(s.n_tokens)] if isinstance(s, ImageEmbedding) else list(s)
        if len(keys) >= self.n_ctx:
            raise ImpError(f"prompt is {len(keys)} tokens, more than the context of {self.n_ctx} (raise --ctx or shorten it)")
        keep = 0
        for a, b in zip(self._cached, keys):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(keys) - 1)  # the last token is always re-run: we need its logits
        while keep > 0 and isinstance(keys[keep], tuple) and keys[keep][1] > 0:
            keep -= 1  # never resume inside an image
        mem = self._llama_cpp.llama_get_memory(self._ctx)
        self._llama_cpp.llama_memory_seq_rm(mem, 0, keep, -1)
        self._cached = keys[:keep]

        t0 = time.perf_counter()
        pos = 0
        for s in segments:
            n = s.n_tokens if isinstance(s, ImageEmbedding) else len(s)
            if pos + n > keep:
                skip = max(0, keep - pos)
                if isinstance(s, ImageEmbedding):
                    self._decode_image(s, pos)
                else:
                    self._decode_tokens(s[skip:])
            pos += n
        self._cached = keys
        self.timings.reused_tokens = keep
        self.timings.prompt_tokens = len(keys) - keep
        self.timings.prompt_ms = (time.perf_counter() - t0) * 1000

    def _decode_tokens(self, tokens: list[int]) -> None:
        lc = self._llama_cpp
        for start in range(0, len(tokens), self.n_batch):
            part = tokens[start:start + self.n_batch]
            arr = (lc.llama_token * len(part))(*part)
            rc = lc.llama_decode(self._ctx, lc.llama_batch_get_one(arr, len(part)))
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
        if rc != 0:
            raise EngineError(f"decoding the image embeddings failed (code {rc}): {native_log.last_error()}")

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
        t0 = time.perf_counter()
        try:
            while t.generated_tokens < max_tokens:
                token = lc.llama_sampler_sample(chain, self._ctx, -1)
                t.generated_tokens += 1
                if t.generated_tokens == 1:
                    t.first_token_ms = (time.perf_counter() - t0) * 1000
                if lc.llama_vocab_is_eog(self._vocab, token) and not sampling.ignore_eos:
                    t.finish_reason = "stop"
                    break
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
        if s.temperature <= 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            return chain
        if s.top_k > 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(s.top_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(s.temperature))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(s.seed & 0xFFFFFFFF))
        return chain

    def close(self) -> None:
        for img in self._images:
            if img._chunk:
                self._mtmd.mtmd_input_chunk_free(img._chunk)
                img._chunk = 0
        self._images = []
        if self._mtmd_ctx:
            self._mtmd.mtmd_free(self._mtmd_ctx)
            self._mtmd_ctx = None
        self.llm.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _physical_cores() -> int:
    """Physical cores (llama.cpp is slower with SMT siblings); falls back to logical CPUs."""
    try:
        cores = set()
        block: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            if not line.strip():
                if "physical id" in block and "core id" in block:
                    cores.add((block["physical id"], block["core id"]))
                block = {}
            elif ":" in line:
                k, v = line.split(":", 1)
                block[k.strip()] = v.strip()
        if cores:
            return len(cores)
    except OSError:
        pass
    import os

    return os.cpu_count() or 1
