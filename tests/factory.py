"""Synthetic Imp checkpoints with random weights, in the real Hugging Face layouts.

Three language backbones (`family`): "phi2" (Imp-v1 / v1.5-3B), "phi3" (Imp-v1.5-4B: Phi-3-mini,
SentencePiece tokenizer) and "qwen2" (Imp-v1.5-2B: Qwen1.5, byte-level BPE, and a config without
vision_tower_config, as published), each with the same SigLIP tower and projector.

`make_checkpoint` writes a folder that looks like a real Imp checkpoint: config.json, a byte-level
BPE tokenizer with Phi-2's special-token arrangement, and sharded safetensors with an index, in
either key layout found on the Hub ("new" = HF Phi names, "old" = phi-msft names with a fused
Wqkv). TINY builds in a fraction of a second; FULL has the real 3B shapes and is written tensor by
tensor, so it never needs more memory than its largest tensor.

Every tensor is drawn from its own RNG, seeded by (seed, canonical tensor name), where the
canonical name is the new-layout one. Hence the order of writing does not matter, the same
arguments give byte-identical files, and the old layout holds exactly the same weights as the new
one (its Wqkv is the row concatenation q|k|v of the new q_proj, k_proj, v_proj).

Only numpy, tokenizers and (for phi3) sentencepiece are needed here (no torch): the safetensors
files are written directly.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors, trainers)


@dataclass(frozen=True)
class Sizes:
    """Model dimensions. vision_layers counts the KEPT SigLIP layers (those stored in the file)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    partial_rotary_factor: float
    vocab_rows: int  # embedding / lm_head rows; always more than the tokenizer has tokens
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_heads: int
    vision_layers: int
    image_size: int
    patch_size: int
    max_position_embeddings: int = 3072

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def n_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# The intermediate widths are deliberately not 4 x hidden (text) nor a multiple of 32 (vision):
# both are traps for a converter (see DESIGN.md section 4).
TINY = Sizes(
    hidden_size=64, num_layers=2, num_heads=4, intermediate_size=160, partial_rotary_factor=0.5,
    vocab_rows=1088,
    vision_hidden_size=64, vision_intermediate_size=136, vision_heads=4, vision_layers=2,
    image_size=56, patch_size=14,
)
FULL = Sizes(  # Phi-2 + SigLIP-so400m/14@384 minus its last layer: Imp-v1(.5)-3B
    hidden_size=2560, num_layers=32, num_heads=32, intermediate_size=10240,
    partial_rotary_factor=0.4, vocab_rows=51200,
    vision_hidden_size=1152, vision_intermediate_size=4304, vision_heads=16, vision_layers=26,
    image_size=384, patch_size=14,
)
FULL_196 = Sizes(**{**FULL.__dict__, "image_size": 196})  # Imp-v1.5-3B-196: 14 x 14 tokens
# Phi-3 and Qwen2 rotate whole heads. The Qwen2 config has no vision_tower_config, so its tower
# is told by its shapes: SigLIP-so400m's widths (1152 / 4304, 16 heads), two layers, 56 px.
TINY_PHI3 = Sizes(**{**TINY.__dict__, "partial_rotary_factor": 1.0, "vocab_rows": 704,
                     "max_position_embeddings": 4096})
TINY_QWEN2 = Sizes(**{**TINY.__dict__, "partial_rotary_factor": 1.0, "vocab_rows": 768,
                      "vision_hidden_size": 1152, "vision_intermediate_size": 4304, "vision_heads": 16,
                      "max_position_embeddings": 32768})
FULL_PHI3 = Sizes(  # Imp-v1.5-4B-Phi3: Phi-3-mini
    hidden_size=3072, num_layers=32, num_heads=32, intermediate_size=8192, partial_rotary_factor=1.0,
    vocab_rows=32064, vision_hidden_size=1152, vision_intermediate_size=4304, vision_heads=16,
    vision_layers=26, image_size=384, patch_size=14, max_position_embeddings=4096)
FULL_QWEN2 = Sizes(  # Imp-v1.5-2B-Qwen1.5: Qwen1.5-1.8B
    hidden_size=2048, num_layers=24, num_heads=16, intermediate_size=5504, partial_rotary_factor=1.0,
    vocab_rows=151936, vision_hidden_size=1152, vision_intermediate_size=4304, vision_heads=16,
    vision_layers=26, image_size=384, patch_size=14, max_position_embeddings=32768)
TINY_FOR = {"phi2": TINY, "phi3": TINY_PHI3, "qwen2": TINY_QWEN2}
FAMILIES = tuple(TINY_FOR)

# ---------------------------------------------------------------------------------------------
# Tokenizer. Layout (mirrors Phi-2's, scaled down):
#   0 .. 959     byte-level BPE (256 byte symbols + 704 merges)
#   960          <|endoftext|>   special; last entry of vocab.json, as in GPT-2/Phi-2 (50256)
#   961 .. 970   runs of 8..2 spaces then 4..2 tabs: NON-special added tokens (Phi-2: 50257-50294)
#   971          </s>            special: eos / end of turn (Phi-2 Imp: 50295)
#   972          <image>         special: image placeholder, never fed to the model (Imp: 50296)
# ---------------------------------------------------------------------------------------------
BPE_SIZE = 960
ENDOFTEXT, EOS, IMAGE = "<|endoftext|>", "</s>", "<image>"
WHITESPACE_TOKENS = tuple(" " * n for n in range(8, 1, -1)) + tuple("\t" * n for n in range(4, 1, -1))
ENDOFTEXT_ID = BPE_SIZE
WHITESPACE_IDS = range(ENDOFTEXT_ID + 1, ENDOFTEXT_ID + 1 + len(WHITESPACE_TOKENS))
EOS_ID = WHITESPACE_IDS.stop
IMAGE_ID = EOS_ID + 1
N_TOKENS = IMAGE_ID + 1  # tokenizer size (973); Sizes.vocab_rows must exceed it

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)

