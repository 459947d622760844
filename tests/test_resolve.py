"""`resolve` only looks: it says what --model names and never downloads; the caller pulls."""

from __future__ import annotations

import pytest

from imp_cli import store
from imp_cli.errors import ImpError
from imp_cli.resolve import resolve


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("IMP_HOME", str(tmp_path / "imp-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # empty: any download attempt would fail
    return tmp_path


def test_default_known_name_needs_a_pull(home):
    found = resolve(None)
    assert (found.kind, found.spec, found.name, found.repo_id, found.revision) == (
        "pull", store.DEFAULT_MODEL, "imp-v1-3b", "MILVLG/imp-v1-3b", None)
    assert not (home / "hub").exists() and not store.models_dir().exists()


def test_repo_id_with_revision_needs_a_pull(home):
    found = resolve("someone/Imp-Custom@v2")
    assert (found.kind, found.name, found.repo_id, found.revision) == ("pull", "imp-custom", "someone/Imp-Custom", "v2")


def test_local_pair(converted, home):
    text, mmproj = converted("new", "float16", "square")
    found = resolve(str(text))
    assert (found.kind, found.text, found.mmproj) == ("local", text, mmproj)
    assert resolve(str(text.parent)).text == text  # a folder holding one pair


def test_installed_entry(converted, home):
    from imp_cli.imports import import_pair

    text, mmproj = converted("new", "float16", "square")
    entry = import_pair(text, mmproj, "mine")
    found = resolve("mine")
    assert (found.kind, found.name, found.text, found.mmproj) == ("store", "mine", entry.text_path, entry.mmproj_path)


def test_unknown_name_is_an_error(home):
    with pytest.raises(ImpError, match="unknown model 'no such thing'"):
        resolve("no such thing")
