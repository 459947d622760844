"""`imp convert`: the acceptance list of the converter (checkpoint -> phi2 text GGUF + clip mmproj).

What is proved here, and how:
  1. read-back of both GGUF files with gguf.GGUFReader: every key llama.cpp reads, with the value
     TYPE its loader expects (a wrong type aborts llama.cpp), the vocabulary and its token types,
     and every tensor's name, shape, storage type and data against the checkpoint (parsed here,
     not with the product's reader);
  2. both key layouts of the same weights give byte-identical tensors (the fused Wqkv split),
     bf16 checkpoints convert exactly;
  3. configs without the language-model sizes;
  4. Q8_0 / Q4_K_M text and Q8_0 mmproj: types, no stray files, and llama.cpp loads them and agrees
     with F16 within a measured tolerance;
  5. bad inputs through the real CLI: exit 1, ONE `error:` line, no traceback, nothing on stdout,
     nothing written;
  6. atomicity: a failure or Ctrl-C while writing leaves no file (and never clobbers a good one);
  7. Hugging Face repo ids, offline, against a hub cache built here;
  8. --json and the plain summary (stdout) versus progress (stderr).
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, TokenType

from helpers import assert_ok, assert_one_line_error, assert_usage_error, clean_env, run_imp, run_python, start_imp
from factory import (
    BIN_CANARY,
    ENDOFTEXT_ID,
    EOS_ID,
    IMAGE_ID,
    N_TOKENS,
    TINY,
    WHITESPACE_IDS,
    WHITESPACE_TOKENS,
    Sizes,
    make_bin_only_checkpoint,
    make_checkpoint,
    planned_tensors,
    predictable_ids,
)

VP = "model.vision_tower.vision_tower.vision_model."  # new-layout vision prefix


# =============================================================================================
# helpers
# =============================================================================================
def listing(folder: Path) -> list[str]:
    """Every entry of a folder, hidden ones included; [] if it does not exist."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def kv(reader: GGUFReader, key: str):
    assert key in reader.fields, f"missing GGUF key {key}"
    return reader.fields[key].contents()


def kv_types(reader: GGUFReader, key: str) -> list[GGUFValueType]:
    assert key in reader.fields, f"missing GGUF key {key}"
    return list(reader.fields[key].types)


def tensors(reader: GGUFReader) -> dict:
    return {t.name: t for t in reader.tensors}


def np_shape(t) -> tuple[int, ...]:
    """A GGUF tensor's shape in numpy (row-major) order; the reader gives ggml's ne order."""
    return tuple(int(n) for n in reversed(t.shape.tolist()))


def values(t) -> np.ndarray:
    """An unquantized GGUF tensor's values as float32 in numpy order."""
    assert t.tensor_type in (QT.F16, QT.F32), t.tensor_type
    return np.asarray(t.data, dtype=np.float32).reshape(np_shape(t))


