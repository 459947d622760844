#!/usr/bin/env bash
# make test-arm, step 1: an emulated aarch64 machine for imp's tests, made once into .arm/ (ignored).
#
#   .arm/root/          an arm64 Debian bookworm root (mmdebstrap), entered with plain `chroot`:
#                       qemu-user-static's binfmt_misc entry (flags PF) runs its binaries
#   .arm/root/opt/venv  its Python 3.11 venv: imp's dependencies as aarch64 wheels downloaded on the
#                       host (pip inside the root cannot see the host's package-index settings),
#                       llama-cpp-python's Python package from its sdist (PyPI has no aarch64 wheel)
#   .arm/root/opt/llama/LEVEL/   llama.cpp, the copy vendored in that sdist, cross-compiled on the
#                       host (compiling under emulation would take hours), one folder per CPU
#                       feature level (see LEVELS below)
#
# Every step leaves a stamp in .arm/stamps and is skipped when its stamp is there; a failing step
# exits non-zero (CI must fail loudly if the emulator cannot be set up, never skip).
# Needs root (apt-get, mount, chroot). Env: PYTHON (the host venv's python, to read the installed
# llama-cpp-python version), ARM_DIR (default .arm), JOBS (default nproc).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
ARM=${ARM_DIR:-$REPO/.arm}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
JOBS=${JOBS:-$(nproc)}
STAMPS=$ARM/stamps
ROOT=$ARM/root
mkdir -p "$STAMPS"

