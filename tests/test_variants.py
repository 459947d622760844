"""The config and file-set variants of the published Imp repos (issue 15) convert as the plain
checkpoint they are equivalent to.

Each variant is built by the factory with the same sizes and seed as a plain fixture, so it holds
the same weights and means the same model; only how config.json and the tokenizer files say it
differs. Proof, per variant: the converted pair has the same tensors (byte for byte) and the same
metadata (except imp.source, which names the source) as the plain fixture's, the converter says
which files and keys it read, and `imp ask` answers exactly as the oracle does on the plain
checkpoint (the oracle reads tokenizer.json and vision_tower_config, which some variants lack).
Disagreements that would change the model are one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGUFReader

from helpers import assert_one_line_error, clean_env, run_imp
from factory import TINY, Sizes, make_checkpoint, planned_tensors, tower_folder_name

QUESTION = "What is in the image?"
N_TOKENS = 16
IGNORED = {"imp.source"}  # names the source; general.name is the same: every conversion here is named "imp"

# Phi-2-shaped but small: 32 heads and rotary factor 0.4 ARE the Phi-2 defaults a config without
# size keys falls back to (TINY's 4 heads cannot be told from the shapes).
PHI2_LIKE = Sizes(hidden_size=320, num_layers=2, num_heads=32, intermediate_size=200,
                  partial_rotary_factor=0.4, vocab_rows=1088, vision_hidden_size=64,
                  vision_intermediate_size=136, vision_heads=4, vision_layers=2, image_size=56,
                  patch_size=14)
ALL_TOKENIZER_FILES = "vocab.json + merges.txt + added_tokens.json + tokenizer_config.json"

# name -> (factory options, sizes, what the converter must say it read:
#          (tokenizer_from, context_from, vision_config_from))
VARIANTS = {
    # The current imp-v1-3b config: no language-model size keys; context from the LLaVA key.
    "no-lm-size-keys": (dict(lm_size_keys="none"), PHI2_LIKE,
                        (None, "tokenizer_model_max_length", "vision_tower_config")),
    # The original imp-v1-3b config keys (n_embd, n_head, n_positions, rotary_dim...).
    "phi-msft-size-keys": (dict(lm_size_keys="phi-msft"), TINY, (None, "n_positions", "vision_tower_config")),
    "hf-size-keys": (dict(lm_size_keys="hf"), TINY, (None, "max_position_embeddings", "vision_tower_config")),
    # The tower config counts only the kept layers (the plain fixture's says kept + 1, as the
    # real configs' 27 for 26 stored).
    "tower-config-counts-kept-layers": (dict(tower_config_layers=TINY.vision_layers), TINY,
                                        (None, None, "vision_tower_config")),
    # Imp-v1.5-3B-196: the tower's own config in a folder, no vision_tower_config.
    "tower-folder": (dict(tower_config="folder"), TINY, (None, None, f"{tower_folder_name(TINY)}/config.json")),
    "tower-folder-and-config": (dict(tower_config="both"), TINY,
                                (None, None, f"vision_tower_config + {tower_folder_name(TINY)}/config.json")),
    # Phi-2-era tokenizer files without tokenizer.json.
    "no-tokenizer-json": (dict(tokenizer_files="no-tokenizer-json"), TINY, (ALL_TOKENIZER_FILES, None, None)),
    "no-tokenizer-json-no-decoder": (dict(tokenizer_files="no-tokenizer-json-no-decoder"), TINY,
                                     ("vocab.json + merges.txt + added_tokens.json", None, None)),
    "tokenizer-json-only": (dict(tokenizer_files="tokenizer-json-only"), TINY, ("tokenizer.json", None, None)),
    # All of it at once, as Imp-v1.5-3B-196 may be.
    "folder-no-tokenizer-json-no-sizes": (dict(tower_config="folder", tokenizer_files="no-tokenizer-json",
                                               lm_size_keys="none"), PHI2_LIKE,
                                          (ALL_TOKENIZER_FILES, "tokenizer_model_max_length",
                                           f"{tower_folder_name(PHI2_LIKE)}/config.json")),
}


def plain_says(layout: str) -> tuple[str, str, str]:
    """What the converter says it read of the plain fixture: its context key is its layout's."""
    return (f"tokenizer.json (agrees with {ALL_TOKENIZER_FILES})",
            "max_position_embeddings" if layout == "new" else "n_positions", "vision_tower_config")