# A trained model never predicts the padding rows, <image>, nor lone bytes that are not text.
# Their lm_head rows get this bias, so greedy decoding of random weights yields plain words (see
# predictable_ids). Scale logit comparisons by logits[predictable_ids()].std(): these rows sit far
# below the others and inflate the std of the whole vector.
UNUSED_ROW_BIAS = -10.0
SELF_REPEAT_PENALTY = 1.0  # see _draw_lm_head_weight

BIN_CANARY = "UNPICKLED"  # see make_bin_only_checkpoint


def _corpus() -> Iterator[str]:
    """A few hundred Imp-style exchanges (no special tokens: those are added after training)."""
    rng = random.Random(1234)
    nouns = ("cat dog car tree house person man woman child table chair bird sky cloud road street "
             "building window door picture image photo flower garden river mountain beach boat "
             "train bus bicycle horse cow sheep kitchen room bed computer phone book cup plate "
             "pizza cake apple banana orange ball shirt hat sign light water grass field city "
             "elephant giraffe zebra umbrella kite skateboard surfboard laptop keyboard television "
             "refrigerator sandwich broccoli carrot vase clock scissors bottle glass bowl fork knife "
             "spoon couch bench airplane motorcycle truck fence bridge tower castle church forest "
             "desert island ocean wave sunset shadow mirror painting statue fountain market "
             "restaurant station airport stadium player team uniform jacket glasses helmet bag").split()
    adjectives = ("red blue green yellow white black brown small large big little old young happy "
                  "bright dark tall short wooden round empty busy quiet beautiful colorful purple "
                  "pink gray golden silver shiny crowded narrow wide famous modern ancient snowy "
                  "rainy sunny cloudy wet dry soft heavy striped plastic metal delicious").split()
    places = ("on the table", "in the room", "next to the window", "near the river", "under the tree",
              "in front of the house", "on the street", "in the sky", "behind the car",
              "at the beach", "in the garden", "on the left side", "on the right side")
    actions = ("is sitting", "is standing", "is walking", "is running", "is playing", "is eating",
               "is looking at the camera", "is holding a cup", "is riding a bicycle", "is sleeping")
    numbers = ("one two three four five six seven eight nine ten 2 3 4 5 12 20 100").split()
    questions = (
        "What is in the image?", "Describe the image in detail.", "What is this?",
        "How many {n}s are there?", "What color is the {n}?", "Is there a {n} in the picture?",
        "Where is the {n}?", "What is the {n} doing?", "Can you describe this photo?",
        "What do you see in this picture?", "Why is the {n} {a}?", "Which object is {a}?",
    )
    answers = (
        "The image shows a {a} {n} {p}.", "There are {k} {n}s {p}.", "Yes, there is a {a} {n} {p}.",
        "No, there is no {n} in the picture.", "The {n} is {a}.", "A {a} {n} {v} {p}.",
        "In this picture, a {n} {v} while a {a} {n2} is {p}.",
        "The photo shows a {a} {n} and a {n2}. The {n} {v}, and the {n2} is {p}.",
        "It is a {a} {n}, and it {v} {p}. There is also a {n2} nearby.",
        "I can see {k} {a} {n}s and a {n2} {p}.",
    )
    for _ in range(400):
        fill = dict(n=rng.choice(nouns), n2=rng.choice(nouns), a=rng.choice(adjectives),
                    p=rng.choice(places), v=rng.choice(actions), k=rng.choice(numbers))
        question = rng.choice(questions).format(**fill)
        answer = rng.choice(answers).format(**fill)
        yield f"{SYSTEM_PROMPT} USER: {question} ASSISTANT: {answer}"


def _train_byte_bpe(size: int, pre_tokenizer, normalizer=None) -> Tokenizer:
    """A byte-level BPE of exactly `size` tokens trained on the corpus (no added tokens yet)."""
    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    if tok.get_vocab_size() != size:
        raise RuntimeError(f"BPE training gave {tok.get_vocab_size()} tokens, wanted {size}")
    return tok


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the BPE once per process and add the special tokens in Phi-2's order."""
    tok = _train_byte_bpe(BPE_SIZE, pre_tokenizers.ByteLevel(add_prefix_space=False))

    # GPT-2 keeps <|endoftext|> inside the BPE vocabulary (vocab.json), right after the merges.
    spec = json.loads(tok.to_str())
    spec["model"]["vocab"][ENDOFTEXT] = ENDOFTEXT_ID
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    tok.add_tokens([AddedToken(ws, special=False, normalized=True) for ws in WHITESPACE_TOKENS])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (EOS, IMAGE)])

    expected = {ENDOFTEXT: ENDOFTEXT_ID, EOS: EOS_ID, IMAGE: IMAGE_ID,
                **{ws: i for ws, i in zip(WHITESPACE_TOKENS, WHITESPACE_IDS)}}
    got = {t: tok.token_to_id(t) for t in expected}
    if got != expected or tok.get_vocab_size() != N_TOKENS:
        raise RuntimeError(f"unexpected tokenizer layout: {got}")
    return tok.to_str()


