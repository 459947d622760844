"""The whole Imp family: Imp-v1.5-4B (Phi-3) and Imp-v1.5-2B (Qwen1.5), checked like the 3B.

For each backbone, on tiny checkpoints from the factory (tests/factory.py) against the
transformers oracle (tests/oracle.py) on the same weights:
  1. detection from config.json first, tensor names second;
  2. read-back of the text GGUF (keys with the types llama.cpp reads, vocabulary, token types,
     tensors and their data) and of the mmproj (Qwen's config has no vision_tower_config);
  3. prompt token ids equal Imp's `tokenizer_image_token` with the checkpoint's own
     tokenizer.json, whatever the GGUF is named (llama.cpp keys Phi-3's whitespace stripping after
     special tokens off general.name), one turn and several;
  4. stop tokens: llama.cpp ends generation on every token the reference stops on;
  5. oracle parity (projected image embeddings, first-step logits, teacher-forced top-1, 24 greedy
     tokens) for square and pad;
  6. Q8_0 close to F16, Q4_K_M loads and generates;
  7. `imp ask` prints the oracle's greedy answer, from a path and from the store after `imp pull`
     of the known names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, TokenType

from helpers import assert_ok, assert_one_line_error, clean_env, run_imp
from factory import (
    PHI3_BOS_ID,
    PHI3_EOS_ID,
    PHI3_IDS,
    PHI3_IMAGE_ID,
    PHI3_N_TOKENS,
    QWEN_BOS_ID,
    QWEN_EOS_ID,
    QWEN_IDS,
    QWEN_N_TOKENS,
    SPM_SIZE,
    TINY_FOR,
    planned_tensors,
    predictable_ids,
)
from test_ask import (  # noqa: F401  (_torch_one_thread: the module-wide autouse fixture)
    EMBD_TOL,
    LOGITS_TOL,
    N_TOKENS,
    QUESTION,
    _torch_one_thread,
    ask_ok,
    as_imp_sees_it,
    open_engine,
    rel_diff,
)
from test_convert import (
    kv,
    kv_types,
    np_shape,
    read_checkpoint,
    tensors,
    values,
    vision_map,
)

FAMILIES = ["phi3", "qwen2"]
ASPECTS = ["square", "pad"]
U32, F32V, STR, BOOL, ARR, I32 = (GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING,
                                  GGUFValueType.BOOL, GGUFValueType.ARRAY, GGUFValueType.INT32)
ARCH = {"phi3": "phi3", "qwen2": "qwen2"}
N_TOK = {"phi3": PHI3_N_TOKENS, "qwen2": QWEN_N_TOKENS}
KNOWN = {"phi3": ("imp-v1.5-4b", "MILVLG/Imp-v1.5-4B-Phi3"), "qwen2": ("imp-v1.5-2b", "MILVLG/Imp-v1.5-2B-Qwen1.5")}
# Questions whose tokens depend on the details: spaces and newlines next to special tokens, runs
# of blanks, digits, non-ASCII (multi-byte UTF-8, SentencePiece byte fallback), a literal
# special token typed by the user.
QUESTIONS = [QUESTION, "  What colour is the car?\n", "How many? 12 or 3400", "Qu'est-ce que c'est ? 🐱 café — 日本",
             "Describe <|end|> this\n\nplease <|im_end|>", "\tTabs\tand  double  spaces "]


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def family_ckpt(checkpoint):
    def get(family: str, aspect: str = "square") -> Path:
        return checkpoint("new", "float16", aspect, family=family)
    return get


@pytest.fixture(scope="session")
def family_converted(family_ckpt, tmp_path_factory):
    """(family, aspect, quant, mmproj_type, name) -> (text, mmproj) paths, converted once."""
    from convert.pipeline import convert

    made: dict = {}

    def get(family: str, aspect: str = "square", quant: str = "F16", mmproj_type: str = "F16",
            name: str | None = None) -> tuple[Path, Path]:
        key = (family, aspect, quant, mmproj_type, name)
        if key not in made:
            out = tmp_path_factory.mktemp(f"gguf-{family}")
            r = convert(str(family_ckpt(family, aspect)), out, quant=quant, mmproj_type=mmproj_type, name=name,
                        threads=1)
            assert r.family == family
            made[key] = (Path(r.text_path), Path(r.mmproj_path))
        return made[key]

    return get


@pytest.fixture(scope="session")
def family_oracle(family_ckpt):
    from oracle import Oracle

    made: dict = {}

    def get(family: str, aspect: str = "square"):
        if (family, aspect) not in made:
            made[family, aspect] = Oracle(family_ckpt(family, aspect))
        return made[family, aspect]

    return get


def staged_photo(engine, image_path: Path):
    from imp_cli.images import load_image
    from imp_cli.session import stage_image

    return stage_image(engine.pair, load_image(str(image_path)))


def prompt_ids(engine, staged, question: str = QUESTION, history=(), system: str | None = None):
    """(head ids, tail ids) exactly as `imp ask` builds them (the Session's prompt function)."""
    from imp_cli.session import make_prompt

    prompt = make_prompt(engine, staged, question, history, system)
    return prompt.head, prompt.tail


def encode_photo(engine, staged):
    return engine.encode_image(staged.pixels, staged.key)


def live(family: str, logits: np.ndarray) -> np.ndarray:
    """The rows a trained model can predict (the others have zero lm_head rows in the factory)."""
    return logits[predictable_ids(family)]


# =============================================================================================
# 0. the factory and the oracle themselves
# =============================================================================================
@pytest.mark.parametrize("family", FAMILIES)
def test_factory_is_deterministic(tmp_path, family):
    import factory

    a = factory.make_checkpoint(tmp_path / "a", family=family, seed=3)
    b = factory.make_checkpoint(tmp_path / "b", family=family, seed=3)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_greedy_is_not_degenerate(family_oracle, photo, family):
    oracle = family_oracle(family)
    image = as_imp_sees_it(photo)
    ids = oracle.greedy(image, QUESTION, 16)
    assert len(ids) == 16 and len(set(ids)) > 4
    assert set(ids) <= set(predictable_ids(family).tolist())
    assert oracle.teacher_forced_top1(image, QUESTION, ids) == ids  # cached loop == one pass
    first = live(family, oracle.first_logits(image, QUESTION))
    top2 = np.sort(first)[-2:]
    assert top2[1] - top2[0] > 0.05 * first.std()  # no near-tie at the first step
    other = live(family, oracle.first_logits(image.transpose(0), QUESTION))  # a mirrored image
    assert np.abs(other - first).max() > 0.2 * first.std()  # the image matters


def test_oracle_prompt_split(family_oracle):
    """Phi-3: the first side starts with the one BOS and the chat tokens swallowed the newline
    after them; Qwen2: no BOS, newlines kept."""
    phi3, qwen2 = family_oracle("phi3"), family_oracle("qwen2")
    before, after = phi3.prompt_ids("Describe it.")
    assert before[0] == PHI3_BOS_ID and PHI3_BOS_ID not in before[1:] + after
    assert before[1] == PHI3_IDS["<|system|>"] and before[-2:] == [PHI3_IDS["<|end|>"], PHI3_IDS["<|user|>"]]
    assert after[-2:] == [PHI3_IDS["<|end|>"], PHI3_IDS["<|assistant|>"]]
    before, after = qwen2.prompt_ids("Describe it.")
    assert qwen2.tokenizer.decode(before, skip_special_tokens=False).startswith("<|im_start|>system\n")
    assert qwen2.tokenizer.decode(after, skip_special_tokens=False) == (
        "\nDescribe it.<|im_end|>\n<|im_start|>assistant\n")


def test_full_sizes_planned_shapes():
    from factory import FULL_PHI3, FULL_QWEN2

    phi3 = planned_tensors(FULL_PHI3, "new", "phi3")
    assert phi3["model.layers.31.self_attn.qkv_proj.weight"] == (9216, 3072)
    assert phi3["model.layers.31.mlp.gate_up_proj.weight"] == (16384, 3072)
    assert phi3["lm_head.weight"] == (32064, 3072) and "lm_head.bias" not in phi3
    assert 4.1e9 < sum(np.prod(s) for s in phi3.values()) < 4.3e9  # Phi-3-mini 3.82B + SigLIP 0.40B + projector
    qwen = planned_tensors(FULL_QWEN2, "new", "qwen2")
    assert qwen["model.layers.23.self_attn.k_proj.bias"] == (2048,)
    assert qwen["model.layers.23.mlp.gate_proj.weight"] == (5504, 2048)
    assert qwen["lm_head.weight"] == (151936, 2048)
    assert 2.2e9 < sum(np.prod(s) for s in qwen.values()) < 2.3e9  # Qwen1.5-1.8B 1.84B + SigLIP 0.40B + projector


# =============================================================================================
# 1. detection
# =============================================================================================
def _rename_config(folder: Path, dest: Path, **changes) -> Path:
    import shutil

    shutil.copytree(folder, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(changes)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize("family", FAMILIES)
def test_family_from_tensor_names_when_config_names_none(family_ckpt, tmp_path, family):
    """An Imp config naming no known backbone: the tensor names decide (a Qwen2 checkpoint has
    self_attn.q_proj like the HF Phi-2 layout, which once made it a Phi-2)."""
    from convert.pipeline import convert

    folder = _rename_config(family_ckpt(family), tmp_path / "ck", architectures=["ImpNewForCausalLM"],
                            model_type="imp_new")
    r = convert(str(folder), tmp_path / "out", quant="F16")
    assert r.family == family
    assert kv(GGUFReader(r.text_path), "general.architecture") == ARCH[family]


def test_config_naming_another_family_is_a_clear_error(imp_bin, family_ckpt, tmp_path):
    folder = _rename_config(family_ckpt("qwen2"), tmp_path / "ck", architectures=["ImpForCausalLM"], model_type="imp")
    r = run_imp("convert", str(folder), "--out", str(tmp_path / "out"), "--quant", "F16", env=clean_env(tmp_path))
    assert_one_line_error(r, "phi2", "tensors")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def _edit_json(folder: Path, name: str, edit) -> None:
    path = folder / name
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def _set_added(content: str, **flags):
    def edit(tj):
        next(a for a in tj["added_tokens"] if a["content"] == content).update(flags)
    return edit


def _metaspace_first(tj):
    tj["normalizer"] = None
    tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}


# Checkpoints llama.cpp cannot run as the reference does: refused with one line naming why.
UNREPRODUCIBLE = {
    "lstrip": ("tokenizer.json", _set_added("<|user|>", lstrip=True), ["lstrip"]),
    "rstrip-on-some": ("tokenizer.json", _set_added("<|end|>", rstrip=False), ["rstrip"]),
    "metaspace-first": ("tokenizer.json", _metaspace_first, ["first"]),
    "rope-scaling": ("config.json", lambda c: c.update(rope_scaling={"type": "longrope", "long_factor": [1.0]}),
                     ["rope_scaling"]),
    "eos-list": ("config.json", lambda c: c.update(eos_token_id=[c["eos_token_id"], 1]), ["eos_token_id", "integer"]),
}


@pytest.mark.parametrize("case", list(UNREPRODUCIBLE))
def test_unreproducible_phi3_checkpoint_is_refused(imp_bin, family_ckpt, tmp_path, case):
    import shutil

    name, edit, words = UNREPRODUCIBLE[case]
    folder = shutil.copytree(family_ckpt("phi3"), tmp_path / "ck")
    _edit_json(folder, name, edit)
    r = run_imp("convert", str(folder), "--out", str(tmp_path / "out"), "--quant", "F16", env=clean_env(tmp_path))
    assert_one_line_error(r, *words)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("token,flags", [("<|placeholder1|>", {"rstrip": False}), ("</s>", {"lstrip": True})])
def test_flags_of_tokens_no_prompt_uses_do_not_block(family_ckpt, tmp_path, photo, token, flags):
    """Only the chat tokens decide the GGUF's whitespace rule: odd flags on other added tokens
    still convert, and the prompt tokens are still the reference's."""
    import shutil

    from convert.pipeline import convert
    from oracle import Oracle

    folder = shutil.copytree(family_ckpt("phi3"), tmp_path / "ck")
    _edit_json(folder, "tokenizer.json", _set_added(token, **flags))
    r = convert(str(folder), tmp_path / "out", quant="F16")
    oracle = Oracle(folder)
    with open_engine(Path(r.text_path), Path(r.mmproj_path)) as engine:
        staged = staged_photo(engine, photo)
        for q in QUESTIONS[:3]:
            assert prompt_ids(engine, staged, q) == oracle.prompt_ids(q), q


# =============================================================================================
# 2. read-back
# =============================================================================================
@pytest.mark.parametrize("family", FAMILIES)
def test_text_gguf_metadata(family_converted, family, tmp_path):
    text, _ = family_converted(family)
    r = GGUFReader(text)
    s, a = TINY_FOR[family], ARCH[family]
    assert kv(r, "general.architecture") == a
    expected_u32 = {
        f"{a}.context_length": s.max_position_embeddings,
        f"{a}.embedding_length": s.hidden_size,
        f"{a}.feed_forward_length": s.intermediate_size,
        f"{a}.block_count": s.num_layers,
        f"{a}.attention.head_count": s.num_heads,
        f"{a}.attention.head_count_kv": s.num_heads,
        f"{a}.rope.dimension_count": s.head_dim,  # whole heads rotate
        "general.file_type": 1,  # MOSTLY_F16
        "imp.image_token_count": s.n_image_tokens,
        "tokenizer.ggml.bos_token_id": {"phi3": PHI3_BOS_ID, "qwen2": QWEN_BOS_ID}[family],
        "tokenizer.ggml.eos_token_id": {"phi3": PHI3_EOS_ID, "qwen2": QWEN_EOS_ID}[family],
    }
    if family == "phi3":
        expected_u32.update({"phi3.attention.sliding_window": 2047, "tokenizer.ggml.unknown_token_id": 0,
                             "tokenizer.ggml.eot_token_id": PHI3_IDS["<|assistant|>"]})
    for key, value in expected_u32.items():
        assert kv_types(r, key) == [U32], key
        assert kv(r, key) == value, key
    eps, theta = {"phi3": (1e-5, 1e4), "qwen2": (1e-6, 1e6)}[family]
    for key, value in ((f"{a}.attention.layer_norm_rms_epsilon", eps), (f"{a}.rope.freq_base", theta)):
        assert kv_types(r, key) == [F32V], key
        assert kv(r, key) == pytest.approx(value, rel=1e-6), key
    assert kv(r, "imp.prompt_family") == family
    assert kv(r, "imp.image_aspect_ratio") == "square"
    assert kv_types(r, "tokenizer.ggml.add_bos_token") == [BOOL]
    assert kv(r, "tokenizer.ggml.add_bos_token") is (family == "phi3")  # SentencePiece adds <s>, Qwen nothing
    assert kv_types(r, "tokenizer.ggml.tokens") == [ARR, STR]
    assert kv_types(r, "tokenizer.ggml.token_type") == [ARR, I32]
    if family == "phi3":
        assert kv(r, "tokenizer.ggml.model") == "llama"
        assert kv(r, "tokenizer.ggml.add_space_prefix") is True  # the legacy tokenizer.json's Prepend
        assert kv(r, "tokenizer.ggml.add_eos_token") is False
        assert kv_types(r, "tokenizer.ggml.scores") == [ARR, F32V]
        assert "phi3" in kv(r, "general.name").lower()  # its chat tokens strip the newline after them
    else:
        assert kv(r, "tokenizer.ggml.model") == "gpt2"
        assert kv(r, "tokenizer.ggml.pre") == "qwen2"
        assert kv_types(r, "tokenizer.ggml.merges") == [ARR, STR]
        assert "phi3" not in kv(r, "general.name").lower()


@pytest.mark.parametrize("family", FAMILIES)
def test_text_gguf_vocabulary(family_converted, family_ckpt, family):
    text, _ = family_converted(family)
    r = GGUFReader(text)
    tokens, types = kv(r, "tokenizer.ggml.tokens"), kv(r, "tokenizer.ggml.token_type")
    rows = TINY_FOR[family].vocab_rows
    assert len(tokens) == len(types) == np_shape(tensors(r)["token_embd.weight"])[0] == rows
    tj = json.loads((family_ckpt(family) / "tokenizer.json").read_text())
    added = {a["id"]: a for a in tj["added_tokens"]}
    for text_, i in tj["model"]["vocab"].items():
        assert tokens[i] == text_
    for i, a in added.items():
        assert tokens[i] == a["content"]
    assert all(t == TokenType.UNUSED for t in types[N_TOK[family]:])  # padding rows
    assert len(set(tokens)) == len(tokens)
    if family == "phi3":
        assert types[0] == TokenType.UNKNOWN and types[1] == TokenType.CONTROL
        assert types[2] == TokenType.USER_DEFINED  # Phi-3's </s> is an added token that is not special
        assert all(types[i] == TokenType.BYTE for i in range(3, 259))
        assert all(types[i] == TokenType.NORMAL for i in range(259, SPM_SIZE))
        assert all(types[i] == TokenType.CONTROL for i in [*PHI3_IDS.values(), PHI3_IMAGE_ID])
        # The scores order the learned pieces as the SentencePiece model does (read here with the
        # sentencepiece library from tokenizer.model, which the converter never reads).
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(family_ckpt(family) / "tokenizer.model"))
        scores = kv(r, "tokenizer.ggml.scores")
        learned = list(range(259, SPM_SIZE))
        gguf_order = sorted(learned, key=lambda i: (-scores[i], i))
        spm_order = sorted(learned, key=lambda i: (-sp.get_score(i), i))
        assert gguf_order == spm_order
    else:
        assert all(types[i] == TokenType.CONTROL for i in QWEN_IDS.values())
        assert all(types[i] == TokenType.NORMAL for i in range(min(QWEN_IDS.values())))
        merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
        assert kv(r, "tokenizer.ggml.merges") == merges