# ---------------------------------------------------------------------------------------- helpers
def gguf_content(path: Path) -> tuple[dict, dict]:
    """(metadata but IGNORED keys, tensor name -> (type, bytes)) of a GGUF file."""
    r = GGUFReader(path)
    meta = {k: (list(f.types), f.contents()) for k, f in r.fields.items()
            if k not in IGNORED and not k.startswith("GGUF.")}
    return meta, {t.name: (t.tensor_type, t.data.tobytes()) for t in r.tensors}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """plain(layout, sizes) -> (checkpoint folder, ConvertResult) of the plain fixture."""
    from convert.pipeline import convert

    made: dict = {}

    def get(layout: str, sizes: Sizes):
        key = (layout, sizes)
        if key not in made:
            root = tmp_path_factory.mktemp("plain")
            ck = make_checkpoint(root / "ck", layout=layout, sizes=sizes)
            made[key] = ck, convert(str(ck), root / "out", quant="F16", name="imp")
        return made[key]

    return get


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    """variant(name, layout) -> (checkpoint folder, ConvertResult)."""
    from convert.pipeline import convert

    made: dict = {}

    def get(name: str, layout: str):
        if (name, layout) not in made:
            options, sizes, _ = VARIANTS[name]
            root = tmp_path_factory.mktemp(name)
            ck = make_checkpoint(root / "ck", layout=layout, sizes=sizes, **options)
            made[name, layout] = ck, convert(str(ck), root / "out", quant="F16", name="imp")
        return made[name, layout]

    return get


# ------------------------------------------------------------------------- the variants convert
def test_variants_really_differ_from_the_plain_fixture(variant, plain):
    """Each variant's files differ from the plain fixture's as its name says (so the comparisons
    below test something)."""
    def files(folder: Path) -> set[str]:
        return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}

    plain_ck, _ = plain("new", TINY)
    plain_cfg = json.loads((plain_ck / "config.json").read_text())
    assert plain_cfg["vision_tower_config"]["num_hidden_layers"] == TINY.vision_layers + 1  # 27 for 26
    for name, (_, sizes, _) in VARIANTS.items():
        ck, _ = variant(name, "new")
        cfg = json.loads((ck / "config.json").read_text())
        if "size-keys" in name or "sizes" in name:
            keys = {"hidden_size", "n_embd", "num_attention_heads", "n_head", "max_position_embeddings", "n_positions"}
            want = {"no-lm-size-keys": set(), "folder-no-tokenizer-json-no-sizes": set(),
                    "phi-msft-size-keys": {"n_embd", "n_head", "n_positions"},
                    "hf-size-keys": {"hidden_size", "num_attention_heads", "max_position_embeddings"}}[name]
            assert keys & set(cfg) == want, name
        if "folder" in name:
            assert f"{tower_folder_name(sizes)}/config.json" in files(ck), name
            assert ("vision_tower_config" in cfg) == name.endswith("and-config"), name
        if "no-tokenizer-json" in name:
            assert "tokenizer.json" not in files(ck) and "vocab.json" in files(ck), name
        if name.endswith("no-decoder"):
            assert "added_tokens_decoder" not in json.loads((ck / "tokenizer_config.json").read_text())
    ck, _ = variant("tower-config-counts-kept-layers", "new")
    assert json.loads((ck / "config.json").read_text())["vision_tower_config"]["num_hidden_layers"] == TINY.vision_layers