# ---------------------------------------------------------------------------------------------
# Phi-3 tokenizer: a SentencePiece BPE model (Llama layout: <unk> <s> </s>, 256 byte pieces, then
# learned pieces) and the tokenizer.json a Phi-3 repo ships for it (the legacy form: a "▁" is
# prepended to every piece of text between special tokens), plus Phi-3's added tokens in their
# order. Flags as in Phi-3-mini: the chat tokens and </s> strip the whitespace after them.
#   0 1 2          <unk> <s> </s>
#   3 .. 258       <0x00> .. <0xFF>
#   259 .. 639     learned pieces                          (Phi-3: up to 31999)
#   640 .. 650     <|endoftext|> <|assistant|> <|placeholder1..4|> <|system|> <|end|>
#                  <|placeholder5|> <|placeholder6|> <|user|>                (Phi-3: 32000-32010)
#   651            <image>
# ---------------------------------------------------------------------------------------------
SPM_SIZE = 640
PHI3_ADDED = ("<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>")
PHI3_IDS = {t: SPM_SIZE + i for i, t in enumerate(PHI3_ADDED)}
PHI3_IMAGE_ID = SPM_SIZE + len(PHI3_ADDED)
PHI3_N_TOKENS = PHI3_IMAGE_ID + 1
PHI3_BOS_ID, PHI3_EOS_ID = 1, PHI3_IDS["<|end|>"]
PHI3_STOP_IDS = (PHI3_IDS["<|end|>"], PHI3_IDS["<|endoftext|>"], PHI3_IDS["<|assistant|>"])
SPACE = "\u2581"


@lru_cache(maxsize=1)
def _spm_model() -> bytes:
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(_corpus())), model_writer=buf, vocab_size=SPM_SIZE, model_type="bpe",
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2)
    return buf.getvalue()


@lru_cache(maxsize=1)
def _phi3_tokenizer_json() -> str:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=_spm_model())
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    if len(pieces) != SPM_SIZE or pieces[:3] != ["<unk>", "<s>", "</s>"] or pieces[3] != "<0x00>":
        raise RuntimeError(f"unexpected SentencePiece layout: {pieces[:4]}, {len(pieces)} pieces")
    vocab = {p: i for i, p in enumerate(pieces)}
    # BPE merges from the SentencePiece scores: every split of a learned piece into two pieces,
    # the highest-scoring result first (what a SentencePiece -> tokenizers conversion produces).
    learned = [i for i in range(SPM_SIZE) if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]
    merges = []
    for i in sorted(learned, key=lambda i: -sp.get_score(i)):
        p = pieces[i]
        merges += sorted(((p[:k], p[k:]) for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab),
                         key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken("<unk>", special=True, normalized=False),
                            AddedToken("<s>", special=True, normalized=False)])
    tok.add_tokens([AddedToken("</s>", special=False, rstrip=True, normalized=False)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=t != "<|endoftext|>")
                            for t in PHI3_ADDED])
    tok.add_special_tokens([AddedToken(IMAGE, special=True, normalized=False)])  # Imp's, default flags
    got = {t: tok.token_to_id(t) for t in [*PHI3_IDS, IMAGE]}
    if got != {**PHI3_IDS, IMAGE: PHI3_IMAGE_ID} or tok.get_vocab_size() != PHI3_N_TOKENS:
        raise RuntimeError(f"unexpected tokenizer layout: {got}")
    return tok.to_str()


# ---------------------------------------------------------------------------------------------
# Qwen2 tokenizer: byte-level BPE with Qwen2's pre-tokenizer regex and NFC normalizer; its
# special tokens follow the BPE vocabulary as in Qwen1.5 (151643-151645), then Imp's <image>.
# ---------------------------------------------------------------------------------------------
QWEN_BPE_SIZE = 700
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_ADDED = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE)
QWEN_IDS = {t: QWEN_BPE_SIZE + i for i, t in enumerate(QWEN_ADDED)}
QWEN_N_TOKENS = QWEN_BPE_SIZE + len(QWEN_ADDED)
QWEN_BOS_ID, QWEN_EOS_ID, QWEN_IMAGE_ID = QWEN_IDS["<|endoftext|>"], QWEN_IDS["<|im_end|>"], QWEN_IDS[IMAGE]
QWEN_STOP_IDS = (QWEN_EOS_ID, QWEN_BOS_ID)


@lru_cache(maxsize=1)
def _qwen2_tokenizer_json() -> str:
    tok = _train_byte_bpe(QWEN_BPE_SIZE, pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), normalizers.NFC())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_ADDED])
    got = {t: tok.token_to_id(t) for t in QWEN_ADDED}
    if got != QWEN_IDS or tok.get_vocab_size() != QWEN_N_TOKENS:
        raise RuntimeError(f"unexpected tokenizer layout: {got}")
    return tok.to_str()


def tokenizer_json(family: str = "phi2") -> str:
    return {"phi2": _tokenizer_json, "phi3": _phi3_tokenizer_json, "qwen2": _qwen2_tokenizer_json}[family]()


@lru_cache(maxsize=None)
def predictable_ids(family: str = "phi2") -> np.ndarray:
    """Sorted ids whose lm_head rows are ordinary: every token but <image>, the padding rows, the
    single-byte tokens that alone decode to a control character or broken UTF-8, and (phi3) the
    SentencePiece <unk>, <s> and </s>, which a trained model does not emit."""
    tok = Tokenizer.from_str(tokenizer_json(family))
    excluded = {tok.token_to_id(t) for t in (IMAGE, "<unk>", "<s>", "</s>")} if family == "phi3" else {IMAGE_ID}

    def plain(i: int) -> bool:
        text = tok.decode([i], skip_special_tokens=False)
        return text in ("\n", "\t") or (text.isascii() and text.isprintable())

    ids = np.array([i for i in range(tok.get_vocab_size()) if i not in excluded and plain(i)])
    ids.setflags(write=False)  # shared by every caller (lru_cache)
    return ids


