"""Self-tests of the checkpoint factory and the transformers oracle (no product code involved)."""

from __future__ import annotations

import json
import math
import pickle
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from tokenizers import Tokenizer

import factory as F
from oracle import Oracle

QUESTION = "What is in the image?"


def _image(seed: int = 0, size=(90, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _scale(logits: np.ndarray) -> float:
    return float(logits[F.predictable_ids()].std())


def test_tiny_is_fast_and_deterministic(tmp_path):
    F.make_checkpoint(tmp_path / "warm")  # the tokenizer is trained once per process
    t = time.perf_counter()
    a = F.make_checkpoint(tmp_path / "a", layout="old", dtype="bfloat16", seed=3)
    elapsed = time.perf_counter() - t
    b = F.make_checkpoint(tmp_path / "b", layout="old", dtype="bfloat16", seed=3)
    c = F.make_checkpoint(tmp_path / "c", layout="old", dtype="bfloat16", seed=4)
    assert elapsed < 2.0
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    shard = "model-00001-of-00002.safetensors"
    assert (a / shard).read_bytes() != (c / shard).read_bytes()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_old_layout_holds_the_same_weights(tmp_path, dtype):
    new = Oracle(F.make_checkpoint(tmp_path / "new", layout="new", dtype=dtype))
    old = Oracle(F.make_checkpoint(tmp_path / "old", layout="old", dtype=dtype))
    assert (new.layout, old.layout) == ("new", "old")
    img = _image()
    np.testing.assert_array_equal(new.first_logits(img, QUESTION), old.first_logits(img, QUESTION))


def test_dtypes_differ_only_by_rounding(tmp_path):
    img = _image()
    ref = Oracle(F.make_checkpoint(tmp_path / "f32", dtype="float32")).first_logits(img, QUESTION)
    # Measured: f16 1.8e-3, bf16 1.4e-2 of the std of the live logits.
    for dtype, tol in (("float16", 1e-2), ("bfloat16", 5e-2)):
        got = Oracle(F.make_checkpoint(tmp_path / dtype, dtype=dtype)).first_logits(img, QUESTION)
        assert np.abs(got - ref)[F.predictable_ids()].max() < tol * _scale(ref), dtype


@pytest.mark.parametrize("layout,dtype,n_shards", [("new", "float16", None), ("old", "bfloat16", 3),
                                                   ("new", "float32", 2)])
def test_index_covers_every_tensor(tmp_path, layout, dtype, n_shards):
    ckpt = F.make_checkpoint(tmp_path, layout=layout, dtype=dtype, n_shards=n_shards)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    planned = F.planned_tensors(F.TINY, layout)
    assert set(index["weight_map"]) == set(planned)
    n = n_shards or 2
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert sorted(p.name for p in ckpt.glob("*.safetensors")) == files
    seen, total = set(), 0
    want_dtype = getattr(torch, dtype)
    for name in files:
        with safe_open(str(ckpt / name), framework="pt") as f:
            keys = set(f.keys())
            assert keys == {k for k, v in index["weight_map"].items() if v == name}
            for k in keys:
                t = f.get_tensor(k)
                assert tuple(t.shape) == planned[k] and t.dtype == want_dtype, k
                assert torch.isfinite(t.float()).all(), k
                total += t.numel() * t.element_size()
        seen |= keys
    assert seen == set(planned)
    assert index["metadata"]["total_size"] == total


def test_old_and_new_key_names(tmp_path):
    new, old = F.planned_tensors(F.TINY, "new"), F.planned_tensors(F.TINY, "old")
    vis = "vision_tower.vision_tower.vision_model."
    assert {"model.embed_tokens.weight", "model.layers.1.self_attn.dense.bias", "lm_head.bias",
            "model.final_layernorm.weight", "model.mm_projector.2.weight",
            f"model.{vis}post_layernorm.weight", f"model.{vis}encoder.layers.1.mlp.fc2.bias"} <= set(new)
    assert {"transformer.embd.wte.weight", "transformer.h.1.mixer.out_proj.bias", "lm_head.linear.bias",
            "lm_head.ln.weight", "transformer.mm_projector.2.weight",
            f"transformer.{vis}post_layernorm.weight"} <= set(old)
    assert old["transformer.h.0.mixer.Wqkv.weight"] == (3 * 64, 64)
    assert not any(k.startswith("model.") for k in old)
    assert len(new) - len(old) == 2 * 2 * F.TINY.num_layers  # q,k,v (w+b) fused into Wqkv (w+b)


@pytest.mark.parametrize("layout", ["new", "old"])
def test_config(tmp_path, layout):
    cfg = json.loads((F.make_checkpoint(tmp_path / "a", layout=layout, aspect="pad") / "config.json").read_text())
    assert cfg["model_type"] == "imp" and cfg["architectures"] == ["ImpForCausalLM"]
    assert (cfg["mm_projector_type"], cfg["mm_vision_select_layer"], cfg["mm_vision_select_feature"]) == \
        ("mlp2x_gelu", -2, "patch")
    assert cfg["image_aspect_ratio"] == "pad" and cfg["mm_hidden_size"] == 64
    assert (cfg["eos_token_id"], cfg["image_token_index"]) == (F.EOS_ID, F.IMAGE_ID)
    vt = cfg["vision_tower_config"]
    assert vt["num_hidden_layers"] == F.TINY.vision_layers + 1 and vt["intermediate_size"] == 136
    size_keys = {"new": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                         "partial_rotary_factor", "rope_theta", "layer_norm_eps", "vocab_size",
                         "max_position_embeddings"),
                 "old": ("n_embd", "n_layer", "n_head", "n_inner", "rotary_dim", "layer_norm_epsilon",
                         "vocab_size", "n_positions")}[layout]
    assert all(k in cfg for k in size_keys)
    assert cfg["vocab_size"] == F.TINY.vocab_rows
    dropped = json.loads((F.make_checkpoint(tmp_path / "b", layout=layout, drop_lm_sizes_from_config=True)
                          / "config.json").read_text())
    assert not any(k in dropped for k in size_keys)
    assert dropped["vision_tower_config"] == vt


def test_tokenizer_layout(tmp_path):
    ckpt = F.make_checkpoint(tmp_path)
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    assert tok.get_vocab_size() == F.N_TOKENS == 973
    added = tok.get_added_tokens_decoder()
    assert (added[960].content, added[971].content, added[972].content) == ("<|endoftext|>", "</s>", "<image>")
    assert all(added[i].special for i in (F.ENDOFTEXT_ID, F.EOS_ID, F.IMAGE_ID))
    assert [added[i].content for i in F.WHITESPACE_IDS] == list(F.WHITESPACE_TOKENS)
    assert not any(added[i].special for i in F.WHITESPACE_IDS)
    assert json.loads((ckpt / "vocab.json").read_text())["<|endoftext|>"] == F.ENDOFTEXT_ID
    tc = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert (tc["eos_token"], tc["add_bos_token"]) == ("</s>", False)
    # No BOS, and the specials / whitespace runs come out as single tokens.
    ids = tok.encode("USER: <image>\nhi  there</s>").ids
    assert F.IMAGE_ID in ids and F.EOS_ID in ids and F.WHITESPACE_IDS[6] in ids and ids[0] != F.ENDOFTEXT_ID
    # Embedding rows padded beyond the tokenizer, as in the real model (51200 > 50297).
    rows = F.planned_tensors(F.TINY)["model.embed_tokens.weight"][0]
    assert rows > F.N_TOKENS and rows % 64 == 0


def test_greedy_answer_is_not_degenerate(tmp_path):
    oracle = Oracle(F.make_checkpoint(tmp_path))
    img = _image()
    ids = oracle.greedy(img, QUESTION, 16)
    assert len(ids) == 16 and len(set(ids)) > 4
    assert set(ids) <= set(F.predictable_ids().tolist())
    # The KV-cached greedy loop and one teacher-forced pass agree.
    assert oracle.teacher_forced_top1(img, QUESTION, ids) == ids
    text = oracle.answer_text(img, QUESTION, 16)
    assert text and text == text.strip() and text.isascii()
    # Logits well spread: the first step is no near-tie, and the image matters.
    first = oracle.first_logits(img, QUESTION)
    top2 = np.sort(first[F.predictable_ids()])[-2:]
    assert top2[1] - top2[0] > 0.05 * _scale(first)
    other = oracle.first_logits(_image(seed=1), QUESTION)
    assert np.abs(other - first).max() > 0.2 * _scale(first)


def test_prompt_split_and_no_bos(tmp_path):
    oracle = Oracle(F.make_checkpoint(tmp_path))
    before, after = oracle.prompt_ids("Describe it.")
    tok = oracle.tokenizer
    assert tok.decode(before) == F.SYSTEM_PROMPT + " USER: "
    assert tok.decode(after) == "\nDescribe it. ASSISTANT:"
    assert F.IMAGE_ID not in before + after and before[0] != F.ENDOFTEXT_ID


def test_vision_feature_is_last_kept_layer_before_post_layernorm(tmp_path):
    oracle = Oracle(F.make_checkpoint(tmp_path, dtype="float32"))
    img = _image()
    emb = oracle.image_embeddings(img)
    assert emb.shape == (F.TINY.n_image_tokens, F.TINY.hidden_size)
    params = dict(oracle.vision.named_parameters())  # names differ between transformers 4 and 5
    last = F.TINY.vision_layers - 1
    with torch.no_grad():
        next(p for n, p in params.items() if n.endswith("post_layernorm.weight")).mul_(3.0)
        assert np.array_equal(oracle.image_embeddings(img), emb)
        next(p for n, p in params.items() if n.endswith(f"layers.{last}.mlp.fc2.bias")).add_(1.0)
        assert not np.allclose(oracle.image_embeddings(img), emb)


@pytest.mark.parametrize("aspect", ["square", "pad"])
def test_preprocess(tmp_path, aspect):
    oracle = Oracle(F.make_checkpoint(tmp_path, aspect=aspect))
    red = Image.new("RGB", (112, 56), (255, 0, 0))  # wide: pad adds bands above and below
    x = oracle.preprocess(red)
    assert x.shape == (1, 3, 56, 56) and x.dtype == torch.float32
    grey = (127 / 255 - 0.5) / 0.5
    if aspect == "pad":
        assert torch.allclose(x[0, :, :10, :], torch.tensor([grey, grey, grey]).view(3, 1, 1))
        assert torch.allclose(x[0, :, 24:32, :], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1))
    else:
        assert torch.allclose(x[0], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1))