@pytest.mark.parametrize("layout", ["new", "old"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_converts_to_the_plain_pair(variant, plain, name, layout):
    _, sizes, says = VARIANTS[name]
    _, got = variant(name, layout)
    _, want = plain(layout, sizes)
    for kind in ("text_path", "mmproj_path"):
        assert gguf_content(Path(getattr(got, kind))) == gguf_content(Path(getattr(want, kind))), kind
    # ... and says where it read what no single file is sure to state.
    expected = tuple(s if s is not None else p for s, p in zip(says, plain_says(layout)))
    assert (got.tokenizer_from, got.context_from, got.vision_config_from) == expected
    assert got.context_length == sizes.max_position_embeddings


def test_plain_pair_reports_its_sources(plain):
    _, r = plain("new", TINY)
    assert (r.tokenizer_from, r.context_from, r.vision_config_from) == plain_says("new")
    assert r.context_length == TINY.max_position_embeddings


@pytest.mark.parametrize("layout", ["new", "old"])
@pytest.mark.parametrize("name", ["no-lm-size-keys", "phi-msft-size-keys", "tower-config-counts-kept-layers",
                                  "tower-folder", "no-tokenizer-json", "no-tokenizer-json-no-decoder"])
def test_variant_answers_equal_the_oracle(variant, name, layout, photo, tmp_path):
    """`imp ask` on the variant's pair: exactly the oracle's greedy answer on the plain checkpoint."""
    from oracle import Oracle
    from PIL import Image, ImageOps

    _, sizes, _ = VARIANTS[name]
    _, r = variant(name, layout)
    oracle = Oracle(make_checkpoint(tmp_path / "plain", layout=layout, sizes=sizes))
    image = ImageOps.exif_transpose(Image.open(photo)).convert("RGB")
    expected = oracle.answer_text(image, QUESTION, N_TOKENS)
    assert len(expected.split()) >= 3  # a real answer: the comparison means something
    p = run_imp("ask", photo, QUESTION, "--model", r.text_path, "-n", N_TOKENS, env=clean_env(tmp_path))
    assert p.returncode == 0, p.stderr
    assert p.stdout == expected + "\n"


def test_known_tower_without_any_config_takes_heads_from_its_shapes(tmp_path):
    """No vision_tower_config and no tower folder (as Imp-v1.5-2B-Qwen1.5): a SigLIP-so400m-wide
    tower (1152 / 4304) gets its 16 heads; the pair equals the one from the full config."""
    from convert.pipeline import convert

    so400m = Sizes(**{**TINY.__dict__, "vision_hidden_size": 1152, "vision_intermediate_size": 4304,
                      "vision_heads": 16, "vision_layers": 1, "image_size": 28})
    bare = make_checkpoint(tmp_path / "bare", sizes=so400m, tower_config="none")
    full = make_checkpoint(tmp_path / "full", sizes=so400m)
    assert "vision_tower_config" not in json.loads((bare / "config.json").read_text())
    a = convert(str(bare), tmp_path / "a", quant="F16", name="imp")
    b = convert(str(full), tmp_path / "b", quant="F16", name="imp")
    assert a.vision_config_from == "tensor shapes (SigLIP-so400m)"
    assert GGUFReader(a.mmproj_path).fields["clip.vision.attention.head_count"].contents() == 16
    assert gguf_content(Path(a.mmproj_path)) == gguf_content(Path(b.mmproj_path))


def test_convert_says_what_it_read(tmp_path):
    ck = make_checkpoint(tmp_path / "ck", **VARIANTS["folder-no-tokenizer-json-no-sizes"][0],
                         sizes=PHI2_LIKE)
    r = run_imp("convert", ck, "--out", tmp_path / "out", "--quant", "F16", env=clean_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (f"read the vocabulary from {ALL_TOKENIZER_FILES}, the context length (3072) from "
            f"tokenizer_model_max_length, the vision tower from {tower_folder_name(PHI2_LIKE)}/config.json") in r.stderr


# -------------------------------------------------------------------- disagreements: one line
def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _tower_layers(n: int):
    def build(d: Path):
        make_checkpoint(d, tower_config_layers=n)
        return ["vision_tower_config", f"num_hidden_layers={n}", f"keep {TINY.vision_layers}"]
    return build


def _folder_says(key: str, value: int, *words: str):
    """A tower folder whose config.json states `key` differently from the weights."""
    def build(d: Path):
        make_checkpoint(d, tower_config="folder")
        _edit_json(d / tower_folder_name(TINY) / "config.json", lambda c: c.update({key: value}))
        return [f"{tower_folder_name(TINY)}/config.json", f"{key}={value}", *words]
    return build


def _configs_disagree_on_heads(d: Path):
    make_checkpoint(d, tower_config="both")
    _edit_json(d / tower_folder_name(TINY) / "config.json", lambda c: c.update(num_attention_heads=8))
    return ["disagree", "num_attention_heads=4", "8"]


def _unknown_tower_without_config(d: Path):
    make_checkpoint(d, tower_config="none")
    return ["heads", "no tower config"]


def _tower_quick_gelu(d: Path):
    make_checkpoint(d)
    _edit_json(d / "config.json", lambda c: c["vision_tower_config"].update(hidden_act="quick_gelu"))
    return ["quick_gelu"]


def _vocab_json_disagrees(d: Path):
    make_checkpoint(d)
    vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    return ["tokenizer files disagree", "token 300", "tokenizer.json"]


def _merges_disagree(d: Path):
    make_checkpoint(d)
    lines = (d / "merges.txt").read_text(encoding="utf-8").splitlines()
    (d / "merges.txt").write_text("\n".join(lines[:-5]) + "\n", encoding="utf-8")
    return ["tokenizer files disagree", "merge"]


def _added_tokens_disagree(d: Path):
    make_checkpoint(d)
    _edit_json(d / "added_tokens.json", lambda t: t.update({"</s>": t["<image>"], "<image>": t["</s>"]}))
    return ["disagree", "added_tokens.json", "tokenizer_config.json"]


def _special_flag_disagrees(d: Path):
    make_checkpoint(d)
    _edit_json(d / "tokenizer_config.json",
               lambda c: next(t for t in c["added_tokens_decoder"].values() if t["content"] == "</s>").update(special=False))
    return ["disagree", "special", "'</s>'"]


def _vocab_without_merges(d: Path):
    make_checkpoint(d, tokenizer_files="no-tokenizer-json")
    (d / "merges.txt").unlink()
    return ["vocab.json without merges.txt"]


def _config_says(layout: str, updates: dict, *words: str):
    """A config.json with `updates` applied (sizes that contradict each other, or bad values)."""
    def build(d: Path):
        make_checkpoint(d, layout=layout)
        _edit_json(d / "config.json", lambda c: c.update(updates))
        return list(words)
    return build


DISAGREEMENTS = {
    "tower-config-says-too-many-layers": _tower_layers(TINY.vision_layers + 2),
    "tower-config-says-too-few-layers": _tower_layers(TINY.vision_layers - 1),
    "tower-folder-hidden-size": _folder_says("hidden_size", 96, str(TINY.vision_hidden_size)),
    "tower-folder-intermediate-size": _folder_says("intermediate_size", 128, str(TINY.vision_intermediate_size)),
    "tower-folder-image-size": _folder_says("image_size", 384, f"{TINY.n_image_tokens} position embeddings"),
    "tower-configs-disagree-on-heads": _configs_disagree_on_heads,
    "unknown-tower-without-config": _unknown_tower_without_config,
    "tower-activation": _tower_quick_gelu,
    "vocab-json-vs-tokenizer-json": _vocab_json_disagrees,
    "merges-txt-vs-tokenizer-json": _merges_disagree,
    "added-tokens-json-vs-decoder": _added_tokens_disagree,
    "special-flag": _special_flag_disagrees,
    "vocab-json-without-merges": _vocab_without_merges,
    "size-key-families-disagree": _config_says("new", {"n_embd": 128}, "hidden_size=64", "n_embd=128"),
    "grouped-query-heads": _config_says("new", {"num_key_value_heads": 2}, "num_key_value_heads=2"),
    "rotary-keys-disagree": _config_says("new", {"rotary_dim": 4}, "rotary_dim=4", "partial_rotary_factor"),
    "size-wrong-type": _config_says("old", {"n_head": "32"}, "n_head", "'32'"),
    "eos-wrong-type": _config_says("new", {"eos_token_id": [971]}, "eos_token_id", "[971]"),
}


@pytest.mark.parametrize("case", list(DISAGREEMENTS))
def test_disagreement_is_a_one_line_error(tmp_path, case):
    words = DISAGREEMENTS[case](tmp_path / "ck")
    out = tmp_path / "out"
    r = run_imp("convert", tmp_path / "ck", "--out", out, "--quant", "F16", env=clean_env(tmp_path))
    assert_one_line_error(r, *words)
    assert not out.exists() or list(out.iterdir()) == []


# ----------------------------------------------------------------- what the Hub path downloads
REAL_LISTING = [  # an Imp-v1.5-3B-196-like repo, with what a conversion must not fetch
    ".gitattributes", "README.md", "config.json", "configuration_imp.py", "modeling_imp.py",
    "generation_config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json",
    "training_args.bin", "mm_projector.safetensors", "vocab.json", "merges.txt", "added_tokens.json",
    "tokenizer_config.json", "special_tokens_map.json", "images/logo.png",
    "siglip-so400m-patch14-196/config.json", "siglip-so400m-patch14-196/preprocessor_config.json",
    "siglip-so400m-patch14-196/model.safetensors", "checkpoint-500/config.json",
]
REAL_INDEX = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                             "lm_head.weight": "model-00002-of-00002.safetensors"}}


def test_needed_files_are_exactly_what_a_conversion_reads():
    from convert.checkpoint import needed_files

    cfg = {"mm_vision_tower": "./siglip-so400m-patch14-196"}
    assert needed_files(REAL_LISTING, cfg, REAL_INDEX) == [
        "config.json", "model.safetensors.index.json", "tokenizer_config.json", "vocab.json", "merges.txt",
        "added_tokens.json", "special_tokens_map.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "siglip-so400m-patch14-196/config.json",
    ]
    # mm_vision_tower naming a Hub repo: the one SigLIP folder is still the tower's.
    assert needed_files(REAL_LISTING, {"mm_vision_tower": "google/siglip-so400m-patch14-384"}, REAL_INDEX)[-1] == \
        "siglip-so400m-patch14-196/config.json"
    # Without an index: the top-level shards only (never the tower folder's own weights).
    listing = [f for f in REAL_LISTING if f != "model.safetensors.index.json"]
    assert [f for f in needed_files(listing, cfg, None) if f.endswith(".safetensors")] == [
        "mm_projector.safetensors", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    # No tower folder: no tower config.
    plain = [f for f in REAL_LISTING if not f.startswith("siglip")]
    assert not [f for f in needed_files(plain, cfg, REAL_INDEX) if "/" in f]


def test_needed_files_match_the_factory_checkpoint(tmp_path):
    """What the converter reads of a variant checkpoint folder is within needed_files' choice:
    converting a copy that holds only those files gives the same pair."""
    import shutil

    from convert.checkpoint import needed_files
    from convert.pipeline import convert

    ck = make_checkpoint(tmp_path / "ck", layout="old", tower_config="folder", tokenizer_files="no-tokenizer-json")
    listing = [p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file()]
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    files = needed_files(listing, json.loads((ck / "config.json").read_text()), index)
    assert f"{tower_folder_name(TINY)}/preprocessor_config.json" in listing
    assert f"{tower_folder_name(TINY)}/preprocessor_config.json" not in files
    only = tmp_path / "only"
    for f in files:
        (only / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ck / f, only / f)
    a = convert(str(ck), tmp_path / "a", quant="F16", name="imp")
    b = convert(str(only), tmp_path / "b", quant="F16", name="imp")
    assert b.vision_config_from == f"{tower_folder_name(TINY)}/config.json"
    for kind in ("text_path", "mmproj_path"):
        assert gguf_content(Path(getattr(a, kind))) == gguf_content(Path(getattr(b, kind)))
    # the factory wrote exactly the tensors it plans for the old layout (names and shapes)
    from safetensors import safe_open

    stored = {}
    for shard in ck.glob("*.safetensors"):
        with safe_open(str(shard), framework="np") as f:
            stored.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    assert stored == planned_tensors(TINY, "old")
    assert "transformer.h.0.mixer.Wqkv.weight" in stored  # the old layout's fused q|k|v


# -------------------------------------------------------------------------- offline Hub source
HUB_REPO = "MILVLG/imp-variant-196"


def test_hub_repo_with_tower_folder_and_no_tokenizer_json(hub_cache, plain, tmp_path):
    """`imp convert owner/name` from the hub cache of a repo shaped like Imp-v1.5-3B-196: old
    layout, tower folder, no vision_tower_config, no tokenizer.json. The pair equals the plain
    one and records the repo id and the resolved commit."""
    cache, commit = hub_cache(HUB_REPO, layout="old", tower_config="folder", tokenizer_files="no-tokenizer-json")
    snapshot = cache / ("models--" + HUB_REPO.replace("/", "--")) / "snapshots" / commit
    assert (snapshot / tower_folder_name(TINY) / "config.json").is_file()
    assert not (snapshot / "tokenizer.json").exists()
    out = tmp_path / "out"
    env = clean_env(tmp_path, HF_HUB_CACHE=str(cache))
    r = run_imp("convert", HUB_REPO, "--out", out, "--quant", "F16", "--name", "imp", "--json", env=env)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["source"] == f"{HUB_REPO}@{commit}"
    assert result["vision_config_from"] == f"{tower_folder_name(TINY)}/config.json"
    assert result["tokenizer_from"] == ALL_TOKENIZER_FILES
    _, want = plain("old", TINY)
    for kind in ("text_path", "mmproj_path"):
        got = Path(result[kind.removesuffix("_path")])  # --json names the files text and mmproj
        assert GGUFReader(got).fields["imp.source"].contents() == f"{HUB_REPO}@{commit}"
        assert gguf_content(got) == gguf_content(Path(getattr(want, kind)))


# -------------------------------------------------------------------------- online Hub source
class FakeHub:
    """A local stand-in for the Hub's HTTP API (the few routes huggingface_hub uses to resolve a
    revision, list a repo's files and download them), serving one folder as one repo at one
    commit; it records every file download (GET .../resolve/...)."""

    def __init__(self, repo_id: str, folder: Path, commit: str):
        import hashlib
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        self.downloaded: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _route(self, head: bool):
                from urllib.parse import unquote, urlparse

                path = unquote(urlparse(self.path).path)
                api = f"/api/models/{repo_id}/"
                if path.startswith(api + "revision/") or path == api.rstrip("/"):
                    info = {"id": repo_id, "sha": commit, "private": False,
                            "siblings": [{"rfilename": f, "size": len(b)} for f, b in files.items()]}
                    return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
                if path.startswith(api + "tree/"):
                    tree = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                            for f, b in files.items()]
                    return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, head)
                prefix = f"/{repo_id}/resolve/"
                if path.startswith(prefix):
                    _, _, name = path[len(prefix):].partition("/")
                    if name not in files:
                        return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
                    if not head:
                        hub.downloaded.append(name)
                    return self._send(200, files[name], {"X-Repo-Commit": commit,
                                                         "ETag": f'"{hashlib.sha1(files[name]).hexdigest()}"'}, head)
                return self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, head)

            def do_GET(self):
                self._route(head=False)

            def do_HEAD(self):
                self._route(head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_online_download_fetches_exactly_the_needed_files(plain, tmp_path):
    """`imp convert owner/name` against a Hub (a local stand-in): only the files the conversion
    reads are downloaded, and the pair equals the plain one."""
    ck = make_checkpoint(tmp_path / "repo", layout="old", tower_config="folder", tokenizer_files="no-tokenizer-json")
    (ck / "README.md").write_text("# a model card\n")
    (ck / "pytorch_model.bin").write_bytes(b"not to be fetched")
    (ck / tower_folder_name(TINY) / "model.safetensors").write_bytes(b"the tower's own weights: not needed")
    commit = "c0ffee" * 6 + "c0ff"
    with FakeHub(HUB_REPO, ck, commit) as hub:
        env = clean_env(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_CACHE=str(tmp_path / "cache"),
                        HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
        r = run_imp("convert", HUB_REPO, "--out", tmp_path / "out", "--quant", "F16", "--name", "imp", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(hub.downloaded) == sorted([
        "config.json", "model.safetensors.index.json", "vocab.json", "merges.txt", "added_tokens.json",
        "tokenizer_config.json", "special_tokens_map.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", f"{tower_folder_name(TINY)}/config.json"])
    result = json.loads(r.stdout)
    assert result["source"] == f"{HUB_REPO}@{commit}"
    _, want = plain("old", TINY)
    for kind in ("text_path", "mmproj_path"):
        assert gguf_content(Path(result[kind.removesuffix("_path")])) == gguf_content(Path(getattr(want, kind)))


def test_unreachable_hub_uses_the_cache(hub_cache, plain, tmp_path):
    """Online mode but the Hub cannot be reached (nothing listens at HF_ENDPOINT): the cached
    snapshot of a tower-folder repo converts, as huggingface_hub itself falls back to it."""
    import socket

    cache, commit = hub_cache(HUB_REPO, layout="old", tower_config="folder", tokenizer_files="no-tokenizer-json")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = clean_env(tmp_path, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{port}",
                    HF_HUB_DISABLE_TELEMETRY="1")
    r = run_imp("convert", HUB_REPO, "--out", tmp_path / "out", "--quant", "F16", "--name", "imp", "--json", env=env)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["source"] == f"{HUB_REPO}@{commit}"
    assert result["vision_config_from"] == f"{tower_folder_name(TINY)}/config.json"
    _, want = plain("old", TINY)
    for kind in ("text_path", "mmproj_path"):
        assert gguf_content(Path(result[kind.removesuffix("_path")])) == gguf_content(Path(getattr(want, kind)))


def test_online_unknown_repo_is_a_one_line_error(tmp_path):
    ck = make_checkpoint(tmp_path / "repo")
    with FakeHub(HUB_REPO, ck, "ab" * 20) as hub:
        env = clean_env(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_CACHE=str(tmp_path / "cache"),
                        HF_HUB_DISABLE_TELEMETRY="1")
        r = run_imp("convert", "MILVLG/no-such-repo", "--out", tmp_path / "out", env=env)
    assert_one_line_error(r, "MILVLG/no-such-repo", "no such repository")
    assert hub.downloaded == []


def test_tower_folder_with_a_whole_siglip_config(plain, tmp_path):
    """The tower folder may hold a whole SiglipConfig (text + vision, as google/siglip-so400m-*
    publishes it): its vision_config is the tower's."""
    from convert.pipeline import convert

    ck = make_checkpoint(tmp_path / "ck", tower_config="folder")
    path = ck / tower_folder_name(TINY) / "config.json"
    vision = json.loads(path.read_text())
    path.write_text(json.dumps({"model_type": "siglip", "architectures": ["SiglipModel"],
                                "text_config": {"hidden_size": 1152, "num_attention_heads": 16},
                                "vision_config": vision}))
    got = convert(str(ck), tmp_path / "out", quant="F16", name="imp")
    _, want = plain("new", TINY)
    assert got.vision_config_from == f"{tower_folder_name(TINY)}/config.json"
    for kind in ("text_path", "mmproj_path"):
        assert gguf_content(Path(getattr(got, kind))) == gguf_content(Path(getattr(want, kind)))


def test_several_tower_folders_none_named_is_an_error():
    from convert.checkpoint import needed_files
    from convert.errors import ConvertError

    listing = [*REAL_LISTING, "siglip-so400m-patch14-384/config.json"]
    with pytest.raises(ConvertError, match="several vision tower folders"):
        needed_files(listing, {"mm_vision_tower": "google/siglip-base-patch16-224"}, REAL_INDEX)
    # ... unless mm_vision_tower names one of them.
    assert needed_files(listing, {"mm_vision_tower": "google/siglip-so400m-patch14-384"}, REAL_INDEX)[-1] == \
        "siglip-so400m-patch14-384/config.json"