def _write_tokenizer(dest: Path, family: str = "phi2") -> None:
    if family == "phi3":
        return _write_phi3_tokenizer(dest)
    if family == "qwen2":
        return _write_qwen2_tokenizer(dest)
    tok = Tokenizer.from_str(_tokenizer_json())
    tok.save(str(dest / "tokenizer.json"))
    tok.model.save(str(dest), None)  # vocab.json + merges.txt (with <|endoftext|> in vocab.json)
    added = {i: t for i, t in tok.get_added_tokens_decoder().items()}
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": t.content, "lstrip": False, "normalized": t.normalized,
                     "rstrip": False, "single_word": False, "special": t.special}
            for i, t in sorted(added.items())
        },
        "bos_token": ENDOFTEXT,
        "clean_up_tokenization_spaces": True,  # as Phi-2; decoding for the CLI must not do it
        "eos_token": EOS,
        "model_max_length": 3072,
        "tokenizer_class": "CodeGenTokenizer",
        "unk_token": ENDOFTEXT,
    }
    _write_json(dest / "tokenizer_config.json", config)
    _write_json(dest / "special_tokens_map.json",
                {"bos_token": ENDOFTEXT, "eos_token": EOS, "unk_token": ENDOFTEXT})
    # Like Phi-2's added_tokens.json: the added tokens that are not in vocab.json.
    _write_json(dest / "added_tokens.json",
                {t.content: i for i, t in sorted(added.items()) if i > ENDOFTEXT_ID})


def _added_tokens_decoder(tok: Tokenizer) -> dict:
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tok.get_added_tokens_decoder().items())}


def _write_phi3_tokenizer(dest: Path) -> None:
    """tokenizer.model + tokenizer.json + tokenizer_config.json, as a Phi-3 repo has them."""
    tok = Tokenizer.from_str(_phi3_tokenizer_json())
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer.model").write_bytes(_spm_model())
    _write_json(dest / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": _added_tokens_decoder(tok),
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "<|end|>", "legacy": False,
        "model_max_length": 4096, "pad_token": "<|endoftext|>", "padding_side": "right",
        "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
        "use_default_system_prompt": False})
    _write_json(dest / "special_tokens_map.json",
                {"bos_token": "<s>", "eos_token": "<|end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"})
    _write_json(dest / "added_tokens.json", {t: i for t, i in [*PHI3_IDS.items(), (IMAGE, PHI3_IMAGE_ID)]})