def test_full_sizes_planned_shapes():
    full = F.planned_tensors(F.FULL, "new")
    vp = "model.vision_tower.vision_tower.vision_model."
    assert full["model.embed_tokens.weight"] == (51200, 2560)
    assert full["lm_head.weight"] == (51200, 2560) and full["lm_head.bias"] == (51200,)
    assert full["model.layers.31.mlp.fc1.weight"] == (10240, 2560)
    assert full["model.layers.31.self_attn.q_proj.weight"] == (2560, 2560)
    assert full[vp + "embeddings.patch_embedding.weight"] == (1152, 3, 14, 14)
    assert full[vp + "embeddings.position_embedding.weight"] == (729, 1152)
    assert full[vp + "encoder.layers.25.mlp.fc2.weight"] == (1152, 4304)
    assert vp + "encoder.layers.26.mlp.fc2.weight" not in full
    assert full["model.mm_projector.0.weight"] == (2560, 1152)
    assert full["model.mm_projector.2.weight"] == (2560, 2560)
    assert len(full) == 1 + 32 * 14 + 2 + 3 + 26 * 16 + 2 + 4 + 2
    params = sum(math.prod(s) for s in full.values())
    assert 3.1e9 < params < 3.3e9  # Phi-2 2.78B + 26 SigLIP layers 0.40B + projector
    assert F.FULL.rotary_dim == 32 and F.FULL.head_dim == 80
    old = F.planned_tensors(F.FULL, "old")
    assert old["transformer.h.0.mixer.Wqkv.weight"] == (7680, 2560)
    assert sum(math.prod(s) for s in old.values()) == params
    f196 = F.planned_tensors(F.FULL_196, "new")
    assert f196[vp + "embeddings.position_embedding.weight"] == (196, 1152)
    assert F.FULL_196.n_image_tokens == 196


def test_bin_only_checkpoint(tmp_path):
    ckpt = F.make_bin_only_checkpoint(tmp_path / "bin")
    assert (ckpt / "pytorch_model.bin").is_file() and (ckpt / "config.json").is_file()
    assert not list(ckpt.glob("*.safetensors"))
    sharded = F.make_bin_only_checkpoint(tmp_path / "sharded", sharded=True)
    assert (sharded / "pytorch_model.bin.index.json").is_file()
    assert len(list(sharded.glob("pytorch_model-*.bin"))) == 2
    # The canary works: unpickling it leaves a marker file.
    assert not (ckpt / F.BIN_CANARY).exists()
    pickle.loads((ckpt / "pytorch_model.bin").read_bytes()).close()
    assert (ckpt / F.BIN_CANARY).exists()
