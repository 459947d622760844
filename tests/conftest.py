"""Shared fixtures: tiny Imp checkpoints and their converted GGUF pairs, built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from factory import make_checkpoint, make_photo  # noqa: E402
from helpers import IMP, clean_env  # noqa: E402


@pytest.fixture(scope="session")
def imp_bin() -> str:
    return IMP


@pytest.fixture(scope="module")
def env(request, tmp_path_factory) -> dict:
    """The environment of a user who set nothing (helpers.clean_env), one for a whole test module:
    a server or a loaded model started by a module-scoped fixture and the module's tests then
    share its store and prompt cache. A module whose tests each need a fresh one defines its
    own function-scoped `env` (test_ask's)."""
    return clean_env(tmp_path_factory.mktemp(request.module.__name__))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(layout="new", dtype="float16", aspect="square", **kw) -> folder (cached)."""
    made: dict = {}

    def get(layout: str = "new", dtype: str = "float16", aspect: str = "square", **kw) -> Path:
        key = (layout, dtype, aspect, tuple(sorted(kw.items())))
        if key not in made:
            dest = tmp_path_factory.mktemp(f"ckpt-{layout}-{dtype}-{aspect}")
            made[key] = make_checkpoint(dest, layout=layout, dtype=dtype, aspect=aspect, **kw)
        return made[key]

    return get


@pytest.fixture(scope="session")
def converted(checkpoint, tmp_path_factory):
    """converted(layout, dtype, aspect, quant="F16", mmproj_type="F16") -> (text, mmproj) paths."""
    from convert.pipeline import convert

    made: dict = {}

    def get(layout: str = "new", dtype: str = "float16", aspect: str = "square",
            quant: str = "F16", mmproj_type: str = "F16") -> tuple[Path, Path]:
        key = (layout, dtype, aspect, quant, mmproj_type)
        if key not in made:
            out = tmp_path_factory.mktemp("gguf")
            r = convert(str(checkpoint(layout, dtype, aspect)), out, quant=quant, mmproj_type=mmproj_type)
            made[key] = (Path(r.text_path), Path(r.mmproj_path))
        return made[key]

    return get


@pytest.fixture(scope="module")
def session(converted):
    """A Session on the tiny model (new layout, float16, square; one thread, no prompt cache),
    for a module's tests that call it directly."""
    from imp_cli.modelfiles import read_pair
    from imp_cli.session import Session

    with Session(read_pair(*converted("new", "float16", "square")), threads=1, ctx=1024) as s:
        yield s


@pytest.fixture(scope="module")
def staged(session, photo):
    """`photo` as that Session sees it."""
    from imp_cli.images import load_image

    return session.stage(load_image(str(photo)))


@pytest.fixture(scope="session")
def oracle_for(checkpoint):
    """oracle_for(layout, dtype, aspect) -> the transformers reference on the same weights."""
    from oracle import Oracle

    made: dict = {}

    def get(layout: str = "new", dtype: str = "float16", aspect: str = "square") -> "Oracle":
        key = (layout, dtype, aspect)
        if key not in made:
            made[key] = Oracle(checkpoint(layout, dtype, aspect))
        return made[key]

    return get


@pytest.fixture(scope="session")
def photo(tmp_path_factory) -> Path:
    """A small non-square photo-like PNG (factory.make_photo)."""
    return make_photo(tmp_path_factory.mktemp("img") / "photo.png")


@pytest.fixture(scope="session")
def hub_cache(checkpoint, tmp_path_factory):
    """hub_cache(repo_id, **checkpoint_kw) -> (cache_dir, commit): a Hugging Face hub cache holding
    a tiny checkpoint under repo_id at refs/main, as snapshot_download would have left it.
    Use with HF_HUB_CACHE=cache_dir and HF_HUB_OFFLINE=1."""
    import hashlib
    import shutil

    root = tmp_path_factory.mktemp("hub")

    def get(repo_id: str, **kw) -> tuple[Path, str]:
        src = checkpoint(**kw)
        commit = hashlib.sha1(f"{repo_id}{sorted(kw.items())}".encode()).hexdigest()
        repo = root / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / commit
        if not snapshot.is_dir():
            snapshot.mkdir(parents=True)
            shutil.copytree(src, snapshot, dirs_exist_ok=True)  # with a tower folder, if any
            (repo / "refs").mkdir(exist_ok=True)
            (repo / "refs" / "main").write_text(commit)
        return root, commit

    return get


@pytest.fixture(scope="session")
def long_context_model(checkpoint, tmp_path_factory) -> Path:
    """The tiny model with a 32k context: an answer of many thousand tokens (--ignore-eos) runs
    long enough for an interrupt, a second request or a disconnect to land in the middle of it,
    with no timing assumption."""
    import dataclasses

    from convert.pipeline import convert
    from factory import TINY

    folder = checkpoint("new", "float16", "square", sizes=dataclasses.replace(TINY, max_position_embeddings=32768))
    return Path(convert(str(folder), tmp_path_factory.mktemp("long-ctx"), quant="F16").text_path)