def _write_qwen2_tokenizer(dest: Path) -> None:
    """tokenizer.json + vocab.json + merges.txt + tokenizer_config.json, as Qwen1.5 repos have."""
    tok = Tokenizer.from_str(_qwen2_tokenizer_json())
    tok.save(str(dest / "tokenizer.json"))
    tok.model.save(str(dest), None)
    _write_json(dest / "tokenizer_config.json", {
        "add_prefix_space": False, "added_tokens_decoder": _added_tokens_decoder(tok), "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None})
    _write_json(dest / "special_tokens_map.json", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    _write_json(dest / "added_tokens.json", QWEN_IDS)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------
VISION_PREFIX = "vision_tower.vision_tower.vision_model."
_DTYPES = {"float16": ("F16", 2), "bfloat16": ("BF16", 2), "float32": ("F32", 4)}
_SHARD_BYTES = 2 * 1024**3  # target shard size when n_shards is not given


@dataclass(frozen=True)
class _Init:
    """Normal(mean, std) init of one canonical (new-layout) tensor."""

    name: str
    shape: tuple[int, ...]
    std: float
    mean: float = 0.0

    def draw(self, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, zlib.crc32(self.name.encode())])
        a = rng.standard_normal(self.shape, dtype=np.float32)
        a *= self.std
        a += self.mean
        return a


def _linear(name: str, n_out: int, n_in: int, gain: float = 1.0) -> list[_Init]:
    # std gain/sqrt(fan_in) keeps activations O(1) at any size; biases small but non-zero so that
    # a converter dropping a bias is caught.
    return [_Init(f"{name}.weight", (n_out, n_in), gain / math.sqrt(n_in)),
            _Init(f"{name}.bias", (n_out,), 0.05)]


def _norm(name: str, n: int) -> list[_Init]:
    return [_Init(f"{name}.weight", (n,), 0.1, 1.0), _Init(f"{name}.bias", (n,), 0.05)]


def _rms_norm(name: str, n: int) -> list[_Init]:
    return [_Init(f"{name}.weight", (n,), 0.1, 1.0)]


def _weight(name: str, n_out: int, n_in: int, gain: float = 1.0) -> list[_Init]:
    return [_Init(f"{name}.weight", (n_out, n_in), gain / math.sqrt(n_in))]


def _text_layer_inits(s: Sizes, p: str, family: str) -> list[_Init]:
    H, F = s.hidden_size, s.intermediate_size
    if family == "phi2":
        inits = _norm(p + "input_layernorm", H)
        for proj in ("q_proj", "k_proj", "v_proj", "dense"):
            inits += _linear(p + "self_attn." + proj, H, H)
        return inits + _linear(p + "mlp.fc1", F, H) + _linear(p + "mlp.fc2", H, F)
    inits = _rms_norm(p + "input_layernorm", H)
    if family == "phi3":  # fused q|k|v and gate|up, no biases
        inits += _weight(p + "self_attn.qkv_proj", 3 * H, H) + _weight(p + "self_attn.o_proj", H, H)
        mlp = _weight(p + "mlp.gate_up_proj", 2 * F, H)
    else:  # qwen2: q/k/v biases only
        for proj in ("q_proj", "k_proj", "v_proj"):
            inits += _linear(p + "self_attn." + proj, H, H)
        inits += _weight(p + "self_attn.o_proj", H, H)
        mlp = _weight(p + "mlp.gate_proj", F, H) + _weight(p + "mlp.up_proj", F, H)
    return inits + _rms_norm(p + "post_attention_layernorm", H) + mlp + _weight(p + "mlp.down_proj", H, F)


def _canonical_inits(s: Sizes, family: str = "phi2") -> list[_Init]:
    """Every tensor of the checkpoint, under its new-layout name, in file order."""
    H, V = s.hidden_size, s.vision_hidden_size
    inits = [_Init("model.embed_tokens.weight", (s.vocab_rows, H), 1.0)]
    for i in range(s.num_layers):
        inits += _text_layer_inits(s, f"model.layers.{i}.", family)
    inits += _norm("model.final_layernorm", H) if family == "phi2" else _rms_norm("model.norm", H)

    vp = "model." + VISION_PREFIX
    patch_in = 3 * s.patch_size**2
    inits += [_Init(vp + "embeddings.patch_embedding.weight", (V, 3, s.patch_size, s.patch_size),
                    1 / math.sqrt(patch_in)),
              _Init(vp + "embeddings.patch_embedding.bias", (V,), 0.05),
              _Init(vp + "embeddings.position_embedding.weight", (s.n_image_tokens, V), 0.3)]
    for i in range(s.vision_layers):
        p = f"{vp}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            inits += _linear(p + "self_attn." + proj, V, V)
        inits += _norm(p + "layer_norm1", V) + _norm(p + "layer_norm2", V)
        inits += _linear(p + "mlp.fc1", s.vision_intermediate_size, V)
        inits += _linear(p + "mlp.fc2", V, s.vision_intermediate_size)
    inits += _norm(vp + "post_layernorm", V)  # unused by Imp, present in the real files

    # The projector's output gain brings image embeddings to about the scale of text embeddings.
    inits += _linear("model.mm_projector.0", H, V) + _linear("model.mm_projector.2", H, H, gain=2.0)
    # Logit std ~2: well spread, far from the float16 rounding of the weights. Phi-3's and
    # Qwen2's lm_head have no bias.
    inits += (_linear if family == "phi2" else _weight)("lm_head", s.vocab_rows, H, gain=2.0)
    return inits


def _draw_lm_head_weight(init: _Init, embed: _Init, seed: int, family: str = "phi2") -> np.ndarray:
    """Random rows minus SELF_REPEAT_PENALTY x the token's own unit embedding.

    A trained model seldom predicts the token it has just read; plain random weights do, and
    greedy decoding then falls into a one-token loop (2 seeds in 30 on TINY; 0 with this). The
    hidden state carries the input embedding through the residual path, so this lowers a token's
    logit right after itself. Without an lm_head bias (phi3, qwen2), the rows of tokens outside
    predictable_ids are zero instead: a logit of exactly 0 never beats the best of hundreds of
    random ones.
    """
    e = embed.draw(seed)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    w = init.draw(seed)
    w -= SELF_REPEAT_PENALTY * e
    if family != "phi2":
        dead = np.ones(len(w), dtype=bool)
        dead[predictable_ids(family)] = False
        w[dead] = 0.0
    return w


def _draw_lm_head_bias(init: _Init, seed: int) -> np.ndarray:
    bias = np.full(init.shape, UNUSED_ROW_BIAS, dtype=np.float32)
    live = predictable_ids()
    bias[live] = init.draw(seed)[live]
    return bias


_OLD_NAMES = (  # new-layout prefix -> old-layout prefix (phi-msft), outside the layers
    ("model.final_layernorm.", "lm_head.ln."),
    ("model.embed_tokens.", "transformer.embd.wte."),
    ("model.mm_projector.", "transformer.mm_projector."),
    ("model.vision_tower.", "transformer.vision_tower."),
    ("lm_head.", "lm_head.linear."),
)
_OLD_LAYER = {"input_layernorm": "ln", "self_attn.dense": "mixer.out_proj", "mlp.fc1": "mlp.fc1",
              "mlp.fc2": "mlp.fc2"}


def _draw_fused(parts: list[_Init], seed: int) -> np.ndarray:
    return np.concatenate([p.draw(seed) for p in parts])


def _plan(s: Sizes, layout: str, seed: int, family: str = "phi2") -> list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """(stored name, shape, float32 producer) for every tensor, in file order."""
    if layout not in ("new", "old") or (layout == "old" and family != "phi2"):
        raise ValueError(f"layout must be 'new' or (phi2 only) 'old', not {layout!r}")
    inits = _canonical_inits(s, family)
    by_name = {i.name: i for i in inits}

    def producer(init: _Init) -> Callable[[], np.ndarray]:
        if init.name == "lm_head.weight":
            return partial(_draw_lm_head_weight, init, by_name["model.embed_tokens.weight"], seed, family)
        if init.name == "lm_head.bias":
            return partial(_draw_lm_head_bias, init, seed)
        return partial(init.draw, seed)

    if layout == "new":
        return [(i.name, i.shape, producer(i)) for i in inits]
    plan = []
    for init in inits:
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", init.name)
        if not m:
            new_prefix, old_prefix = next(p for p in _OLD_NAMES if init.name.startswith(p[0]))
            plan.append((old_prefix + init.name[len(new_prefix):], init.shape, producer(init)))
            continue
        layer, module, kind = m.groups()
        if module in ("self_attn.q_proj", "self_attn.k_proj"):
            continue  # fused into Wqkv, written in v_proj's place
        if module == "self_attn.v_proj":
            parts = [by_name[f"model.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            plan.append((f"transformer.h.{layer}.mixer.Wqkv.{kind}", (3 * init.shape[0], *init.shape[1:]),
                         partial(_draw_fused, parts, seed)))
        else:
            plan.append((f"transformer.h.{layer}.{_OLD_LAYER[module]}.{kind}", init.shape, producer(init)))
    return plan


def planned_tensors(sizes: Sizes = TINY, layout: str = "new", family: str = "phi2") -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor make_checkpoint would write, in file order (writes nothing)."""
    return {name: shape for name, shape, _ in _plan(sizes, layout, seed=0, family=family)}


def _to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even, as torch does for finite values."""
    u = a.view(np.uint32)
    r = (u >> 16) & 1
    r += 0x7FFF
    r += u
    r >>= 16
    return r.astype(np.uint16)


def _encode(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return _to_bf16(a)
    return a.astype(np.float16 if dtype == "float16" else np.float32, copy=False)


def _split_shards(sizes_bytes: list[int], n_shards: int) -> list[int]:
    """Shard index per tensor: contiguous runs of about total/n_shards bytes each."""
    total = sum(sizes_bytes)
    target = total / n_shards
    shard_of, start = [], 0
    for nbytes in sizes_bytes:
        shard_of.append(min(n_shards - 1, int((start + nbytes / 2) / target)))
        start += nbytes
    if sorted(set(shard_of)) != list(range(n_shards)):
        raise ValueError(f"cannot split these tensors into {n_shards} non-empty shards")
    return shard_of


def _write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]],
                       dtype: str) -> None:
    """Stream a safetensors file: header from the shapes, then one tensor at a time."""
    code, itemsize = _DTYPES[dtype]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in entries:
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape, produce in entries:
            data = _encode(produce(), dtype)
            assert data.shape == shape, (name, data.shape, shape)
            f.write(memoryview(np.ascontiguousarray(data)).cast("B"))


