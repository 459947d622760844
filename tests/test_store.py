"""Acceptance tests of the model store: `imp pull`, `imp models list|path|rm|import`, and how
`imp ask` resolves --model / IMP_MODEL / the default through the store.

Everything runs the installed `imp` command as a subprocess, with IMP_HOME in a tmp folder, the
Hugging Face hub cache populated by the `hub_cache` fixture and HF_HUB_OFFLINE=1 (no network).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from factory import TINY, Sizes
from helpers import assert_ok, assert_one_line_error, assert_usage_error, clean_env, run_imp, run_python, start_imp

TINY_REPO = "MILVLG/imp-tiny-a"      # not a known name: stored as "imp-tiny-a"
DEFAULT_REPO = "MILVLG/imp-v1-3b"    # the repo of the default known name "imp-v1-3b"
BIG_REPO = "MILVLG/imp-big-test"     # slow enough to interrupt
# ~100 MB of f16 weights: the pull spends seconds converting, so it can be killed mid-way.
BIG = Sizes(**{**TINY.__dict__, "hidden_size": 512, "num_layers": 8, "num_heads": 8,
               "intermediate_size": 1280, "vocab_rows": 16000})
WIDE = Sizes(**{**TINY.__dict__, "hidden_size": 96})  # a text width the TINY mmproj does not fit

FILE_TYPES = {"F16": 1, "Q8_0": 7, "Q4_K_M": 15}  # general.file_type (llama_ftype)
QUESTION = "What is in the picture?"


# ------------------------------------------------------------------------------------ helpers

class Ctx:
    """One isolated run environment: IMP_HOME, an empty cwd, and a hub cache (empty by default)."""

    def __init__(self, base: Path, hub: Path | None = None, **extra: str):
        base.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.env = clean_env(base, hub=hub, **extra)
        self.home = Path(self.env["IMP_HOME"])
        self.models = self.home / "models"
        self.cwd = base / "cwd"
        self.cwd.mkdir(exist_ok=True)

    def run(self, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return run_imp(*args, env={**self.env, **(env or {})}, cwd=self.cwd, timeout=timeout)

    def python(self, code: str, *args: str) -> subprocess.CompletedProcess:
        """The CLI run by `code` (which patches something first), as `imp ARGS` would be run."""
        return run_python(code, *args, env=self.env, cwd=self.cwd)

    def popen(self, *args: str, code: str | None = None, env: dict | None = None) -> subprocess.Popen:
        """`imp ARGS` in the background; with `code`, the CLI as run by that Python code."""
        env = {**self.env, **(env or {})}
        if code is None:
            return start_imp(*args, env=env, cwd=self.cwd)
        return subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def installed(self) -> list[str]:
        """Names in `imp models list --json`."""
        r = assert_ok(self.run("models", "list", "--json"))
        return sorted(row["name"] for row in json.loads(r.stdout))

    def visible_folders(self) -> list[str]:
        return sorted(p.name for p in self.models.iterdir() if not p.name.startswith(".")) \
            if self.models.is_dir() else []

    def staging(self) -> list[Path]:
        return sorted(self.models.glob(".staging-*")) if self.models.is_dir() else []


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_type(path: Path) -> int:
    from gguf import GGUFReader

    return int(GGUFReader(path).fields["general.file_type"].contents())


def snapshot(folder: Path) -> dict:
    """name -> (inode, mtime_ns, size) of every file in a folder."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}


def tree(folder: Path) -> dict:
    """relative path -> content digest of every file below a folder (to prove it untouched)."""
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def load_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