def read_checkpoint(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint as float32, parsed here from the safetensors format (8-byte
    header length, JSON header, raw little-endian data), bf16 widened as the top half of a float32."""
    dtypes = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32}
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        for name, info in json.loads(raw[8:8 + n]).items():
            if name == "__metadata__":
                continue
            start, end = (8 + n + o for o in info["data_offsets"])
            a = np.frombuffer(raw[start:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
            out[name] = (a.astype(np.uint32) << 16).view(np.float32) if info["dtype"] == "BF16" else a.astype(np.float32)
    return out


def rewrite_shard(folder: Path, drop: str | None = None, replace: dict | None = None) -> None:
    """Rewrite the shard holding `drop` (or the keys of `replace`) without it / with new arrays."""
    from safetensors.numpy import load_file, save_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    key = drop or next(iter(replace))
    shard = folder / index[key]
    data = load_file(str(shard))
    if drop:
        del data[drop]
    data.update(replace or {})
    save_file(data, str(shard), metadata={"format": "pt"})


def text_map(layer_count: int) -> dict[str, str]:
    """GGUF text tensor base name -> new-layout checkpoint base name."""
    m = {"token_embd": "model.embed_tokens", "output_norm": "model.final_layernorm", "output": "lm_head"}
    for i in range(layer_count):
        p = f"model.layers.{i}."
        m.update({f"blk.{i}.attn_norm": p + "input_layernorm", f"blk.{i}.attn_q": p + "self_attn.q_proj",
                  f"blk.{i}.attn_k": p + "self_attn.k_proj", f"blk.{i}.attn_v": p + "self_attn.v_proj",
                  f"blk.{i}.attn_output": p + "self_attn.dense", f"blk.{i}.ffn_up": p + "mlp.fc1",
                  f"blk.{i}.ffn_down": p + "mlp.fc2"})
    return m


def vision_map(layer_count: int) -> dict[str, str]:
    """GGUF mmproj tensor name -> new-layout checkpoint tensor name (every tensor, with suffix)."""
    m = {"v.patch_embd.weight": VP + "embeddings.patch_embedding.weight",
         "v.patch_embd.bias": VP + "embeddings.patch_embedding.bias",
         "v.position_embd.weight": VP + "embeddings.position_embedding.weight"}
    for i in range(layer_count):
        for gg, hf in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                       ("attn_v", "self_attn.v_proj"), ("attn_out", "self_attn.out_proj"),
                       ("ln1", "layer_norm1"), ("ln2", "layer_norm2"), ("ffn_up", "mlp.fc1"),
                       ("ffn_down", "mlp.fc2")):
            for kind in ("weight", "bias"):
                m[f"v.blk.{i}.{gg}.{kind}"] = f"{VP}encoder.layers.{i}.{hf}.{kind}"
    for j in (0, 2):
        for kind in ("weight", "bias"):
            m[f"mm.{j}.{kind}"] = f"model.mm_projector.{j}.{kind}"
    return m


def full_text_map(layer_count: int) -> dict[str, str]:
    """GGUF text tensor name -> new-layout checkpoint tensor name (the embedding has no bias)."""
    return {f"{g}.{k}": f"{h}.{k}" for g, h in text_map(layer_count).items() for k in ("weight", "bias")
            if (g, k) != ("token_embd", "bias")}


# The factory's tensors (new layout) are the reference for every expected shape.
PLANNED = planned_tensors(TINY, "new")
U32, F32V, STR, BOOL, ARR, I32 = (GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING,
                                  GGUFValueType.BOOL, GGUFValueType.ARRAY, GGUFValueType.INT32)
IGNORED_WHEN_COMPARING = {"general.name", "imp.source", "imp.checkpoint_layout"}


def metadata(reader: GGUFReader) -> dict:
    return {k: (list(f.types), f.contents()) for k, f in reader.fields.items()
            if k not in IGNORED_WHEN_COMPARING and not k.startswith("GGUF.")}


# =============================================================================================
# 1. read-back
# =============================================================================================
@pytest.mark.parametrize("layout", ["new", "old"])
def test_text_gguf_metadata(converted, checkpoint, layout):
    text, _ = converted(layout)
    r = GGUFReader(text)
    s = TINY
    assert kv(r, "general.architecture") == "phi2"
    assert "phi3" not in str(kv(r, "general.name")).lower()  # llama.cpp keys a tokenizer quirk off it
    expected_u32 = {
        "phi2.context_length": s.max_position_embeddings,
        "phi2.embedding_length": s.hidden_size,
        "phi2.feed_forward_length": s.intermediate_size,  # the real fc1 width (160), not 4 x 64
        "phi2.block_count": s.num_layers,
        "phi2.attention.head_count": s.num_heads,
        "phi2.attention.head_count_kv": s.num_heads,
        "phi2.rope.dimension_count": s.rotary_dim,  # 8 of head size 16: partial rotary
        "general.file_type": 1,  # MOSTLY_F16
        "tokenizer.ggml.eos_token_id": EOS_ID,
        "imp.image_token_count": s.n_image_tokens,
    }
    for key, value in expected_u32.items():
        assert kv_types(r, key) == [U32], key
        assert kv(r, key) == value, key
    assert s.intermediate_size != 4 * s.hidden_size and s.rotary_dim != s.head_dim  # traps armed
    assert kv_types(r, "phi2.attention.layer_norm_epsilon") == [F32V]
    assert kv(r, "phi2.attention.layer_norm_epsilon") == pytest.approx(1e-5, rel=1e-6)
    assert kv(r, "tokenizer.ggml.model") == "gpt2"
    assert kv(r, "tokenizer.ggml.pre") == "phi-2"
    assert kv_types(r, "tokenizer.ggml.add_bos_token") == [BOOL]
    assert kv(r, "tokenizer.ggml.add_bos_token") is False
    assert kv(r, "imp.prompt_family") == "phi2"
    assert kv(r, "imp.image_aspect_ratio") == "square"
    assert kv_types(r, "tokenizer.ggml.tokens") == [ARR, STR]
    assert kv_types(r, "tokenizer.ggml.token_type") == [ARR, I32]
    assert kv_types(r, "tokenizer.ggml.merges") == [ARR, STR]


@pytest.mark.parametrize("layout", ["new", "old"])
def test_text_gguf_vocabulary(converted, checkpoint, layout):
    text, _ = converted(layout)
    r = GGUFReader(text)
    tokens, types = kv(r, "tokenizer.ggml.tokens"), kv(r, "tokenizer.ggml.token_type")
    rows = tensors(r)["token_embd.weight"]
    assert len(tokens) == len(types) == np_shape(rows)[0] == TINY.vocab_rows
    assert tokens[ENDOFTEXT_ID] == "<|endoftext|>" and tokens[EOS_ID] == "</s>" and tokens[IMAGE_ID] == "<image>"
    for i in (ENDOFTEXT_ID, EOS_ID, IMAGE_ID):
        assert types[i] == TokenType.CONTROL == 3, (i, tokens[i])
    for i, ws in zip(WHITESPACE_IDS, WHITESPACE_TOKENS):
        assert types[i] == TokenType.USER_DEFINED == 4, (i, tokens[i])
        assert tokens[i] == ws  # raw text, as llama.cpp matches USER_DEFINED tokens literally
    assert all(t == TokenType.UNUSED == 5 for t in types[N_TOKENS:])
    special = {ENDOFTEXT_ID, EOS_ID, IMAGE_ID, *WHITESPACE_IDS}
    assert all(types[i] == TokenType.NORMAL == 1 for i in range(N_TOKENS) if i not in special)
    assert len(set(tokens)) == len(tokens)  # llama.cpp's vocab needs unique texts
    # Same vocabulary as tokenizer.json: every id -> text, and the merges in order.
    tj = json.loads((checkpoint(layout) / "tokenizer.json").read_text())
    for text_, i in tj["model"]["vocab"].items():
        assert tokens[i] == text_
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    assert kv(r, "tokenizer.ggml.merges") == merges


def expected_text_shapes(s: Sizes = TINY) -> dict[str, tuple[int, ...]]:
    planned = planned_tensors(s, "new")
    return {g: planned[h] for g, h in full_text_map(s.num_layers).items()}


@pytest.mark.parametrize("layout", ["new", "old"])
def test_text_gguf_tensors(converted, checkpoint, layout):
    text, _ = converted(layout)
    got = tensors(GGUFReader(text))
    want = expected_text_shapes()
    assert sorted(got) == sorted(want)  # none missing, none extra
    for name, t in got.items():
        assert np_shape(t) == want[name], name
        assert t.tensor_type == (QT.F16 if len(want[name]) == 2 else QT.F32), name  # norms/biases F32
    # Data: the new layout's tensors, read independently of the product; the old layout is
    # compared with the new one byte for byte in test_layouts_give_identical_tensors.
    if layout == "new":
        ck = read_checkpoint(checkpoint("new"))
        for g, h in full_text_map(TINY.num_layers).items():
            np.testing.assert_array_equal(values(got[g]), ck[h].astype(np.float16).astype(np.float32), err_msg=g)


def test_mmproj_gguf_metadata(converted):
    _, mmproj = converted("new")
    r = GGUFReader(mmproj)
    s = TINY
    assert kv(r, "general.architecture") == "clip"
    assert kv(r, "clip.projector_type") == "mlp"
    for key in ("clip.has_vision_encoder", "clip.use_gelu"):  # use_gelu false = quick-GELU: wrong
        assert kv_types(r, key) == [BOOL], key
        assert kv(r, key) is True, key
    assert kv_types(r, "clip.vision.feature_layer") == [ARR, I32]
    assert kv(r, "clip.vision.feature_layer") == [s.vision_layers]  # the kept layers, read before post-LN
    expected_u32 = {
        "clip.vision.block_count": s.vision_layers,
        "clip.vision.image_size": s.image_size,
        "clip.vision.patch_size": s.patch_size,
        "clip.vision.embedding_length": s.vision_hidden_size,
        "clip.vision.feed_forward_length": s.vision_intermediate_size,
        "clip.vision.projection_dim": s.hidden_size,
        "clip.vision.attention.head_count": s.vision_heads,
        "general.file_type": 1,
        "imp.image_token_count": s.n_image_tokens,
    }
    for key, value in expected_u32.items():
        assert kv_types(r, key) == [U32], key
        assert kv(r, key) == value, key
    assert kv_types(r, "clip.vision.attention.layer_norm_epsilon") == [F32V]
    assert kv(r, "clip.vision.attention.layer_norm_epsilon") == pytest.approx(1e-6, rel=1e-6)
    for key in ("clip.vision.image_mean", "clip.vision.image_std"):
        assert kv_types(r, key) == [ARR, F32V], key
        assert kv(r, key) == [0.5, 0.5, 0.5], key
    assert kv(r, "imp.image_aspect_ratio") == "square"


@pytest.mark.parametrize("layout", ["new", "old"])
def test_mmproj_gguf_tensors(converted, checkpoint, layout):
    _, mmproj = converted(layout)
    got = tensors(GGUFReader(mmproj))
    vmap = vision_map(TINY.vision_layers)
    assert sorted(got) == sorted(vmap)  # none missing, none extra
    assert not [n for n in got if n.startswith("v.post_ln")]  # llama.cpp would apply it; Imp does not
    assert "mm.1.weight" not in got and "mm.3.weight" not in got  # mm.3 changes the projector type
    assert planned_tensors(TINY, "new")[VP + "post_layernorm.weight"]  # ... though the checkpoint has one
    for name, t in got.items():
        assert np_shape(t) == PLANNED[vmap[name]], name
        if name == "v.position_embd.weight":
            continue  # its type: test_mmproj_position_embedding_is_f32
        assert t.tensor_type == (QT.F16 if len(np_shape(t)) >= 2 else QT.F32), name
    assert got["v.patch_embd.weight"].tensor_type == QT.F16  # ggml's im2col wants an F16 kernel
    ck = read_checkpoint(checkpoint("new"))  # the old layout holds the same vision weights
    for g, h in vmap.items():
        np.testing.assert_array_equal(values(got[g]), ck[h], err_msg=g)


@pytest.mark.parametrize("mmproj_type", ["F16", "Q8_0"])
def test_mmproj_position_embedding_is_f32(converted, mmproj_type):
    _, mmproj = converted("new", mmproj_type=mmproj_type)
    assert tensors(GGUFReader(mmproj))["v.position_embd.weight"].tensor_type == QT.F32


def test_aspect_pad_is_recorded(converted):
    text, mmproj = converted("old", aspect="pad")
    for path in (text, mmproj):
        assert kv(GGUFReader(path), "imp.image_aspect_ratio") == "pad"


# =============================================================================================
# 2. layouts and dtypes
# =============================================================================================
def test_layouts_give_identical_tensors(converted):
    """Same seed, two key layouts: the fused Wqkv split must reproduce q, k, v exactly."""
    a, b = GGUFReader(converted("new")[0]), GGUFReader(converted("old")[0])
    ta, tb = tensors(a), tensors(b)
    assert list(ta) == list(tb)
    for name in ta:
        assert ta[name].tensor_type == tb[name].tensor_type, name
        assert ta[name].data.tobytes() == tb[name].data.tobytes(), name
    assert metadata(a) == metadata(b)  # phi-msft config names (n_embd, n_inner, rotary_dim...) too
    assert kv(a, "imp.checkpoint_layout") == "hf-phi" and kv(b, "imp.checkpoint_layout") == "phi-msft"
    ma, mb = tensors(GGUFReader(converted("new")[1])), tensors(GGUFReader(converted("old")[1]))
    assert all(ma[n].data.tobytes() == mb[n].data.tobytes() for n in ma) and list(ma) == list(mb)


@pytest.mark.parametrize("layout", ["new", "old"])
def test_bf16_checkpoint_converts_exactly(converted, checkpoint, layout):
    """bf16 weights are widened exactly, then stored like f16 ones (matrices F16, vectors F32)."""
    text, mmproj = converted(layout, "bfloat16")
    ck = read_checkpoint(checkpoint("new", "bfloat16"))  # same weights under new-layout names
    got = tensors(GGUFReader(text))
    for g, h in full_text_map(TINY.num_layers).items():
        t = got[g]
        want = ck[h].astype(np.float16 if t.tensor_type == QT.F16 else np.float32).astype(np.float32)
        np.testing.assert_array_equal(values(t), want, err_msg=g)
    # ... and agrees with the f16 checkpoint of the same seed to bf16 precision (2^-8 relative).
    f16 = tensors(GGUFReader(converted(layout, "float16")[0]))
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "token_embd.weight"):
        np.testing.assert_allclose(values(got[name]), values(f16[name]), rtol=2**-7, atol=1e-6)
    vis = tensors(GGUFReader(mmproj))
    for g, h in vision_map(TINY.vision_layers).items():
        want = ck[h].astype(np.float16 if vis[g].tensor_type == QT.F16 else np.float32).astype(np.float32)
        np.testing.assert_array_equal(values(vis[g]), want, err_msg=g)


# =============================================================================================
# 3. configs without the language-model sizes
# =============================================================================================
# Phi-2-shaped but small: 32 heads and rotary factor 0.4 ARE the Phi-2 defaults the converter
# falls back to, so the file must equal the one from the full config.
PHI2_LIKE = Sizes(hidden_size=320, num_layers=2, num_heads=32, intermediate_size=200,
                  partial_rotary_factor=0.4, vocab_rows=1088, vision_hidden_size=64,
                  vision_intermediate_size=136, vision_heads=4, vision_layers=2, image_size=56,
                  patch_size=14)


@pytest.mark.parametrize("layout", ["new", "old"])
def test_config_without_lm_sizes_takes_them_from_tensors(tmp_path, layout):
    from convert.pipeline import convert

    full = make_checkpoint(tmp_path / "full", layout=layout, sizes=PHI2_LIKE)
    bare = make_checkpoint(tmp_path / "bare", layout=layout, sizes=PHI2_LIKE, drop_lm_sizes_from_config=True)
    cfg = json.loads((bare / "config.json").read_text())
    assert not {"hidden_size", "n_embd", "num_attention_heads", "n_head", "intermediate_size"} & set(cfg)
    a = GGUFReader(convert(str(full), tmp_path / "a", quant="F16").text_path)
    b = GGUFReader(convert(str(bare), tmp_path / "b", quant="F16").text_path)
    assert kv(b, "phi2.embedding_length") == 320
    assert kv(b, "phi2.feed_forward_length") == 200  # from fc1's shape, not 4 x hidden
    assert kv(b, "phi2.block_count") == 2
    assert kv(b, "phi2.attention.head_count") == 32
    assert kv(b, "phi2.rope.dimension_count") == 4  # int(10 x 0.4)
    assert len(kv(b, "tokenizer.ggml.tokens")) == 1088  # rows from the embedding
    assert metadata(a) == metadata(b)
    ta, tb = tensors(a), tensors(b)
    assert all(ta[n].data.tobytes() == tb[n].data.tobytes() for n in ta) and list(ta) == list(tb)


@pytest.mark.parametrize("layout", ["new", "old"])
def test_config_without_lm_sizes_inconsistent_defaults_fail_cleanly(imp_bin, tmp_path, layout):
    """TINY has 4 heads, but a config without sizes means Phi-2's 32 (as Imp's own config class
    would assume): 64 / 32 = head size 2, rotary int(2 x 0.4) = 0. No tensor shape can tell the
    head count, so the converter must refuse with one line rather than write a model that is not
    the checkpoint's (DESIGN: fall back to Phi-2's and check them)."""
    ck = make_checkpoint(tmp_path / "ck", layout=layout, drop_lm_sizes_from_config=True)
    out = tmp_path / "out"
    r = run_imp("convert", str(ck), "--out", str(out), "--quant", "F16", env=clean_env(tmp_path))
    assert_one_line_error(r, "head")
    assert listing(out) == []


# =============================================================================================
# 4. quantized outputs
# =============================================================================================
QUANTIZED = {QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K,
             QT.Q6_K, QT.IQ4_NL}
# K-quants need rows that are multiples of 256: TINY's 64 falls back to Q5_0/Q8_0 in llama.cpp;
# this one lets Q4_K_M really use Q4_K/Q6_K.
K_FRIENDLY = Sizes(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=512,
                   partial_rotary_factor=0.5, vocab_rows=1088, vision_hidden_size=64,
                   vision_intermediate_size=136, vision_heads=4, vision_layers=2, image_size=56,
                   patch_size=14)


@pytest.mark.parametrize("quant,ftype", [("Q8_0", 7), ("Q4_K_M", 15)])
def test_quantized_text(tmp_path, checkpoint, quant, ftype):
    from convert.pipeline import convert

    out = tmp_path / "out"
    r = convert(str(checkpoint("new")), out, quant=quant, mmproj_type="F16", threads=2)
    assert listing(out) == sorted([Path(r.text_path).name, Path(r.mmproj_path).name])  # no F16 leftover
    assert Path(r.text_path).name == f"{checkpoint('new').name}-{quant}.gguf"
    g = GGUFReader(r.text_path)
    assert kv(g, "general.file_type") == ftype
    assert kv_types(g, "general.file_type") == [U32]
    got, want = tensors(g), expected_text_shapes()
    assert sorted(got) == sorted(want)
    for name, t in got.items():
        assert np_shape(t) == want[name], name
        if len(want[name]) == 1:
            assert t.tensor_type == QT.F32, name
        else:
            assert t.tensor_type in QUANTIZED, (name, t.tensor_type.name)
            if quant == "Q8_0":
                assert t.tensor_type == QT.Q8_0, name  # every TINY width is a multiple of 32
    assert kv(g, "phi2.feed_forward_length") == TINY.intermediate_size
    assert len(kv(g, "tokenizer.ggml.tokens")) == TINY.vocab_rows


def test_q4_k_m_uses_k_quants_where_rows_allow(tmp_path):
    from convert.pipeline import convert

    ck = make_checkpoint(tmp_path / "ck", sizes=K_FRIENDLY)
    r = convert(str(ck), tmp_path / "out", quant="Q4_K_M", threads=2)
    types = {t.name: t.tensor_type for t in GGUFReader(r.text_path).tensors if len(t.shape) == 2}
    assert set(types.values()) <= {QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0}, types
    assert list(types.values()).count(QT.Q4_K) >= len(types) // 2, types
    assert listing(tmp_path / "out") == sorted([Path(r.text_path).name, Path(r.mmproj_path).name])


def test_q8_0_mmproj_types(converted):
    _, mmproj = converted("new", mmproj_type="Q8_0")
    r = GGUFReader(mmproj)
    assert mmproj.name.endswith("-mmproj-Q8_0.gguf")
    assert kv(r, "general.file_type") == 7
    got, vmap = tensors(r), vision_map(TINY.vision_layers)
    assert sorted(got) == sorted(vmap)
    for name, t in got.items():
        shape = np_shape(t)
        assert shape == PLANNED[vmap[name]], name
        if name in ("v.patch_embd.weight", "v.position_embd.weight"):
            continue
        if len(shape) == 1:
            assert t.tensor_type == QT.F32, name
        elif shape[-1] % 32:
            assert t.tensor_type == QT.F16, name  # e.g. the 136-wide ffn_down: no whole Q8_0 blocks
        else:
            assert t.tensor_type == QT.Q8_0, name
    assert got["v.blk.0.ffn_down.weight"].tensor_type == QT.F16
    assert got["v.blk.0.ffn_up.weight"].tensor_type == QT.Q8_0
    assert got["mm.0.weight"].tensor_type == QT.Q8_0
    assert got["v.patch_embd.weight"].tensor_type == QT.F16


def _first_step(text: Path, mmproj: Path, image_path: Path, question: str, n_generate: int = 0):
    """First-answer-token logits of llama.cpp for (prompt + image), and optionally a greedy answer."""
    from imp_cli.engine import Engine, Sampling
    from imp_cli.images import load_image
    from imp_cli.modelfiles import read_pair
    from imp_cli.session import make_prompt, stage_image

    pair = read_pair(Path(text), Path(mmproj))
    with Engine(pair, n_ctx=256, threads=2) as eng:
        staged = stage_image(pair, load_image(str(image_path)))
        prompt = make_prompt(eng, staged, question)
        emb = eng.encode_image(staged.pixels, staged.key)
        eng.evaluate([prompt.head, emb, prompt.tail])
        logits = eng.last_logits()
        answer = "".join(eng.generate(Sampling(), n_generate)) if n_generate else ""
        generated = eng.timings.generated_tokens if n_generate else 0
        return logits, emb.data.copy(), answer, generated


# Measured on TINY (seeds 0-2, both layouts, two questions, this photo): max |Q8_0 - F16| over the
# plain-token logits = 0.038-0.058 x their std with a Q8_0 text model, 0.013-0.016 with only the
# mmproj in Q8_0, 0.040-0.050 with both (DESIGN predicts ~5e-2 for Q8_0). 0.15 leaves 2.5x headroom
# for other CPUs' kernels, yet a wrongly quantized or mis-assembled tensor moves the logits by
# O(1) x std (for scale: TINY in Q4_K_M, whose rows fall back to Q5_0, is at 0.21). The std is
# taken over factory.predictable_ids(): padding/<image> rows carry a -10 bias that inflates it.
Q8_TOLERANCE = 0.15


def test_q8_0_close_to_f16_in_llama_cpp(converted, photo):
    question = "What is in the image?"
    f16_text, f16_proj = converted("new")
    q8_text, q8_proj = converted("new", quant="Q8_0", mmproj_type="Q8_0")
    ids = predictable_ids()
    ref, ref_emb, _, _ = _first_step(f16_text, f16_proj, photo, question)
    std = ref[ids].std()
    for text, proj in ((q8_text, f16_proj), (f16_text, q8_proj), (q8_text, q8_proj)):
        logits, emb, _, _ = _first_step(text, proj, photo, question)
        assert logits.shape == ref.shape and np.isfinite(logits).all()
        diff = np.abs(logits[ids] - ref[ids]).max() / std
        assert diff < Q8_TOLERANCE, (text.name, proj.name, diff)
        assert diff > 1e-4, (text.name, proj.name, "identical to F16: not quantized?")
    assert ref_emb.shape == (TINY.n_image_tokens, TINY.hidden_size)


def test_q4_k_m_loads_and_generates(converted, photo, tmp_path):
    from convert.pipeline import convert

    text, proj = converted("new", quant="Q4_K_M")
    logits, _, _, generated = _first_step(text, proj, photo, "What is in the image?", n_generate=6)
    assert np.isfinite(logits).all() and generated >= 1
    # And with real K-quant tensors (rows of 256).
    r = convert(str(make_checkpoint(tmp_path / "k", sizes=K_FRIENDLY)), tmp_path / "o", quant="Q4_K_M", threads=2)
    logits, _, _, generated = _first_step(Path(r.text_path), Path(r.mmproj_path), photo, "What is this?", n_generate=6)
    assert logits.shape == (K_FRIENDLY.vocab_rows,) and np.isfinite(logits).all() and generated >= 1


# Q4_K_M against F16 (the same mmproj), teacher-forced along the F16 greedy answer for 24 steps.
# Measured on TINY (rows of 64: llama.cpp falls back to Q5_0/Q8_0) and K_FRIENDLY (real Q4_K/Q6_K),
# seeds 0-3, two questions: max |Q4_K_M - F16| over the logits = 0.21-0.36 x their std; the
# argmax agrees at 83-96% of the steps on TINY, 67-88% on K_FRIENDLY (random weights have many
# near-ties). Held to: logits within 0.5 x std at every step, agreement >= 60%, and every
# disagreement a near-tie (F16's lead of its choice over Q4_K_M's below twice that step's
# difference). A wrongly quantized or mis-assembled tensor moves logits by O(1) x std and
# agreement to chance (~0).
Q4_TOLERANCE = 0.5
Q4_AGREEMENT = 0.6


def _teacher_forced(text: Path, mmproj: Path, image_path: Path, question: str, forced: list[int] | None,
                    n: int = 24) -> tuple[np.ndarray, list[int]]:
    """Logits at each of n steps: after the prompt and `forced`[:i] (or the greedy ids so far)."""
    from imp_cli.engine import Engine
    from imp_cli.images import load_image
    from imp_cli.modelfiles import read_pair
    from imp_cli.session import make_prompt, stage_image

    pair = read_pair(Path(text), Path(mmproj))
    with Engine(pair, n_ctx=256, threads=2) as eng:
        staged = stage_image(pair, load_image(str(image_path)))
        prompt = make_prompt(eng, staged, question)
        emb = eng.encode_image(staged.pixels, staged.key)
        rows, ids = [], []
        for i in range(n):
            eng.evaluate([prompt.head, emb, prompt.tail + (forced[:i] if forced is not None else ids)])
            rows.append(eng.last_logits())
            ids.append(int(np.argmax(rows[-1])))
        return np.array(rows), ids


@pytest.mark.parametrize("sizes", ["TINY", "K_FRIENDLY"])
def test_q4_k_m_close_to_f16_and_greedy_agrees(converted, photo, tmp_path, sizes):
    from convert.pipeline import convert

    if sizes == "TINY":
        (f16_text, proj), (q4_text, _) = converted("new"), converted("new", quant="Q4_K_M")
        live = predictable_ids()
    else:
        ck = make_checkpoint(tmp_path / "k", sizes=K_FRIENDLY)
        f16 = convert(str(ck), tmp_path / "f16", quant="F16", threads=2)
        q4 = convert(str(ck), tmp_path / "q4", quant="Q4_K_M", threads=2)
        f16_text, proj, q4_text = Path(f16.text_path), Path(f16.mmproj_path), Path(q4.text_path)
        live = np.arange(K_FRIENDLY.vocab_rows)
    ref, greedy = _teacher_forced(f16_text, proj, photo, "What is in the image?", None)
    got, _ = _teacher_forced(q4_text, proj, photo, "What is in the image?", greedy)
    ref, got = ref[:, live], got[:, live]
    diff = np.abs(got - ref).max(axis=1) / ref.std(axis=1)
    assert diff.max() < Q4_TOLERANCE, diff.round(3)
    assert diff.min() > 1e-3  # quantized indeed
    same = ref.argmax(axis=1) == got.argmax(axis=1)
    assert same.mean() >= Q4_AGREEMENT, same
    for step in np.flatnonzero(~same):
        lead = ref[step].max() - ref[step, got[step].argmax()]
        assert lead < 2 * diff[step] * ref[step].std(), (step, lead, diff[step])


# =============================================================================================
# 5. bad inputs, through the real CLI
# =============================================================================================
def _not_a_checkpoint(d: Path):
    d.mkdir()
    (d / "README.md").write_text("hello\n")
    return d, ["config.json"]


def _non_imp(d: Path):
    make_checkpoint(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="phi", architectures=["PhiForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    return d, ["not an Imp checkpoint", "phi"]


def _bad_json_config(d: Path):
    make_checkpoint(d)
    (d / "config.json").write_text("{ not json")
    return d, ["config.json", "JSON"]


def _missing_shard(d: Path):
    make_checkpoint(d)
    (d / "model-00002-of-00002.safetensors").unlink()
    return d, ["missing shard", "model-00002-of-00002.safetensors"]


def _truncated_shard(d: Path):
    make_checkpoint(d)
    shard = d / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return d, ["truncated", "model-00001-of-00002.safetensors"]


def _missing_tensor(name: str):
    def build(d: Path):
        make_checkpoint(d)
        rewrite_shard(d, drop=name)
        return d, ["missing", name]
    return build


def _config_lies(key: str, value: int, actual: int):
    def build(d: Path):
        make_checkpoint(d)
        cfg = json.loads((d / "config.json").read_text())
        cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
        return d, [key, str(value), str(actual)]
    return build


def _tensor_wrong_shape(d: Path):
    make_checkpoint(d)
    name = "model.layers.1.mlp.fc2.weight"
    shape = PLANNED[name]
    rewrite_shard(d, replace={name: np.zeros(shape[::-1], dtype=np.float16)})
    return d, [name, "shape"]


def _no_tokenizer(d: Path):
    make_checkpoint(d)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (d / name).unlink()
    return d, ["tokenizer.json", "vocab.json + merges.txt"]


def _nonexistent(d: Path):
    return d / "no" / "such" / "folder", ["no such folder"]


BAD_INPUTS = {
    "not-a-checkpoint": _not_a_checkpoint,
    "non-imp-config": _non_imp,
    "config-not-json": _bad_json_config,
    "missing-shard": _missing_shard,
    "truncated-shard": _truncated_shard,
    "missing-lm-tensor": _missing_tensor("model.layers.1.mlp.fc2.bias"),
    "missing-vision-tensor": _missing_tensor(VP + "encoder.layers.1.layer_norm2.bias"),
    "missing-projector-tensor": _missing_tensor("model.mm_projector.2.bias"),
    "missing-lm-head": _missing_tensor("lm_head.weight"),
    "config-hidden-size-lies": _config_lies("hidden_size", 128, 64),
    "config-intermediate-size-lies": _config_lies("intermediate_size", 256, 160),
    "config-layer-count-lies": _config_lies("num_hidden_layers", 3, 2),
    "tensor-wrong-shape": _tensor_wrong_shape,
    "no-tokenizer-files": _no_tokenizer,
    "nonexistent-source": _nonexistent,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_error(imp_bin, tmp_path, case):
    source, words = BAD_INPUTS[case](tmp_path / "ck")
    out = tmp_path / "out"
    r = run_imp("convert", str(source), "--out", str(out), "--quant", "Q8_0", cwd=tmp_path, env=clean_env(tmp_path))
    assert_one_line_error(r, *words)
    assert listing(out) == []


@pytest.mark.parametrize("sharded", [False, True])
def test_bin_only_checkpoint_is_refused_without_unpickling(imp_bin, tmp_path, sharded):
    ck = make_bin_only_checkpoint(tmp_path / "ck", sharded=sharded)
    out = tmp_path / "out"
    r = run_imp("convert", str(ck), "--out", str(out), cwd=tmp_path, env=clean_env(tmp_path))
    assert not (ck / BIN_CANARY).exists(), "a pickled .bin was unpickled"
    assert_one_line_error(r, ".bin", "safetensors")
    assert listing(out) == []


def test_output_parent_is_a_file(imp_bin, checkpoint, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder\n")
    r = run_imp("convert", str(checkpoint("new")), "--out", str(blocker / "sub"), "--quant", "F16", env=clean_env(tmp_path))
    assert_one_line_error(r, str(blocker / "sub"))
    assert blocker.read_text() == "not a folder\n"
    assert listing(tmp_path) == ["file.txt"]
    # --out naming an existing regular file
    r = run_imp("convert", str(checkpoint("new")), "--out", str(blocker), "--quant", "F16", env=clean_env(tmp_path))
    assert_one_line_error(r, str(blocker))
    assert blocker.read_text() == "not a folder\n"


def test_existing_output_needs_force(imp_bin, checkpoint, tmp_path):
    ck = checkpoint("new")
    out = tmp_path / "out"
    out.mkdir()
    text, mmproj = out / f"{ck.name}-F16.gguf", out / f"{ck.name}-mmproj-F16.gguf"
    text.write_bytes(b"an older file\n")
    r = run_imp("convert", str(ck), "--out", str(out), "--quant", "F16", env=clean_env(tmp_path))
    assert_one_line_error(r, "already exists", "--force")
    assert text.read_bytes() == b"an older file\n"
    assert listing(out) == [text.name]
    # only the mmproj exists: refused as well
    text.unlink()
    mmproj.write_bytes(b"an older mmproj\n")
    r = run_imp("convert", str(ck), "--out", str(out), "--quant", "F16", env=clean_env(tmp_path))
    assert_one_line_error(r, "already exists", mmproj.name)
    assert mmproj.read_bytes() == b"an older mmproj\n" and listing(out) == [mmproj.name]
    # --force replaces it with a real pair
    text.write_bytes(b"an older file\n")
    r = run_imp("convert", str(ck), "--out", str(out), "--quant", "F16", "--force", env=clean_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert listing(out) == sorted([text.name, mmproj.name])
    assert kv(GGUFReader(text), "general.architecture") == "phi2"
    assert kv(GGUFReader(mmproj), "general.architecture") == "clip"


def test_output_path_that_is_a_folder(imp_bin, checkpoint, tmp_path):
    ck = checkpoint("new")
    out = tmp_path / "out"
    (out / f"{ck.name}-F16.gguf").mkdir(parents=True)
    r = run_imp("convert", str(ck), "--out", str(out), "--quant", "F16", "--force", env=clean_env(tmp_path))
    assert listing(out) == [f"{ck.name}-F16.gguf"], "a half pair was committed"
    assert_one_line_error(r, f"{ck.name}-F16.gguf")


@pytest.mark.parametrize("option,value,choices", [
    ("--quant", "Q5_K_S", ["Q4_K_M", "Q8_0", "F16"]),
    ("--quant", "Q5", ["Q4_K_M", "Q8_0", "F16"]),
    ("--mmproj-type", "Q4_0", ["F16", "Q8_0"]),
])
def test_unknown_type_is_a_usage_error(imp_bin, checkpoint, tmp_path, option, value, choices):
    """Refused by the option parser (exit 2), naming the value and every choice."""
    out = tmp_path / "out"
    r = run_imp("convert", str(checkpoint("new")), "--out", str(out), option, value, env=clean_env(tmp_path))
    # the parser matches case-insensitively and lists the choices as the README writes them
    assert_usage_error(r, value, *choices)
    assert listing(out) == []


def test_usage_errors_exit_2(imp_bin, tmp_path):
    assert_usage_error(run_imp("convert", env=clean_env(tmp_path)), "SOURCE")
    assert_usage_error(run_imp("convert", str(tmp_path), "--no-such-option", env=clean_env(tmp_path)),
                       "--no-such-option")


# =============================================================================================
# 6. atomicity
# =============================================================================================
def _fail_at(monkeypatch, n: int):
    """Make the n-th tensor encode (across both files) raise."""
    from convert import gguf_out

    real = gguf_out.TensorSpec.encode
    calls = {"n": 0}

    def encode(self):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("disk on fire")
        return real(self)

    monkeypatch.setattr(gguf_out.TensorSpec, "encode", encode)
    return calls


N_MMPROJ_TENSORS = len(vision_map(TINY.vision_layers))  # written first


@pytest.mark.parametrize("quant", ["F16", "Q8_0"])
@pytest.mark.parametrize("where", ["mmproj", "text"])
def test_failure_while_writing_leaves_nothing(monkeypatch, checkpoint, tmp_path, quant, where):
    from convert.pipeline import convert

    n = N_MMPROJ_TENSORS // 2 if where == "mmproj" else N_MMPROJ_TENSORS + 10
    calls = _fail_at(monkeypatch, n)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert(str(checkpoint("new")), out, quant=quant, threads=2)
    assert calls["n"] == n
    assert listing(out) == []  # no *.gguf, no hidden .partial / .f16 leftovers


def test_failed_quantization_leaves_nothing(monkeypatch, checkpoint, tmp_path):
    from convert import pipeline
    from convert.errors import ConvertError

    seen = {}

    def broken(src, dst, quant, threads, on_fraction=lambda f: None, verbose=False):
        seen["src_exists"] = Path(src).stat().st_size > 0
        Path(dst).write_bytes(b"half a file")
        raise ConvertError("quantization to Q8_0 failed inside llama.cpp (code 1)")

    monkeypatch.setattr(pipeline, "quantize_text", broken)
    out = tmp_path / "out"
    with pytest.raises(ConvertError):
        pipeline.convert(str(checkpoint("new")), out, quant="Q8_0")
    assert seen["src_exists"]
    assert listing(out) == []


def test_failure_with_force_keeps_the_old_pair(monkeypatch, checkpoint, tmp_path):
    from convert.pipeline import convert

    out = tmp_path / "out"
    r = convert(str(checkpoint("new")), out, quant="F16")
    before = {p: Path(p).read_bytes() for p in (r.text_path, r.mmproj_path)}
    _fail_at(monkeypatch, N_MMPROJ_TENSORS + 5)
    with pytest.raises(RuntimeError):
        convert(str(checkpoint("old")), out, quant="F16", force=True, name=checkpoint("new").name)
    assert {p: Path(p).read_bytes() for p in before} == before
    assert listing(out) == sorted(Path(p).name for p in before)


# Big enough that writing the text model takes a good fraction of a second (~105 MB of F16).
BIG = Sizes(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1536,
            partial_rotary_factor=0.5, vocab_rows=32768, vision_hidden_size=64,
            vision_intermediate_size=136, vision_heads=4, vision_layers=2, image_size=56,
            patch_size=14)


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("big") / "big", sizes=BIG)


@pytest.mark.parametrize("quant,wait_for", [
    ("F16", ".big-F16.gguf.partial-*"),        # while the text GGUF is being written
    ("Q8_0", ".big-Q8_0.gguf.partial-*"),      # while llama.cpp quantizes (in a worker thread)
])
def test_ctrl_c_leaves_nothing(imp_bin, big_checkpoint, tmp_path, quant, wait_for):
    out = tmp_path / "out"
    out.mkdir()
    proc = start_imp("convert", big_checkpoint, "--out", out, "--quant", quant, env=clean_env(tmp_path))
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob(wait_for)):
            assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
            assert time.monotonic() < deadline, "no partial file appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in stderr, stderr
    assert stdout == ""
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert listing(out) == []


# =============================================================================================
# 7. Hugging Face repo ids, offline
# =============================================================================================
REPO = "MILVLG/imp-tiny-test"
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # refs/main
OTHER = "fedcba9876543210fedcba9876543210fedcba98"  # another revision: aspect "pad", seed 1


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory) -> Path:
    """A hub cache holding REPO at COMMIT (refs/main) and at OTHER, laid out as huggingface_hub
    does (plain file copies in snapshots/, no blobs or tree listing needed offline)."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / ("models--" + REPO.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)  # no newline, as huggingface_hub writes it
    make_checkpoint(repo / "snapshots" / COMMIT)
    make_checkpoint(repo / "snapshots" / OTHER, aspect="pad", seed=1)
    return cache