log() { printf '[arm setup %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { printf '[arm setup] FAILED: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (apt-get, binfmt_misc, chroot); CI runs as root"
[ "$(uname -m)" = x86_64 ] || die "the emulated setup is written for an x86-64 host (uname -m: $(uname -m))"

# CPU feature levels: name, -march for ggml's CPU backend, the qemu CPU that runs it.
#   neon     ARMv8.0 + NEON (ASIMD) only      a Raspberry Pi 4 (Cortex-A72)
#   dotprod  ARMv8.2 + dotprod + fp16         a Pi 5 (Cortex-A76), Graviton 2 (Neoverse N1)
#   i8mm     ARMv8.2 + dotprod + fp16 + i8mm  Graviton 3 / 4, Apple M2+, Snapdragon 8 Gen 3 class
# One build per level, not GGML_CPU_ALL_VARIANTS: that needs GGML_BACKEND_DL, and libllama never
# loads backends itself (llama.cpp's own tools call ggml_backend_load_all(); llama-cpp-python does
# not), so imp would find no CPU backend; a user's own `pip install llama-cpp-python` on a Pi is a
# native build for one CPU too. Only ggml's CPU backend differs between levels: libllama, libmtmd and
# libggml-base are built once (baseline ARMv8.0) and each level adds its own libggml-cpu.so.
LEVELS=(
  "neon     armv8-a                      cortex-a72"
  "dotprod  armv8.2-a+dotprod+fp16       neoverse-n1"
  "i8mm     armv8.2-a+dotprod+fp16+i8mm  max"
)

step_done() { [ -e "$STAMPS/$1" ]; }
stamp() { touch "$STAMPS/$1"; }

ONLY=${1:-}   # `setup.sh llama`: only the sdist and the cross-compile (they need no root filesystem)

# 1. host packages
if [ "$ONLY" != llama ] && ! step_done apt; then
  log "apt-get install qemu-user-static, the aarch64 cross compilers, mmdebstrap"
  export DEBIAN_FRONTEND=noninteractive
  # other apt users (another installer) hold the lock for a while: wait, don't fail
  apt-get -o DPkg::Lock::Timeout=900 update -q >/dev/null
  apt-get -o DPkg::Lock::Timeout=900 install -y -q --no-install-recommends \
    qemu-user-static binfmt-support gcc-aarch64-linux-gnu g++-aarch64-linux-gnu mmdebstrap \
    cmake make >/dev/null
  stamp apt
fi

# 2. binfmt_misc: a container or a fresh VM may not have it mounted or qemu registered
if [ "$ONLY" != llama ]; then
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || die "cannot mount binfmt_misc"
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  update-binfmts --enable qemu-aarch64 2>/dev/null || true
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  # the entry Debian ships, written by hand (flags F: the kernel keeps the interpreter open, so it
  # works inside the chroot)
  conf=$(sed -n 's/^\(:qemu-aarch64:.*\)$/\1/p' /usr/lib/binfmt.d/qemu-aarch64.conf 2>/dev/null || true)
  [ -n "$conf" ] && echo "$conf" > /proc/sys/fs/binfmt_misc/register || true
fi
grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
  || die "qemu-aarch64 is not registered with binfmt_misc"

# 3. the arm64 root
if ! step_done root; then
  log "mmdebstrap an arm64 bookworm root (about 2 minutes)"
  rm -rf "$ROOT" "$ROOT.tmp"
  sources=/etc/apt/sources.list.d/debian.sources
  [ -e "$sources" ] || sources="deb http://deb.debian.org/debian bookworm main"
  mmdebstrap --quiet --arch=arm64 --variant=apt --include=python3,python3-venv,libgomp1 \
    bookworm "$ROOT.tmp" "$sources"
  mv "$ROOT.tmp" "$ROOT"
  stamp root
fi
[ "$(chroot "$ROOT" /usr/bin/uname -m)" = aarch64 ] || die "the arm64 root does not run (uname -m in it is not aarch64)"
fi

# 4. the llama-cpp-python sdist at the host's installed version
LCP_VERSION=${LCP_VERSION:-$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')}
SRC=$ARM/src/llama_cpp_python-$LCP_VERSION
if ! step_done "sdist-$LCP_VERSION"; then
  log "pip download llama-cpp-python==$LCP_VERSION (sdist)"
  mkdir -p "$ARM/dl" "$ARM/src"
  [ -s "$ARM/dl/llama_cpp_python-$LCP_VERSION.tar.gz" ] ||
    "$PYTHON" -m pip download --quiet --no-deps --no-binary=:all: "llama-cpp-python==$LCP_VERSION" -d "$ARM/dl"
  rm -rf "$SRC"
  tar -xzf "$ARM/dl/llama_cpp_python-$LCP_VERSION.tar.gz" -C "$ARM/src"
  stamp "sdist-$LCP_VERSION"
fi

# 5. cross-compile llama.cpp
cmake_cross() {  # builddir arch target...
  local dir=$1 arch=$2; shift 2
  cmake -S "$SRC/vendor/llama.cpp" -B "$dir" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
    -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
    -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH="$arch" -DBUILD_SHARED_LIBS=ON -DGGML_OPENMP=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >"$dir.cmake.log" 2>&1 || { tail -30 "$dir.cmake.log"; die "cmake $dir"; }
  nice cmake --build "$dir" -j "$JOBS" --target "$@" >"$dir.build.log" 2>&1 || { tail -30 "$dir.build.log"; die "build $dir"; }
}
BUILD=$ARM/build-$LCP_VERSION
# the levels to build: ARM_LEVELS as `make test-arm` passes it (default neon,i8mm; "all")
WANT=${ARM_LEVELS:-neon,i8mm}
[ "$WANT" = all ] && WANT=neon,dotprod,i8mm
if ! step_done "llama-$LCP_VERSION-base"; then
  mkdir -p "$BUILD"
  read -r _ base_arch _ <<<"${LEVELS[0]}"
  log "cross-compile llama.cpp $LCP_VERSION for aarch64: libllama, libmtmd ($base_arch; a few minutes)"
  cmake_cross "$BUILD/base" "$base_arch" llama mtmd
  stamp "llama-$LCP_VERSION-base"
fi
for lv in "${LEVELS[@]}"; do
  read -r name arch _ <<<"$lv"
  case ",$WANT," in *",$name,"*) ;; *) continue ;; esac
  if ! step_done "llama-$LCP_VERSION-$name"; then
    if [ "$name" != "${LEVELS[0]%% *}" ]; then
      log "cross-compile ggml's CPU backend for $name ($arch)"
      cmake_cross "$BUILD/$name" "$arch" ggml-cpu
    fi
    out=$BUILD/out/$name
    rm -rf "$out"; mkdir -p "$out"
    cp -a "$BUILD"/base/bin/lib*.so* "$out"/
    [ "$name" = "${LEVELS[0]%% *}" ] || cp -a "$BUILD/$name"/bin/libggml-cpu.so* "$out"/
    echo "$name $arch" > "$out/LEVEL"
    stamp "llama-$LCP_VERSION-$name"
  fi