def _write_weights(dest: Path, plan, dtype: str, n_shards: int | None) -> None:
    itemsize = _DTYPES[dtype][1]
    sizes_bytes = [math.prod(shape) * itemsize for _, shape, _ in plan]
    if n_shards is None:
        n_shards = max(2, math.ceil(sum(sizes_bytes) / _SHARD_BYTES))
    shard_of = _split_shards(sizes_bytes, n_shards)
    weight_map = {}
    for k in range(n_shards):
        fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        entries = [e for e, s in zip(plan, shard_of) if s == k]
        _write_safetensors(dest / fname, entries, dtype)
        weight_map.update({name: fname for name, _, _ in entries})
    _write_json(dest / "model.safetensors.index.json",
                {"metadata": {"total_size": sum(sizes_bytes)}, "weight_map": dict(sorted(weight_map.items()))})


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------
def _mm_config(s: Sizes, dtype: str, aspect: str) -> dict:
    """The multimodal part every Imp config has (vision_tower_config only in the Phi ones)."""
    return {
        "image_aspect_ratio": aspect,
        "mm_hidden_size": s.vision_hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": f"google/{tower_folder_name(s)}",
        "use_mm_proj": True,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "vision_tower_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": s.vision_hidden_size,
            "intermediate_size": s.vision_intermediate_size,
            "num_attention_heads": s.vision_heads,
            "num_hidden_layers": s.vision_layers + 1,  # the original tower; Imp drops the last
            "num_channels": 3,
            "image_size": s.image_size,
            "patch_size": s.patch_size,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "attention_dropout": 0.0,
        },
    }