def check_entry(folder: Path, name: str, quant: str, source: str) -> dict:
    """A complete store entry: exactly the pair and a manifest that describes it truthfully."""
    text, mmproj = f"{name}-{quant}.gguf", f"{name}-mmproj-F16.gguf"
    assert sorted(p.name for p in folder.iterdir()) == sorted([text, mmproj, "manifest.json"])
    m = load_manifest(folder)
    assert m["source"] == source
    assert "revision" in m
    assert m["imp_version"] == version("imp")
    created = dt.datetime.strptime(m["created"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 600
    for key, fname, ftype in (("text", text, quant), ("mmproj", mmproj, "F16")):
        path = folder / fname
        assert m[key]["file"] == fname
        assert m[key]["type"] == ftype
        assert m[key]["bytes"] == path.stat().st_size > 0
        assert m[key]["sha256"] == sha256(path)
        assert file_type(path) == FILE_TYPES[ftype]
    return m


def install_copy(template: Path, ctx: Ctx) -> None:
    """Copy the store entries of a template IMP_HOME into ctx's store (fresh inodes)."""
    ctx.models.mkdir(parents=True, exist_ok=True)
    for folder in (template / "models").iterdir():
        if not folder.name.startswith("."):
            shutil.copytree(folder, ctx.models / folder.name)


def ask_json(ctx: Ctx, photo: Path, *args: str, env: dict | None = None) -> dict:
    r = assert_ok(ctx.run("ask", str(photo), QUESTION, "-n", "6", "--json", *args, env=env))
    return json.loads(r.stdout)


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def hub(hub_cache):
    """The hub cache with the tiny checkpoint under TINY_REPO and (old layout) DEFAULT_REPO."""
    cache, tiny_commit = hub_cache(TINY_REPO)
    cache2, default_commit = hub_cache(DEFAULT_REPO, layout="old")
    assert cache == cache2
    return {"cache": cache, TINY_REPO: tiny_commit, DEFAULT_REPO: default_commit}


@pytest.fixture(scope="module")
def tiny_pulled(hub, tmp_path_factory):
    """`imp pull MILVLG/imp-tiny-a` once; tests read it or copy its store, never change it."""
    ctx = Ctx(tmp_path_factory.mktemp("tiny-pulled"), hub=hub["cache"])
    r = assert_ok(ctx.run("pull", TINY_REPO))
    return ctx, r


@pytest.fixture(scope="module")
def default_pulled(hub, tmp_path_factory):
    """`imp pull` with no name: the default model, from the hub cache of its real repo id."""
    ctx = Ctx(tmp_path_factory.mktemp("default-pulled"), hub=hub["cache"])
    r = assert_ok(ctx.run("pull"))
    return ctx, r


@pytest.fixture
def store_ctx(tmp_path, tiny_pulled):
    """A fresh IMP_HOME holding a copy of the installed imp-tiny-a; empty hub cache."""
    ctx = Ctx(tmp_path)
    install_copy(tiny_pulled[0].home, ctx)
    return ctx


@pytest.fixture(scope="module")
def big_hub(hub_cache):
    cache, _ = hub_cache(BIG_REPO, sizes=BIG)
    return cache


@pytest.fixture(scope="module")
def wide_pair(checkpoint, tmp_path_factory):
    """A converted pair whose text width (96) differs from TINY's (64)."""
    from convert.pipeline import convert

    out = tmp_path_factory.mktemp("wide")
    r = convert(str(checkpoint(sizes=WIDE)), out, quant="F16", mmproj_type="F16")
    return Path(r.text_path), Path(r.mmproj_path)


# ------------------------------------------------------------------------------------ imp pull

def test_pull_repo_id_installs_pair_and_manifest(tiny_pulled):
    ctx, r = tiny_pulled
    folder = ctx.models / "imp-tiny-a"
    assert r.stdout == f"{folder}\n"  # stdout: the folder and nothing else
    assert r.stderr.strip()  # progress / info went to stderr
    check_entry(folder, "imp-tiny-a", "Q4_K_M", TINY_REPO)
    assert ctx.staging() == [] and ctx.visible_folders() == ["imp-tiny-a"]


def test_manifest_revision_is_the_resolved_commit(tiny_pulled, hub):
    ctx, _ = tiny_pulled
    assert load_manifest(ctx.models / "imp-tiny-a")["revision"] == hub[TINY_REPO]


def test_pull_records_repo_id_and_commit_as_source(tiny_pulled, hub):
    """Both GGUF files name the repo and the commit pulled (issue 13, defect 3: it was the
    Hugging Face cache folder)."""
    from gguf import GGUFReader

    ctx, _ = tiny_pulled
    folder = ctx.models / "imp-tiny-a"
    for name in ("imp-tiny-a-Q4_K_M.gguf", "imp-tiny-a-mmproj-F16.gguf"):
        assert GGUFReader(folder / name).fields["imp.source"].contents() == f"{TINY_REPO}@{hub[TINY_REPO]}"


def test_pull_repo_with_tower_folder_and_no_tokenizer_json(tmp_path, hub_cache, photo, tiny_pulled):
    """A repo shaped like Imp-v1.5-3B-196's (tower config in a folder, no vision_tower_config) with
    Phi-2-era tokenizer files (no tokenizer.json) installs, and answers as the plain repo does."""
    from gguf import GGUFReader

    repo = "MILVLG/imp-tiny-variant"
    cache, commit = hub_cache(repo, tower_config="folder", tokenizer_files="no-tokenizer-json")
    ctx = Ctx(tmp_path, hub=cache)
    r = assert_ok(ctx.run("pull", repo))
    folder = ctx.models / "imp-tiny-variant"
    assert r.stdout == f"{folder}\n"
    check_entry(folder, "imp-tiny-variant", "Q4_K_M", repo)
    assert GGUFReader(folder / "imp-tiny-variant-Q4_K_M.gguf").fields["imp.source"].contents() == f"{repo}@{commit}"
    plain = tiny_pulled[0]  # the same weights, plain files
    answer = ask_json(ctx, photo, "--model", "imp-tiny-variant")["answer"]
    assert answer.strip() and answer == ask_json(plain, photo, "--model", "imp-tiny-a")["answer"]


def test_pull_quant_q8_0_replaces_installed_q4(store_ctx, hub):
    ctx = Ctx(store_ctx.base, hub=hub["cache"])
    r = assert_ok(ctx.run("pull", TINY_REPO, "--quant", "Q8_0"))
    folder = ctx.models / "imp-tiny-a"
    assert r.stdout == f"{folder}\n"
    check_entry(folder, "imp-tiny-a", "Q8_0", TINY_REPO)  # exactly the Q8_0 pair: no stale Q4_K_M
    assert ctx.staging() == []


def test_pull_default_model(default_pulled):
    ctx, r = default_pulled
    folder = ctx.models / "imp-v1-3b"
    assert r.stdout == f"{folder}\n"
    check_entry(folder, "imp-v1-3b", "Q4_K_M", DEFAULT_REPO)
    assert ctx.installed() == ["imp-v1-3b"]


def test_pull_known_short_name(tmp_path, hub):
    ctx = Ctx(tmp_path, hub=hub["cache"])
    r = assert_ok(ctx.run("pull", "imp-v1-3b"))
    folder = ctx.models / "imp-v1-3b"
    assert r.stdout == f"{folder}\n"
    check_entry(folder, "imp-v1-3b", "Q4_K_M", DEFAULT_REPO)


def test_pull_twice_is_a_no_op_and_force_reinstalls(store_ctx, hub):
    ctx = Ctx(store_ctx.base, hub=hub["cache"])
    folder = ctx.models / "imp-tiny-a"
    before = snapshot(folder)
    r = assert_ok(ctx.run("pull", TINY_REPO))
    assert r.stdout == f"{folder}\n"
    assert "already installed" in r.stderr
    assert snapshot(folder) == before  # same inodes, mtimes, sizes

    r = assert_ok(ctx.run("pull", TINY_REPO, "--force"))
    assert r.stdout == f"{folder}\n"
    assert "already installed" not in r.stderr
    after = snapshot(folder)
    assert after.keys() == before.keys()
    assert all(after[n][0] != before[n][0] for n in after)  # every file written anew
    check_entry(folder, "imp-tiny-a", "Q4_K_M", TINY_REPO)
    assert ctx.staging() == []


def test_pull_other_repo_with_same_store_name_is_not_a_silent_no_op(store_ctx, hub, hub_cache):
    """someone-else/imp-tiny-a would be stored as imp-tiny-a, which MILVLG's holds: refused in one
    line naming the holder and the way out; the installed entry is untouched."""
    other = "someone-else/imp-tiny-a"
    hub_cache(other, seed=3)
    ctx = Ctx(store_ctx.base, hub=hub["cache"])
    before = tree(ctx.models / "imp-tiny-a")
    assert_one_line_error(ctx.run("pull", other), "imp-tiny-a", TINY_REPO, "imp models rm imp-tiny-a")
    assert tree(ctx.models / "imp-tiny-a") == before
    assert ctx.installed() == ["imp-tiny-a"] and ctx.staging() == []


@pytest.mark.parametrize("args, needle", [
    ([TINY_REPO], "HF_HUB_OFFLINE"),        # not in the (empty) hub cache, offline
    (["no-such-model"], "unknown model"),  # neither a known name nor a repo id
], ids=["offline-missing", "unknown-name"])
def test_pull_failure_leaves_nothing(tmp_path, args, needle):
    ctx = Ctx(tmp_path)
    assert_one_line_error(ctx.run("pull", *args), needle, after_progress=True)
    assert ctx.visible_folders() == [] and ctx.staging() == []
    assert ctx.installed() == []


def test_pull_bad_quant_leaves_nothing(tmp_path, hub):
    """An unknown quant type is a usage error (exit 2) from the option parser, before any pull."""
    ctx = Ctx(tmp_path, hub=hub["cache"])
    assert_usage_error(ctx.run("pull", TINY_REPO, "--quant", "Q5_0"), "Q5_0")
    assert ctx.visible_folders() == [] and ctx.staging() == []


# ------------------------------------------------------------------------------------ imp models

def test_models_list_and_json(store_ctx, default_pulled):
    ctx = store_ctx
    install_copy(default_pulled[0].home, ctx)
    r = assert_ok(ctx.run("models", "list"))
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert sorted(row[0] for row in rows) == ["imp-tiny-a", "imp-v1-3b"]
    by_name = {row[0]: row for row in rows}
    for name, source in (("imp-tiny-a", TINY_REPO), ("imp-v1-3b", DEFAULT_REPO)):
        row = by_name[name]
        assert len(row) == 5, row
        _, src, quant, size, path = row
        assert (src, quant, path) == (source, "Q4_K_M", str(ctx.models / name))
        assert size.split()[-1] in ("B", "kB", "MB", "GB") and float(size.split()[0]) > 0

    data = json.loads(assert_ok(ctx.run("models", "list", "--json")).stdout)
    assert sorted(d["name"] for d in data) == ["imp-tiny-a", "imp-v1-3b"]
    for d in data:
        folder = ctx.models / d["name"]
        m = load_manifest(folder)
        assert d["path"] == str(folder)
        assert d["source"] == m["source"]
        assert d["quant"] == "Q4_K_M" and d["mmproj_type"] == "F16"
        assert d["bytes"] == sum(p.stat().st_size for p in folder.glob("*.gguf"))
        assert d["created"] == m["created"]


def test_models_list_empty_store(tmp_path):
    ctx = Ctx(tmp_path)
    r = assert_ok(ctx.run("models", "list"))
    assert r.stdout == ""
    assert json.loads(assert_ok(ctx.run("models", "list", "--json")).stdout) == []


def test_models_path(store_ctx):
    r = assert_ok(store_ctx.run("models", "path", "imp-tiny-a"))
    assert r.stdout == f"{store_ctx.models / 'imp-tiny-a'}\n"
    assert_one_line_error(store_ctx.run("models", "path", "not-installed"), "not-installed")


def test_models_rm_yes(store_ctx):
    folder = store_ctx.models / "imp-tiny-a"
    assert_ok(store_ctx.run("models", "rm", "imp-tiny-a", "--yes"))
    assert not folder.exists()
    assert store_ctx.installed() == []
    assert_one_line_error(store_ctx.run("models", "rm", "imp-tiny-a", "--yes"), "imp-tiny-a")  # already gone


def test_models_rm_without_yes_and_no_tty_refuses(store_ctx):
    folder = store_ctx.models / "imp-tiny-a"
    before = tree(folder)
    assert_one_line_error(store_ctx.run("models", "rm", "imp-tiny-a"), "--yes")  # stdin is not a terminal
    assert tree(folder) == before
    assert store_ctx.installed() == ["imp-tiny-a"]


@pytest.mark.parametrize("args", [
    ["models", "rm"],                          # NAME missing
    ["models", "import", "x.gguf"],            # --name missing
    ["models", "nonsense"],
    ["pull", "--quant"],
], ids=["rm-no-name", "import-no-name", "unknown-subcommand", "pull-quant-no-value"])
def test_usage_errors_exit_2(tmp_path, args):
    ctx = Ctx(tmp_path)
    r = ctx.run(*args)
    assert r.returncode == 2, r
    assert r.stdout == "" and "Traceback" not in r.stderr
    assert ctx.visible_folders() == []


# ------------------------------------------------------------------------------------ imp models import

def test_import_pair_copies_and_answers(tmp_path, converted, photo):
    ctx = Ctx(tmp_path)
    src_text, src_mmproj = converted()
    work = tmp_path / "outside"
    work.mkdir()
    text, mmproj = work / src_text.name, work / src_mmproj.name
    shutil.copyfile(src_text, text)
    shutil.copyfile(src_mmproj, mmproj)
    r = assert_ok(ctx.run("models", "import", str(text), str(mmproj), "--name", "mine"))
    folder = ctx.models / "mine"
    assert r.stdout == f"{folder}\n"
    m = check_entry(folder, "mine", "F16", f"import:{text.resolve()}")
    assert m["text"]["sha256"] == sha256(text) and m["mmproj"]["sha256"] == sha256(mmproj)
    for p in folder.glob("*.gguf"):
        assert not p.is_symlink() and p.stat().st_nlink == 1  # copies, not links

    shutil.rmtree(work)  # the store does not depend on the originals
    out = ask_json(ctx, photo, "--model", "mine")
    assert out["model"]["text"] == str(folder / "mine-F16.gguf")
    assert out["model"]["mmproj"] == str(folder / "mine-mmproj-F16.gguf")
    assert isinstance(out["answer"], str)


def test_import_finds_mmproj_beside_text(tmp_path, converted):
    ctx = Ctx(tmp_path)
    text, _ = converted(quant="Q8_0")
    assert_ok(ctx.run("models", "import", str(text), "--name", "beside"))
    check_entry(ctx.models / "beside", "beside", "Q8_0", f"import:{text.resolve()}")


def test_import_existing_name_needs_force(store_ctx, converted):
    folder = store_ctx.models / "imp-tiny-a"
    before = tree(folder)
    text, mmproj = converted()
    assert_one_line_error(store_ctx.run("models", "import", str(text), str(mmproj), "--name", "imp-tiny-a"), "--force")
    assert tree(folder) == before
    assert_ok(store_ctx.run("models", "import", str(text), str(mmproj), "--name", "imp-tiny-a", "--force"))
    check_entry(folder, "imp-tiny-a", "F16", f"import:{text.resolve()}")
    assert store_ctx.staging() == []


@pytest.mark.parametrize("case", ["swapped", "text-twice", "not-gguf", "truncated", "width-mismatch"])
def test_import_bad_pair_fails_and_leaves_nothing(tmp_path, converted, wide_pair, photo, case):
    ctx = Ctx(tmp_path)
    text, mmproj = converted()
    if case == "swapped":
        args = [mmproj, text]
    elif case == "text-twice":
        args = [text, text]
    elif case == "not-gguf":
        fake = tmp_path / "fake-F16.gguf"
        shutil.copyfile(photo, fake)
        args = [fake, mmproj]
    elif case == "truncated":
        cut = tmp_path / "cut-F16.gguf"
        cut.write_bytes(text.read_bytes()[: text.stat().st_size // 2])
        args = [cut, mmproj]
    else:
        args = [wide_pair[0], mmproj]
    assert_one_line_error(ctx.run("models", "import", *map(str, args), "--name", "bad"))
    assert ctx.visible_folders() == [] and ctx.staging() == []
    assert ctx.installed() == []


# ------------------------------------------------------------------------------------ imp ask resolution

@pytest.mark.parametrize("how", ["flag", "env"])
def test_ask_store_name(store_ctx, photo, how):
    folder = store_ctx.models / "imp-tiny-a"
    if how == "flag":
        out = ask_json(store_ctx, photo, "--model", "imp-tiny-a")
    else:
        out = ask_json(store_ctx, photo, env={"IMP_MODEL": "imp-tiny-a"})
    assert out["model"]["text"] == str(folder / "imp-tiny-a-Q4_K_M.gguf")
    assert out["model"]["mmproj"] == str(folder / "imp-tiny-a-mmproj-F16.gguf")
    assert out["model"]["quant"] == "Q4_K_M"


def test_ask_default_model_when_installed(store_ctx, default_pulled, photo):
    install_copy(default_pulled[0].home, store_ctx)  # imp-tiny-a and imp-v1-3b; hub cache empty
    out = ask_json(store_ctx, photo)
    assert out["model"]["text"] == str(store_ctx.models / "imp-v1-3b" / "imp-v1-3b-Q4_K_M.gguf")


def test_ask_repo_id_in_hub_cache_is_pulled_first(tmp_path, hub, photo):
    ctx = Ctx(tmp_path, hub=hub["cache"], IMP_MODEL=TINY_REPO)
    first = assert_ok(ctx.run("ask", str(photo), QUESTION, "-n", "6"))
    assert "pull" in first.stderr
    assert first.stdout.strip()
    assert ctx.installed() == ["imp-tiny-a"]
    check_entry(ctx.models / "imp-tiny-a", "imp-tiny-a", "Q4_K_M", TINY_REPO)
    # Installed now: the same question answers the same, with no pull, even with no hub cache.
    again = assert_ok(ctx.run("ask", str(photo), QUESTION, "-n", "6", env={"HF_HUB_CACHE": str(tmp_path / "empty-hub")}))
    assert "pull" not in again.stderr
    assert first.stdout == again.stdout  # stdout carried the answer and nothing else


@pytest.mark.parametrize("env, spec", [({}, "imp-v1-3b"), ({"IMP_MODEL": TINY_REPO}, TINY_REPO)],
                         ids=["default", "repo-id"])
def test_ask_offline_and_missing_says_what_to_run(tmp_path, photo, env, spec):
    ctx = Ctx(tmp_path, **env)
    assert_one_line_error(ctx.run("ask", str(photo), QUESTION), f"imp pull {spec}")
    assert ctx.visible_folders() == [] and ctx.staging() == []


# ------------------------------------------------------------------------------------ hostile names

def _fake_model_folder(folder: Path, template: Path) -> dict:
    """A folder that looks like a real store entry (valid pair + manifest); returns its tree."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in template.iterdir():
        shutil.copyfile(p, folder / p.name)
    return tree(folder)


def test_rm_refuses_names_leading_outside(store_ctx):
    entry = store_ctx.models / "imp-tiny-a"
    victim = _fake_model_folder(store_ctx.home / "victim", entry)  # beside the store
    absolute = _fake_model_folder(store_ctx.base / "x", entry)
    store_before = tree(store_ctx.models)
    for name in ("../victim", str(store_ctx.base / "x"), "..", "."):
        assert_one_line_error(store_ctx.run("models", "rm", name, "--yes"))
    assert tree(store_ctx.home / "victim") == victim
    assert tree(store_ctx.base / "x") == absolute
    assert tree(store_ctx.models) == store_before


def test_path_refuses_dotdot(store_ctx):
    # $IMP_HOME/models/.. is IMP_HOME: give it a manifest so that reading it would "work"
    _fake_model_folder(store_ctx.home, store_ctx.models / "imp-tiny-a")
    for name in ("..", str(store_ctx.models / "imp-tiny-a")):
        assert_one_line_error(store_ctx.run("models", "path", name))


def test_symlinked_entry_pointing_outside_is_refused(store_ctx, photo):
    target = store_ctx.base / "outside-target"
    contents = _fake_model_folder(target, store_ctx.models / "imp-tiny-a")  # a usable model
    (store_ctx.models / "evil").symlink_to(target, target_is_directory=True)

    assert_one_line_error(store_ctx.run("models", "rm", "evil", "--yes"))
    assert tree(target) == contents
    assert_one_line_error(store_ctx.run("ask", str(photo), QUESTION, "-n", "4", "--model", "evil"))
    assert "evil" not in store_ctx.installed()
    assert tree(target) == contents


def test_import_refuses_names_leading_outside(tmp_path, converted):
    ctx = Ctx(tmp_path)
    text, mmproj = converted()
    for name in ("../x", str(tmp_path / "abs"), ".."):
        assert_one_line_error(ctx.run("models", "import", str(text), str(mmproj), "--name", name))
    assert not (ctx.home / "x").exists() and not (tmp_path / "abs").exists()
    assert ctx.visible_folders() == [] and ctx.staging() == []


# ------------------------------------------------------------------------------------ interrupted pulls

class Running:
    """An `imp pull` in the background whose stderr is collected line by line."""

    def __init__(self, ctx: Ctx, *args: str, code: str | None = None, env: dict | None = None):
        self.proc = ctx.popen("pull", *args, code=code, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    def wait_for(self, condition, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                self.finish()
                pytest.fail(f"imp pull ended (exit {self.proc.returncode}) before {what}:\n{''.join(self.lines)}")
            if time.monotonic() > deadline:
                self.proc.kill()
                self.finish()
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.005)

    def said(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def finish(self) -> tuple[int, str, str]:
        rc = self.proc.wait(timeout=120)
        self._reader.join(timeout=10)
        return rc, self.proc.stdout.read(), "".join(self.lines)


def test_sigkill_mid_pull_installs_nothing_and_rerun_cleans_up(tmp_path, big_hub):
    ctx = Ctx(tmp_path, hub=big_hub)
    args = (BIG_REPO, "--quant", "Q8_0")
    run = Running(ctx, *args)
    run.wait_for(lambda: ctx.staging(), "a staging folder appears")
    run.proc.kill()
    rc, out, _ = run.finish()
    assert rc == -signal.SIGKILL and out == ""
    stale = ctx.staging()
    assert stale, "SIGKILL leaves the staging folder behind (nothing else can remove it)"
    assert ctx.visible_folders() == []
    assert assert_ok(ctx.run("models", "list")).stdout == ""
    assert ctx.installed() == []
    assert_one_line_error(ctx.run("models", "path", "imp-big-test"))

    r = assert_ok(ctx.run("pull", *args))
    folder = ctx.models / "imp-big-test"
    assert r.stdout == f"{folder}\n"
    assert ctx.staging() == []  # the stale staging folder of the dead pull was removed
    assert ctx.installed() == ["imp-big-test"]
    check_entry(folder, "imp-big-test", "Q8_0", BIG_REPO)

    # A killed --force re-pull leaves the installed model as it was.
    before = tree(folder)
    run = Running(ctx, *args, "--force")
    run.wait_for(lambda: ctx.staging(), "a staging folder appears")
    run.proc.kill()
    assert run.finish()[0] == -signal.SIGKILL
    assert tree(folder) == before
    assert ctx.installed() == ["imp-big-test"]
    check_entry(folder, "imp-big-test", "Q8_0", BIG_REPO)


# Python code that runs the CLI with llama.cpp's quantize call (in its worker thread) held: it says
# so on stderr and waits for ever, so a signal the test sends lands in the quantize phase.
_HELD_IN_QUANTIZE = """
import sys, threading
import convert.native
from imp_cli.app import main

def held(*args, **kwargs):
    print("quantize call held", file=sys.stderr, flush=True)
    threading.Event().wait()

convert.native.quantize_model = held
sys.argv = ["imp", *sys.argv[1:]]
main()
"""


def assert_interrupted_cleanly(run: Running, ctx: Ctx) -> None:
    """Ctrl-C now: exit 130, no traceback, nothing installed, no staging folder left."""
    run.proc.send_signal(signal.SIGINT)
    rc, out, err = run.finish()
    assert rc == 130, err
    assert out == "" and "Traceback" not in err
    assert ctx.staging() == [] and ctx.visible_folders() == []
    assert ctx.installed() == []


def test_sigint_mid_write_exits_130_and_cleans_up(tmp_path, big_hub):
    ctx = Ctx(tmp_path, hub=big_hub)
    run = Running(ctx, BIG_REPO, "--quant", "Q8_0")
    # the converter is writing GGUF files inside the staging folder (~100 MB: seconds)
    run.wait_for(lambda: any(any(s.glob("*")) for s in ctx.staging()), "files in the staging folder")
    assert_interrupted_cleanly(run, ctx)


def test_sigint_mid_quantize_exits_130_and_cleans_up(tmp_path, hub):
    """The interrupt lands while llama.cpp's quantize call runs (held there by the test, not
    raced by a sleep): the main thread, waiting for the worker, stops at once and cleans up."""
    ctx = Ctx(tmp_path, hub=hub["cache"])
    run = Running(ctx, TINY_REPO, "--quant", "Q8_0", code=_HELD_IN_QUANTIZE)
    run.wait_for(lambda: run.said("quantize call held"), "the quantize call")
    assert ctx.staging()  # mid-pull: the staging folder is there
    assert_interrupted_cleanly(run, ctx)


# ------------------------------------------------------------------------------------ concurrent pulls

# Python code that runs the CLI with the conversion counted (one line per conversion, the pid, in
# $IMP_TEST_CONVERSIONS) and, when $IMP_TEST_HOLD names a file, held until that file exists.
_COUNTED_PULL = """
import os, sys, time
from pathlib import Path
import convert.pipeline
from imp_cli.app import main

real = convert.pipeline.convert

def counted(*args, **kwargs):
    with open(os.environ["IMP_TEST_CONVERSIONS"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    print("converting", file=sys.stderr, flush=True)
    hold = os.environ.get("IMP_TEST_HOLD")
    while hold and not Path(hold).exists():
        time.sleep(0.01)
    return real(*args, **kwargs)

convert.pipeline.convert = counted
sys.argv = ["imp", *sys.argv[1:]]
main()
"""


def conversions(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def waiting_line(pid: int) -> str:
    return f"waiting for another imp pull of imp-tiny-a (pid {pid})"


def test_concurrent_pulls_convert_once(tmp_path, hub):
    """Three `imp pull` of one model at once: one converts (the test holds it until the other
    two wait), the two others wait for it and use its result; all three succeed."""
    ctx = Ctx(tmp_path, hub=hub["cache"])
    count, go = tmp_path / "conversions", tmp_path / "go"
    env = {"IMP_TEST_CONVERSIONS": str(count), "IMP_TEST_HOLD": str(go)}
    first = Running(ctx, TINY_REPO, "--no-tune", code=_COUNTED_PULL, env=env)
    first.wait_for(lambda: first.said("converting"), "the first pull converting")
    others = [Running(ctx, TINY_REPO, "--no-tune", code=_COUNTED_PULL, env=env) for _ in range(2)]
    for other in others:
        other.wait_for(lambda other=other: other.said(waiting_line(first.proc.pid)), "a second pull waiting")
    go.touch()
    results = [run.finish() for run in (first, *others)]
    folder = ctx.models / "imp-tiny-a"
    for rc, out, err in results:
        assert rc == 0, err
        assert out == f"{folder}\n"
    assert conversions(count) == [first.proc.pid]
    for _, _, err in results[1:]:
        assert "was installed by the other pull" in err
    assert ctx.installed() == ["imp-tiny-a"]
    assert ctx.staging() == []
    check_entry(folder, "imp-tiny-a", "Q4_K_M", TINY_REPO)


def test_a_killed_holder_leaves_no_lock_and_a_waiter_takes_over(tmp_path, hub):
    ctx = Ctx(tmp_path, hub=hub["cache"])
    count = tmp_path / "conversions"
    first = Running(ctx, TINY_REPO, "--no-tune", code=_COUNTED_PULL,
                    env={"IMP_TEST_CONVERSIONS": str(count), "IMP_TEST_HOLD": str(tmp_path / "never")})
    first.wait_for(lambda: first.said("converting"), "the first pull converting")
    second = Running(ctx, TINY_REPO, "--no-tune", code=_COUNTED_PULL, env={"IMP_TEST_CONVERSIONS": str(count)})
    second.wait_for(lambda: second.said(waiting_line(first.proc.pid)), "the second pull waiting")
    first.proc.kill()
    assert first.finish()[0] == -signal.SIGKILL
    rc, out, err = second.finish()
    assert rc == 0, err
    folder = ctx.models / "imp-tiny-a"
    assert out == f"{folder}\n"
    assert conversions(count) == [first.proc.pid, second.proc.pid]  # the waiter converted it
    assert ctx.installed() == ["imp-tiny-a"] and ctx.staging() == []  # the dead one's staging removed
    check_entry(folder, "imp-tiny-a", "Q4_K_M", TINY_REPO)


def test_ctrl_c_of_a_waiter_leaves_the_holder_alone(tmp_path, hub):
    ctx = Ctx(tmp_path, hub=hub["cache"])
    count, go = tmp_path / "conversions", tmp_path / "go"
    env = {"IMP_TEST_CONVERSIONS": str(count), "IMP_TEST_HOLD": str(go)}
    first = Running(ctx, TINY_REPO, "--no-tune", code=_COUNTED_PULL, env=env)
    first.wait_for(lambda: first.said("converting"), "the first pull converting")
    second = Running(ctx, TINY_REPO, "--no-tune", code=_COUNTED_PULL, env=env)
    second.wait_for(lambda: second.said(waiting_line(first.proc.pid)), "the second pull waiting")
    second.proc.send_signal(signal.SIGINT)
    rc, out, err = second.finish()
    assert rc == 130 and out == "" and "Traceback" not in err
    go.touch()
    rc, out, err = first.finish()
    assert rc == 0, err
    assert conversions(count) == [first.proc.pid]
    assert ctx.installed() == ["imp-tiny-a"]


_SIGINT_AFTER_STAGING = """
import os, signal, sys
from pathlib import Path
import convert.pipeline
from imp_cli import store
from imp_cli.app import main

enter, staged = store.Install.__enter__, []
def enter_and_record(self):
    entered = enter(self)
    staged.append(Path(self.staging))
    print("staging " + str(self.staging), file=sys.stderr, flush=True)
    return entered

def interrupted_convert(*args, **kwargs):  # the first step inside `with Install(...)`
    assert staged and staged[0].is_dir()  # the interrupt comes with the staging folder in place
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
    raise AssertionError("SIGINT did not interrupt")

store.Install.__enter__ = enter_and_record
convert.pipeline.convert = interrupted_convert
sys.argv = ["imp", *sys.argv[1:]]
main()
"""


def test_sigint_just_after_staging_is_created_still_cleans_up(tmp_path, hub):
    ctx = Ctx(tmp_path, hub=hub["cache"])
    r = ctx.python(_SIGINT_AFTER_STAGING, "pull", TINY_REPO)
    assert r.returncode == 130, r.stderr
    staged = [Path(line.split(" ", 1)[1]) for line in r.stderr.splitlines() if line.startswith("staging ")]
    assert len(staged) == 1 and staged[0].parent == ctx.models, r.stderr  # the hook ran
    assert not staged[0].exists()  # and the folder it saw was removed
    assert ctx.visible_folders() == []
    assert ctx.staging() == []


_LITTLE_DISK = """
import shutil, sys
from collections import namedtuple
from imp_cli.app import main
real = shutil.disk_usage
shutil.disk_usage = lambda p: namedtuple("usage", "total used free")(10**12, 10**12 - 1000, 1000)
sys.argv = ["imp", *sys.argv[1:]]
main()
"""


def test_pull_checks_free_disk_space_first(tmp_path, hub):
    """A disk too small for the conversion is refused before any file is written."""
    ctx = Ctx(tmp_path, hub=hub["cache"])
    r = ctx.python(_LITTLE_DISK, "pull", TINY_REPO)
    line = assert_one_line_error(r, after_progress=True)
    assert "not enough disk space" in line and "GB free" in line
    assert ctx.visible_folders() == [] and ctx.staging() == []