done
[ "$ONLY" = llama ] && exit 0
rm -rf "$ROOT/opt/llama"; mkdir -p "$ROOT/opt/llama"; cp -a "$BUILD/out/." "$ROOT/opt/llama/"

# 6. the root's Python: aarch64 wheels fetched on the host, installed offline
WHEELS=$ARM/wheels
REQS=$REPO/tests/arm/requirements.txt
reqs_sum=$(sha1sum "$REQS" | cut -c1-12)
if ! step_done "venv-$reqs_sum"; then
  log "pip download aarch64 wheels for $(grep -c '^[a-z]' "$REQS") requirements"
  mkdir -p "$WHEELS"
  # the same versions as the host's venv, where it has them (the x86 side is the reference)
  "$PYTHON" -m pip freeze 2>/dev/null | grep -E '^[A-Za-z0-9_.-]+==' | grep -viE '^(imp|llama.cpp.python)==' \
    > "$ARM/constraints.txt" || true
  "$PYTHON" -m pip download --quiet --only-binary=:all: --platform manylinux2014_aarch64 \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform linux_aarch64 \
    --python-version 3.11 --implementation cp -d "$WHEELS" -r "$REQS" -c "$ARM/constraints.txt"
  # pure-Python sdists among the dependencies would need a build under emulation: none expected
  log "create the root's venv and install offline (under emulation)"
  rm -rf "$ROOT/opt/venv"
  mkdir -p "$ROOT/opt/wheels"
  rm -f "$ROOT"/opt/wheels/*; cp "$WHEELS"/* "$ROOT/opt/wheels/"
  cp "$REQS" "$ROOT/opt/requirements.txt"
  chroot "$ROOT" /usr/bin/python3 -m venv /opt/venv
  chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin QEMU_CPU=max \
    /opt/venv/bin/pip install --quiet --no-index --find-links /opt/wheels -r /opt/requirements.txt
  stamp "venv-$reqs_sum"
fi
# llama-cpp-python's Python package (the loader finds the libraries through LLAMA_CPP_LIB_PATH,
# MTMD_CPP_LIB and LD_LIBRARY_PATH; tests/arm/run.sh sets them per level)
site=$(ls -d "$ROOT"/opt/venv/lib/python3*/site-packages)
if [ ! -e "$site/llama_cpp/.version-$LCP_VERSION" ]; then
  rm -rf "$site/llama_cpp" "$site"/llama_cpp_python-*.dist-info
  cp -a "$SRC/llama_cpp" "$site/llama_cpp"
  mkdir -p "$site/llama_cpp/lib"
  di="$site/llama_cpp_python-$LCP_VERSION.dist-info"; mkdir -p "$di"
  printf 'Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: %s\n' "$LCP_VERSION" > "$di/METADATA"
  : > "$di/RECORD"
  touch "$site/llama_cpp/.version-$LCP_VERSION"
fi
# `imp`: the repository is mounted at /imp and put on PYTHONPATH when tests run (tests/arm/emu.py)
printf '#!/opt/venv/bin/python\nimport sys\nfrom imp_cli.app import main\nsys.exit(main())\n' > "$ROOT/opt/venv/bin/imp"
chmod +x "$ROOT/opt/venv/bin/imp"
log "ready: $ROOT (llama.cpp levels: $(ls "$ROOT/opt/llama" | tr "\n" " "))"