def _llama_like_config(s: Sizes, dtype: str, aspect: str, drop_lm_sizes: bool, family: str) -> dict:
    cfg = _mm_config(s, dtype, aspect)
    sizes = {"hidden_size": s.hidden_size, "num_hidden_layers": s.num_layers, "num_attention_heads": s.num_heads,
             "num_key_value_heads": s.num_heads, "intermediate_size": s.intermediate_size,
             "vocab_size": s.vocab_rows, "max_position_embeddings": s.max_position_embeddings}
    if family == "phi3":  # Imp-v1.5-4B-Phi3 (Phi-3-mini-4k values)
        cfg.update(architectures=["ImpPhi3ForCausalLM"], model_type="imp_phi3", bos_token_id=PHI3_BOS_ID,
                   eos_token_id=PHI3_EOS_ID, pad_token_id=PHI3_IDS["<|endoftext|>"],
                   image_token_index=PHI3_IMAGE_ID, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
                   rope_scaling=None, sliding_window=2047, original_max_position_embeddings=4096,
                   attention_bias=False, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    else:  # Imp-v1.5-2B-Qwen1.5 (Qwen1.5-1.8B values); make_checkpoint drops vision_tower_config
        cfg.update(architectures=["ImpQwen2ForCausalLM"], model_type="imp_qwen2", bos_token_id=QWEN_BOS_ID,
                   eos_token_id=QWEN_EOS_ID, image_token_index=QWEN_IMAGE_ID, hidden_act="silu",
                   rms_norm_eps=1e-6, rope_theta=1e6, use_sliding_window=False, sliding_window=32768,
                   max_window_layers=21, attention_dropout=0.0)
    if not drop_lm_sizes:
        cfg.update(sizes)
    return dict(sorted(cfg.items()))


def _config(s: Sizes, layout: str, dtype: str, aspect: str, drop_lm_sizes: bool, family: str = "phi2") -> dict:
    if family != "phi2":
        return _llama_like_config(s, dtype, aspect, drop_lm_sizes, family)
    cfg = _mm_config(s, dtype, aspect)
    cfg.update(architectures=["ImpForCausalLM"], model_type="imp", bos_token_id=ENDOFTEXT_ID, eos_token_id=EOS_ID,
               image_token_index=IMAGE_ID)
    if layout == "new":  # Imp-v1.5: transformers' PhiConfig names
        lm = {"hidden_act": "gelu_new", "qk_layernorm": False, "resid_pdrop": 0.1, "embd_pdrop": 0.0,
              "attention_dropout": 0.0}
    else:  # imp-v1-3b: the phi-msft configuration class (Imp's phi2/configuration_phi.py)
        lm = {"activation_function": "gelu_new", "flash_attn": False, "flash_rotary": False,
              "fused_dense": False, "resid_pdrop": 0.1, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    cfg.update(lm)
    if drop_lm_sizes:
        # As the current imp-v1-3b config: the sizes live in configuration_imp.py's defaults, the
        # training context only in the LLaVA-style tokenizer_model_max_length.
        cfg["tokenizer_model_max_length"] = s.max_position_embeddings
    else:
        cfg.update(_lm_size_keys(s, "hf" if layout == "new" else "phi-msft"))
    return dict(sorted(cfg.items()))


def _lm_size_keys(s: Sizes, family: str) -> dict:
    """The language-model size keys of one config family: transformers' PhiConfig ("hf") or
    phi-msft's (Imp's phi2/configuration_phi.py, the original imp-v1-3b)."""
    if family == "hf":
        return {"hidden_size": s.hidden_size, "num_hidden_layers": s.num_layers,
                "num_attention_heads": s.num_heads, "num_key_value_heads": s.num_heads,
                "intermediate_size": s.intermediate_size,
                "partial_rotary_factor": s.partial_rotary_factor, "rope_theta": 10000.0,
                "layer_norm_eps": 1e-5, "vocab_size": s.vocab_rows,
                "max_position_embeddings": s.max_position_embeddings}
    if family == "phi-msft":
        return {"n_embd": s.hidden_size, "n_layer": s.num_layers, "n_head": s.num_heads,
                "n_head_kv": None,
                # phi-msft writes null for the default 4 x n_embd, as the real imp-v1-3b does
                "n_inner": None if s.intermediate_size == 4 * s.hidden_size else s.intermediate_size,
                "rotary_dim": s.rotary_dim, "layer_norm_epsilon": 1e-5,
                "vocab_size": s.vocab_rows, "n_positions": s.max_position_embeddings}
    raise ValueError(f"lm_size_keys must be 'hf', 'phi-msft' or 'none', not {family!r}")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------
def make_photo(path: Path) -> Path:
    """A small non-square photo-like PNG (smooth gradients plus noise, 104 x 72), always the same."""
    from PIL import Image

    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:72, 0:104]
    base = np.stack([x * 2, y * 3, (x + y) * 1.5], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def make_checkpoint(dest: Path, *, layout: str = "new", dtype: str = "float16", aspect: str = "square",
                    sizes: Sizes | None = None, seed: int = 0, n_shards: int | None = None,
                    drop_lm_sizes_from_config: bool = False, lm_size_keys: str | None = None,
                    tower_config: str | None = None, tower_config_layers: int | None = None,
                    tokenizer_files: str = "all", family: str = "phi2") -> Path:
    """Write a random-weight Imp checkpoint folder at dest and return dest.

    family: the language backbone, "phi2", "phi3" or "qwen2"; sizes=None is its tiny size
    (TINY_FOR). n_shards=None picks max(2, ceil(size / 2 GiB)): 2 shards for TINY, ~2 GB shards
    for FULL.

    The other options give the config and file-set variants of the published repos; the weights
    (and so the meaning) stay those of the plain checkpoint of the same sizes and seed:
      lm_size_keys: None = the layout's own key family; "hf" or "phi-msft" = that family whatever
        the layout; "none" = no size keys, as drop_lm_sizes_from_config (the current imp-v1-3b).
      tower_config: where the SigLIP config is: "inline" (config.json's vision_tower_config),
        "folder" (only a `siglip-so400m-patch14-<size>/config.json` beside the weights, as
        Imp-v1.5-3B-196), "both", or "none" (as Imp-v1.5-2B-Qwen1.5). None: the family's own
        ("none" for qwen2, else "inline").
      tower_config_layers: the layer count that config states (default: kept + 1, the original
        tower, as the real configs say 27 for 26 stored).
      tokenizer_files: see TOKENIZER_FILE_SETS (Phi-2's file sets; phi3 and qwen2 take "all").
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    sizes = TINY_FOR[family] if sizes is None else sizes
    tower_config = tower_config or ("none" if family == "qwen2" else "inline")
    if tower_config not in TOWER_CONFIGS:
        raise ValueError(f"tower_config must be one of {TOWER_CONFIGS}, not {tower_config!r}")
    if tokenizer_files not in TOKENIZER_FILE_SETS or (family != "phi2" and tokenizer_files != "all"):
        raise ValueError(f"tokenizer_files must be one of {sorted(TOKENIZER_FILE_SETS)} (phi2) or 'all', "
                         f"not {tokenizer_files!r}")
    if family != "phi2" and lm_size_keys not in (None, "none"):
        raise ValueError("lm_size_keys 'hf' / 'phi-msft' are Phi-2 config key families")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    if aspect not in ("square", "pad"):
        raise ValueError(f"aspect must be 'square' or 'pad', not {aspect!r}")
    n_tokens = Tokenizer.from_str(tokenizer_json(family)).get_vocab_size()
    if sizes.vocab_rows <= n_tokens:
        raise ValueError(f"vocab_rows ({sizes.vocab_rows}) must exceed the tokenizer size ({n_tokens})")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(dest, family)
    _keep_tokenizer_files(dest, tokenizer_files)
    cfg = _config(sizes, layout, dtype, aspect, drop_lm_sizes_from_config or lm_size_keys == "none", family)
    if lm_size_keys not in (None, "none"):
        cfg = {k: v for k, v in cfg.items()
               if k not in _lm_size_keys(sizes, "hf") and k not in _lm_size_keys(sizes, "phi-msft")}
        cfg = dict(sorted({**cfg, **_lm_size_keys(sizes, lm_size_keys)}.items()))
    vision = cfg["vision_tower_config"]
    if tower_config_layers is not None:
        vision["num_hidden_layers"] = tower_config_layers
    if tower_config in ("folder", "both"):
        folder = dest / tower_folder_name(sizes)
        folder.mkdir(exist_ok=True)
        # As SiglipVisionModel.save_pretrained leaves it, with the preprocessor config beside it.
        _write_json(folder / "config.json",
                    dict(sorted({**vision, "architectures": ["SiglipVisionModel"], "torch_dtype": dtype}.items())))
        _write_json(folder / "preprocessor_config.json",
                    {"do_normalize": True, "do_resize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                     "image_processor_type": "SiglipImageProcessor", "resample": 3,
                     "size": {"height": sizes.image_size, "width": sizes.image_size}})
    if tower_config in ("folder", "none"):
        del cfg["vision_tower_config"]
    _write_json(dest / "config.json", cfg)
    _write_weights(dest, _plan(sizes, layout, seed, family), dtype, n_shards)
    return dest


TOWER_CONFIGS = ("inline", "folder", "both", "none")
# Tokenizer file sets a Phi-2-era repo may ship (names of the files kept; "all" keeps every one).
TOKENIZER_FILE_SETS = {
    "all": None,
    # vocab.json + merges.txt + added_tokens.json + tokenizer_config.json (added_tokens_decoder)
    "no-tokenizer-json": ("vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json",
                          "special_tokens_map.json"),
    # ... and a tokenizer_config.json without added_tokens_decoder (older transformers): which
    # added tokens are special is then only said by the special-token names.
    "no-tokenizer-json-no-decoder": ("vocab.json", "merges.txt", "added_tokens.json",
                                     "tokenizer_config.json", "special_tokens_map.json"),
    "tokenizer-json-only": ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"),
}


def tower_folder_name(s: Sizes) -> str:
    """The tower folder's name: the last part of config.json's mm_vision_tower."""
    return f"siglip-so400m-patch{s.patch_size}-{s.image_size}"


def _keep_tokenizer_files(dest: Path, file_set: str) -> None:
    keep = TOKENIZER_FILE_SETS[file_set]
    if keep is None:
        return
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json",
                 "tokenizer_config.json", "special_tokens_map.json"):
        if name not in keep:
            (dest / name).unlink()
    if file_set == "no-tokenizer-json-no-decoder":
        path = dest / "tokenizer_config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        del config["added_tokens_decoder"]
        _write_json(path, config)


def make_bin_only_checkpoint(dest: Path, *, sharded: bool = False) -> Path:
    """A checkpoint whose weights exist only as pickled PyTorch files, which must be refused.

    The .bin payload is a canary pickle: unpickling it (pickle.load, or torch.load with
    weights_only=False) creates the empty file dest/BIN_CANARY, so a test can assert it was never
    unpickled. torch.load's default weights_only=True refuses it without running it.
    sharded=True writes pytorch_model-0000K-of-00002.bin + pytorch_model.bin.index.json instead.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(dest)
    _write_json(dest / "config.json", _config(TINY, "new", "float16", "square", False))
    marker = str((dest / BIN_CANARY).resolve()).encode()
    # Protocol 2 by hand: GLOBAL io.open, args (marker, "w"), REDUCE, STOP.
    canary = (b"\x80\x02cio\nopen\nX" + len(marker).to_bytes(4, "little") + marker
              + b"X\x01\x00\x00\x00w\x86R.")
    names = [f"pytorch_model-{k:05d}-of-00002.bin" for k in (1, 2)] if sharded else ["pytorch_model.bin"]
    for name in names:
        (dest / name).write_bytes(canary)
    if sharded:
        _write_json(dest / "pytorch_model.bin.index.json",
                    {"metadata": {"total_size": 2 * len(canary)},
                     "weight_map": {"model.embed_tokens.weight": names[0], "lm_head.weight": names[1]}})
    return dest


def main() -> None:
    """python -m tests.factory DEST [--sizes full] ...: write a checkpoint by hand (e.g. for bench)."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--family", choices=FAMILIES, default="phi2")
    ap.add_argument("--sizes", choices=["tiny", "full", "full_196"], default="tiny")
    ap.add_argument("--layout", choices=["new", "old"], default="new")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="float16")
    ap.add_argument("--aspect", choices=["square", "pad"], default="square")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, default=None)
    a = ap.parse_args()
    full = {"phi2": FULL, "phi3": FULL_PHI3, "qwen2": FULL_QWEN2}[a.family]
    sizes = {"tiny": TINY_FOR[a.family], "full": full, "full_196": FULL_196}[a.sizes]
    make_checkpoint(a.dest, layout=a.layout, dtype=a.dtype, aspect=a.aspect, sizes=sizes,
                    seed=a.seed, n_shards=a.shards, family=a.family)


if __name__ == "__main__":
    main()