def text_map(family: str) -> dict[str, str]:
    """GGUF text tensor name -> checkpoint tensor name, written out from llama.cpp's names."""
    s = TINY_FOR[family]
    m = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}
    for i in range(s.num_layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        m.update({b + "attn_norm.weight": p + "input_layernorm.weight",
                  b + "attn_output.weight": p + "self_attn.o_proj.weight",
                  b + "ffn_norm.weight": p + "post_attention_layernorm.weight",
                  b + "ffn_down.weight": p + "mlp.down_proj.weight"})
        if family == "phi3":
            m.update({b + "attn_qkv.weight": p + "self_attn.qkv_proj.weight",
                      b + "ffn_up.weight": p + "mlp.gate_up_proj.weight"})
        else:
            for g, h in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")):
                for kind in ("weight", "bias"):
                    m[f"{b}{g}.{kind}"] = f"{p}self_attn.{h}.{kind}"
            m.update({b + "ffn_gate.weight": p + "mlp.gate_proj.weight", b + "ffn_up.weight": p + "mlp.up_proj.weight"})
    return m


@pytest.mark.parametrize("family", FAMILIES)
def test_text_gguf_tensors(family_converted, family_ckpt, family):
    text, _ = family_converted(family)
    got = tensors(GGUFReader(text))
    want = text_map(family)
    assert sorted(got) == sorted(want)  # none missing, none extra
    planned = planned_tensors(TINY_FOR[family], "new", family)
    ck = read_checkpoint(family_ckpt(family))
    for g, h in want.items():
        assert np_shape(got[g]) == planned[h], g
        assert got[g].tensor_type == (QT.F16 if len(planned[h]) == 2 else QT.F32), g
        np.testing.assert_array_equal(values(got[g]), ck[h].astype(np.float16).astype(np.float32), err_msg=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_mmproj_gguf(family_converted, family_ckpt, family):
    """Qwen's config has no vision_tower_config: the tower's sizes come from the shapes (heads:
    SigLIP-so400m's 16) and must be what the weights hold."""
    _, mmproj = family_converted(family)
    r = GGUFReader(mmproj)
    s = TINY_FOR[family]
    assert ("vision_tower_config" in json.loads((family_ckpt(family) / "config.json").read_text())) == (family == "phi3")
    expected = {"clip.vision.image_size": s.image_size, "clip.vision.patch_size": s.patch_size,
                "clip.vision.embedding_length": s.vision_hidden_size,
                "clip.vision.feed_forward_length": s.vision_intermediate_size,
                "clip.vision.projection_dim": s.hidden_size, "clip.vision.block_count": s.vision_layers,
                "clip.vision.attention.head_count": s.vision_heads}
    for key, value in expected.items():
        assert kv_types(r, key) == [U32], key
        assert kv(r, key) == value, key
    assert kv(r, "clip.vision.feature_layer") == [s.vision_layers]
    assert kv(r, "clip.use_gelu") is True
    got = tensors(r)
    want = vision_map(s.vision_layers)
    assert sorted(got) == sorted(want)
    ck = read_checkpoint(family_ckpt(family))
    for g, h in want.items():
        ref = ck[h].astype(np.float16).astype(np.float32) if got[g].tensor_type == QT.F16 else ck[h]
        np.testing.assert_array_equal(values(got[g]), ref, err_msg=g)


# =============================================================================================
# 3. prompt tokens
# =============================================================================================
# GGUF names: general.name keys llama.cpp's Phi-3 whitespace rule, so the tokens must not depend
# on what the user calls the model (None = the folder name).
NAMES = [None, "plain-model", "imp-v1.5-4b", "My-Phi3-Model", "phi-3-mini"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_tokens_equal_reference(family_converted, family_oracle, photo, family, name):
    text, mmproj = family_converted(family, name=name)
    oracle = family_oracle(family)
    with open_engine(text, mmproj) as engine:
        staged = staged_photo(engine, photo)
        for q in QUESTIONS:
            assert prompt_ids(engine, staged, q) == oracle.prompt_ids(q), q
        assert prompt_ids(engine, staged, QUESTION, system="") == oracle.prompt_ids(QUESTION, system="")


# Multi-turn prompts, written out here from Imp's conversation templates (one image, first turn).
MULTI_TURN = {
    "phi3": ("<|system|>\nSYS<|end|>\n<|user|>\n<image>\nWhat is it?<|end|>\n<|assistant|>\nA red car.<|end|>\n"
             "<|user|>\n Where is it? <|end|>\n<|assistant|>\n"),
    "qwen2": ("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n"
              "<|im_start|>assistant\nA red car.<|im_end|>\n<|im_start|>user\n Where is it? <|im_end|>\n"
              "<|im_start|>assistant\n"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_turn_template_and_tokens(family_converted, family_oracle, photo, family):
    from imp_cli.prompts import Turn, build_prompt

    history = [Turn("What is it?", "A red car.")]
    before, after = build_prompt(family, " Where is it? ", history, "SYS")
    assert before + "<image>" + after == MULTI_TURN[family]
    with open_engine(*family_converted(family)) as engine:
        ids = prompt_ids(engine, staged_photo(engine, photo), " Where is it? ", history, "SYS")
        assert ids == family_oracle(family).image_prompt_ids(MULTI_TURN[family])


# =============================================================================================
# 4. stop tokens
# =============================================================================================
@pytest.mark.parametrize("family", FAMILIES)
def test_stop_tokens_end_generation(family_converted, family_oracle, family):
    """The runtime takes its stop tokens from the GGUF: llama.cpp must end generation on each
    token the reference stops on (Phi-3: <|end|>, <|endoftext|>, <|assistant|>; Qwen2:
    <|im_end|>, <|endoftext|>) and on no ordinary token. One extra, whatever the file says:
    llama.cpp ends generation on any token spelled </s> (Phi-3's id 2, which the Phi-3 chat model
    does not emit; the factory gives it a zero lm_head row)."""
    import llama_cpp

    text, _ = family_converted(family)
    oracle = family_oracle(family)
    llm = llama_cpp.Llama(model_path=str(text), vocab_only=True, verbose=False)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        eog = {i for i in range(oracle.vocab_rows) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    finally:
        llm.close()
    always = {oracle.tokenizer.token_to_id("</s>")} - {None}
    assert eog == oracle.stop_ids | always


# =============================================================================================
# 5. oracle parity
# =============================================================================================
FORCED = (" The photo shows a big red bus and a small dog. The dog is sitting, and the bus is on the street "
          "near a tall building, next to a green tree and a white house with a black door.")


@pytest.mark.parametrize("aspect", ASPECTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_engine_numerics_against_oracle(family_converted, family_oracle, photo, family, aspect):
    text, mmproj = family_converted(family, aspect)
    oracle = family_oracle(family, aspect)
    image = as_imp_sees_it(photo)
    with open_engine(text, mmproj) as engine:
        staged = staged_photo(engine, photo)
        head, tail = prompt_ids(engine, staged)
        assert (head, tail) == oracle.prompt_ids(QUESTION)
        embd = encode_photo(engine, staged)
        ref_embd = oracle.image_embeddings(image)
        assert embd.data.shape == ref_embd.shape
        assert rel_diff(embd.data, ref_embd) < EMBD_TOL

        engine.evaluate([head, embd, tail])
        ours, ref = live(family, engine.last_logits()), live(family, oracle.first_logits(image, QUESTION))
        assert rel_diff(ours, ref) < LOGITS_TOL
        assert int(ours.argmax()) == int(ref.argmax())

        forced = oracle.tokenizer.encode(FORCED, add_special_tokens=False).ids[:N_TOKENS]
        assert len(forced) == N_TOKENS
        our_top1 = []
        for i in range(N_TOKENS):
            engine.evaluate([head, embd, tail + forced[:i]])
            our_top1.append(int(np.argmax(engine.last_logits())))
        assert our_top1 == oracle.teacher_forced_top1(image, QUESTION, forced)

        ids: list[int] = []  # greedy, with prefix reuse, stopping before a stop token
        while len(ids) < N_TOKENS:
            engine.evaluate([head, embd, tail + ids])
            tok = int(np.argmax(engine.last_logits()))
            if tok in oracle.stop_ids:
                break
            ids.append(tok)
        assert len(ids) == N_TOKENS  # no early stop: 24 tokens are compared
        assert ids == oracle.greedy(image, QUESTION, N_TOKENS)


# =============================================================================================
# 6. quantized
# =============================================================================================
def first_step(text: Path, mmproj: Path, photo: Path, n_generate: int = 0):
    """llama.cpp's first-answer-token logits for the photo and QUESTION, and how many tokens
    an n_generate-token greedy answer produced."""
    from imp_cli.engine import Sampling

    with open_engine(text, mmproj) as engine:
        staged = staged_photo(engine, photo)
        head, tail = prompt_ids(engine, staged)
        engine.evaluate([head, encode_photo(engine, staged), tail])
        logits = engine.last_logits()
        if not n_generate:
            return logits, 0
        for _ in engine.generate(Sampling(ignore_eos=True), n_generate):
            pass
        return logits, engine.timings.generated_tokens


Q8_TOLERANCE = 0.15  # as for Phi-2 (test_convert.py): measured 0.04-0.06 x std, a mistake is O(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_q8_0_close_to_f16(family_converted, photo, family):
    f16_text, f16_proj = family_converted(family)
    q8_text, q8_proj = family_converted(family, quant="Q8_0", mmproj_type="Q8_0")
    ref, _ = first_step(f16_text, f16_proj, photo)
    ours, _ = first_step(q8_text, q8_proj, photo)
    ids = predictable_ids(family)
    diff = np.abs(ours[ids] - ref[ids]).max() / ref[ids].std()
    assert 1e-4 < diff < Q8_TOLERANCE, diff  # quantized, and close


@pytest.mark.parametrize("family", FAMILIES)
def test_q4_k_m_loads_and_generates(family_converted, photo, family):
    text, mmproj = family_converted(family, quant="Q4_K_M")
    assert kv(GGUFReader(text), "general.file_type") == 15  # MOSTLY_Q4_K_M
    logits, generated = first_step(text, mmproj, photo, n_generate=6)
    assert logits.shape == (TINY_FOR[family].vocab_rows,) and np.isfinite(logits).all()
    assert generated == 6


# =============================================================================================
# 7. the command
# =============================================================================================
@pytest.mark.parametrize("aspect", ASPECTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cli_answer_equals_oracle(imp_bin, family_converted, family_oracle, photo, tmp_path, family, aspect):
    text, _ = family_converted(family, aspect)
    answer = ask_ok(imp_bin, photo, text, env=clean_env(tmp_path))
    expected = family_oracle(family, aspect).answer_text(as_imp_sees_it(photo), QUESTION, N_TOKENS)
    assert len(expected.split()) >= 5  # a real answer, not an early stop
    assert answer == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_piped_chat_equals_oracle(imp_bin, family_converted, family_oracle, photo, tmp_path, family):
    """A three-turn `imp chat` conversation (answers fed back as generated, in each family's
    template) answers as the oracle does, turn by turn."""
    from test_chat import QUESTIONS as CHAT_QUESTIONS
    from test_chat import chat_piped

    oracle = family_oracle(family)
    expected = [oracle.tokenizer.decode(ids, skip_special_tokens=True).strip()
                for ids in oracle.chat_greedy(as_imp_sees_it(photo), CHAT_QUESTIONS, N_TOKENS)]
    assert all(len(a.split()) >= 3 for a in expected)  # real answers, not early stops
    p = chat_piped(imp_bin, photo, family_converted(family)[0], CHAT_QUESTIONS, "--json", env=clean_env(tmp_path))
    assert p.returncode == 0, p.stderr
    assert [json.loads(line)["answer"] for line in p.stdout.splitlines()] == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_serve_two_turns_equal_oracle(imp_bin, family_converted, family_oracle, photo, tmp_path, family):
    """`imp serve` with an OpenAI client: the first answer and a follow-up (the first answer sent
    back as text, in the family's template) are the oracle's."""
    from test_serve import Server, data_url

    oracle, image = family_oracle(family), as_imp_sees_it(photo)
    first = oracle.answer_text(image, QUESTION, N_TOKENS)
    second = "And what else?"
    want = oracle.answer_text(image, second, N_TOKENS, history=((QUESTION, first),))
    assert len(first.split()) >= 5 and len(want.split()) >= 5
    server = Server(imp_bin, family_converted(family)[0], clean_env(tmp_path))
    try:
        client = server.client()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(photo)}},
                                                 {"type": "text", "text": QUESTION}]}]
        reply = client.chat.completions.create(model=server.model, messages=messages, max_tokens=N_TOKENS)
        assert reply.choices[0].message.content == first
        messages += [{"role": "assistant", "content": first}, {"role": "user", "content": second}]
        reply = client.chat.completions.create(model=server.model, messages=messages, max_tokens=N_TOKENS)
        assert reply.choices[0].message.content == want
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.parametrize("family", FAMILIES)
def test_pull_known_name_then_ask(imp_bin, hub_cache, family_oracle, photo, tmp_path, family):
    """`imp pull imp-v1.5-4b` / `imp-v1.5-2b` (offline, from a hub cache holding the tiny
    checkpoint under the real repo id): the store entry, named without "phi3", answers as the
    oracle does."""
    name, repo = KNOWN[family]
    cache, _ = hub_cache(repo, family=family)
    env = clean_env(tmp_path, hub=cache)
    assert_ok(run_imp("pull", name, "--quant", "F16", env=env, timeout=300))
    answer = ask_ok(imp_bin, photo, name, env=env)
    assert answer == family_oracle(family).answer_text(as_imp_sees_it(photo), QUESTION, N_TOKENS)