def test_snapshot_download_offline_with_patterns(tiny_hub, tmp_path):
    """This huggingface_hub resolves refs/main -> snapshots/<commit> offline, allow_patterns and all;
    no blobs or tree listing needed."""
    code = (
        "import json, sys\n"
        "from huggingface_hub import snapshot_download\n"
        "from convert.checkpoint import NEEDED_FILES\n"
        f"a = snapshot_download({REPO!r}, allow_patterns=NEEDED_FILES)\n"
        f"b = snapshot_download({REPO!r}, revision={COMMIT!r}, allow_patterns=NEEDED_FILES)\n"
        "print(json.dumps([a, b]))\n"
    )
    r = assert_ok(run_python(code, env=clean_env(tmp_path, hub=tiny_hub), cwd=Path(__file__).parent.parent))
    snap = tiny_hub / ("models--" + REPO.replace("/", "--")) / "snapshots" / COMMIT
    assert [Path(p).resolve() for p in json.loads(r.stdout)] == [snap.resolve()] * 2


@pytest.mark.parametrize("source,aspect", [(REPO, "square"), (f"{REPO}@{COMMIT}", "square"),
                                           (f"{REPO}@main", "square"), (f"{REPO}@{OTHER}", "pad")])
def test_convert_repo_id_offline(imp_bin, tiny_hub, tmp_path, source, aspect):
    out = tmp_path / "out"
    r = run_imp("convert", source, "--out", str(out), "--quant", "F16", "--json",
                env=clean_env(tmp_path, hub=tiny_hub), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert listing(out) == ["imp-tiny-test-F16.gguf", "imp-tiny-test-mmproj-F16.gguf"]
    result = json.loads(r.stdout)
    commit = OTHER if source.endswith(OTHER) else COMMIT  # main and no revision: refs/main
    assert result["source"] == f"{REPO}@{commit}"  # the repo id and the commit it resolved to
    g = GGUFReader(out / "imp-tiny-test-F16.gguf")
    assert kv(g, "imp.source") == f"{REPO}@{commit}"
    assert kv(g, "imp.image_aspect_ratio") == aspect  # the revision asked for, not refs/main
    assert kv(g, "phi2.embedding_length") == TINY.hidden_size


@pytest.mark.parametrize("source", ["MILVLG/not-in-cache", f"{REPO}@v9.9"])
def test_repo_id_not_in_cache_offline(imp_bin, tiny_hub, tmp_path, source):
    out = tmp_path / "out"
    r = run_imp("convert", source, "--out", str(out), env=clean_env(tmp_path, hub=tiny_hub), cwd=tmp_path)
    line = assert_one_line_error(r, source.split("@")[0], "cache")
    assert "offline" in line.lower() or "HF_HUB_OFFLINE" in line
    assert listing(out) == []


def test_incomplete_cached_snapshot_offline(imp_bin, tiny_hub, tmp_path):
    """A cached tree listing naming a shard absent from the snapshot (an interrupted download)."""
    cache = tmp_path / "hub"
    shutil.copytree(tiny_hub, cache)
    repo = cache / ("models--" + REPO.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    files = {p.name: {"size": p.stat().st_size, "blob_id": f"{i:040x}"} for i, p in enumerate(sorted(snap.iterdir()))}
    (repo / "trees").mkdir()
    (repo / "trees" / f"{COMMIT}.json").write_text(json.dumps({"format_version": 1, "files": files}))
    (snap / "model-00002-of-00002.safetensors").unlink()
    out = tmp_path / "out"
    r = run_imp("convert", REPO, "--out", str(out), env=clean_env(tmp_path, hub=cache), cwd=tmp_path)
    assert_one_line_error(r, REPO)
    assert listing(out) == []


# =============================================================================================
# 8. stdout / stderr
# =============================================================================================
def test_json_summary(imp_bin, checkpoint, tmp_path):
    out = tmp_path / "out"
    r = run_imp("convert", str(checkpoint("new")), "--out", str(out), "--quant", "Q8_0",
                "--mmproj-type", "Q8_0", "--json", env=clean_env(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    result = json.loads(lines[0])
    assert isinstance(result, dict)
    assert result["quant"] == "Q8_0" and result["mmproj_type"] == "Q8_0"
    for kind in ("text", "mmproj"):
        path = Path(result[kind])
        assert path.parent.resolve() == out.resolve() and path.is_file()
        assert result[f"{kind}_bytes"] == path.stat().st_size
    assert result["family"] == "phi2" and result["layout"] == "hf-phi"
    assert result["image_tokens"] == TINY.n_image_tokens
    assert len(r.stderr.splitlines()) >= 2  # the progress lines: on stderr only
    assert "Traceback" not in r.stderr


def test_plain_summary(imp_bin, checkpoint, tmp_path):
    out = tmp_path / "out"
    r = run_imp("convert", str(checkpoint("old")), "--out", str(out), "--quant", "F16", env=clean_env(tmp_path))
    assert r.returncode == 0, r.stderr
    ck = checkpoint("old").name
    text, mmproj = out / f"{ck}-F16.gguf", out / f"{ck}-mmproj-F16.gguf"
    lines = r.stdout.splitlines()
    assert len(lines) == 2, r.stdout
    assert lines[0].split("\t")[0] == str(text) and lines[1].split("\t")[0] == str(mmproj)
    assert "F16" in lines[0] and "F16" in lines[1]
    assert listing(out) == sorted([text.name, mmproj.name])
    assert len(r.stderr.splitlines()) >= 2  # the progress lines: on stderr only
    assert "\x1b[" not in r.stderr + r.stdout  # no colour/cursor codes on a pipe
