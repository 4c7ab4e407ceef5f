"""Build sshpump's patched libssh2 (called by setup.py's build_ext).

ssh2-python's wheel bundles libssh2 1.11.1 built at -O0, and that libssh2
encrypts one cipher block per OpenSSL call (see
``libssh2-whole-packet-crypt.patch``; ``libssh2-channel-abort.patch`` adds
a close that tells the server the stream was cut, and
``libssh2-keepalive-replies.patch`` keeps keepalive replies from being read
as a remote forward's answer). We build the same libssh2 source,
patched and optimised, as a drop-in for the bundled copy:

- source: the ssh2-python 1.2.0.post1 sdist (the exact libssh2 its wheel
  embeds), downloaded from PyPI at build time and checked against a pinned
  sha256, or read from ``SSHPUMP_SSH2_PYTHON_SDIST`` (offline builds; the
  same check applies). No libssh2 source lives in this repository.
- soname: the wheel's hashed one (``libssh2-<hash>.so.1.0.1``), so that
  ssh2-python's extension modules and our pump bind to it once it is loaded.
- libcrypto: the copy the wheel bundles (one OpenSSL in the process); only
  OpenSSL's headers come from the system (libssl-dev).
- configuration: what ssh2-python's own CMake call selects (OpenSSL backend,
  zlib compression), but -O2 with NDEBUG.

Also usable by hand: ``python csrc/build_libssh2.py OUTDIR``.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
# Applied in this order; each is written so that libssh2 upstream could take it.
PATCHES = [os.path.join(HERE, name) for name in (
    "libssh2-whole-packet-crypt.patch",   # one OpenSSL call per packet, several packets per recv()
    "libssh2-channel-abort.patch",        # libssh2_channel_abort(): CLOSE without EOF
    "libssh2-keepalive-replies.patch",    # keepalive replies dropped: forward_listen gets its own reply
)]
IDENT_SOURCE = os.path.join(HERE, "libssh2_ident.c")

SDIST_NAME = "ssh2_python-1.2.0.post1.tar.gz"
SDIST_SHA256 = "f981465ace35f96e0935b36091b61d17689d9e0e4f29b33a50882b92c45ddcbd"
# PyPI's simple index (PEP 691 JSON), the interface pip itself uses.
SDIST_INDEX = "https://pypi.org/simple/ssh2-python/"
SDIST_ENV = "SSHPUMP_SSH2_PYTHON_SDIST"
LIBSSH2_DIR = "ssh2_python-1.2.0.post1/libssh2/"
BUILD_INFO = "build-info.json"

# What libssh2's CMake checks find on Linux/glibc (libssh2_config_cmake.h.in).
CONFIG_H = """\
/* libssh2_config.h for Linux/glibc, written by sshpump's build_libssh2.py */
#define HAVE_UNISTD_H 1
#define HAVE_INTTYPES_H 1
#define HAVE_SYS_SELECT_H 1
#define HAVE_SYS_UIO_H 1
#define HAVE_SYS_SOCKET_H 1
#define HAVE_SYS_IOCTL_H 1
#define HAVE_SYS_TIME_H 1
#define HAVE_SYS_UN_H 1
#define HAVE_ARPA_INET_H 1
#define HAVE_NETINET_IN_H 1
#define HAVE_GETTIMEOFDAY 1
#define HAVE_STRTOLL 1
#define HAVE_SNPRINTF 1
#define HAVE_EXPLICIT_BZERO 1
#define HAVE_POLL 1
#define HAVE_SELECT 1
#define HAVE_O_NONBLOCK 1
"""

DEFINES = [
    "-DHAVE_CONFIG_H",
    "-DLIBSSH2_OPENSSL",
    "-DLIBSSH2_HAVE_ZLIB",
    "-DNDEBUG",
    '-DLIBSSH2_API=__attribute__((__visibility__("default")))',
]
CFLAGS = ["-O2", "-fPIC", "-fvisibility=hidden", "-std=gnu99", "-Wall"]

# libssh2's own warning set for gcc >= 10 (cmake/PickyWarnings.cmake).
PICKY_WARNINGS = """
-W -pedantic -Wbad-function-cast -Wconversion -Winline -Wmissing-declarations
-Wmissing-prototypes -Wnested-externs -Wno-long-long -Wno-multichar
-Wpointer-arith -Wshadow -Wsign-compare -Wundef -Wunused -Wwrite-strings
-Waddress -Wattributes -Wcast-align -Wdeclaration-after-statement
-Wdiv-by-zero -Wempty-body -Wendif-labels -Wfloat-equal -Wformat-security
-Wignored-qualifiers -Wmissing-field-initializers -Wmissing-noreturn
-Wno-format-nonliteral -Wno-system-headers -Wold-style-definition
-Wredundant-decls -Wsign-conversion -Wstrict-prototypes -Wtype-limits
-Wunreachable-code -Wunused-macros -Wunused-parameter -Wvla -Wclobbered
-Wmissing-parameter-type -Wold-style-declaration -Wstrict-aliasing=3
-Wtrampolines -Wformat=2 -Warray-bounds=2 -ftree-vrp -Wduplicated-cond
-Wnull-dereference -fdelete-null-pointer-checks -Wshift-negative-value
-Wshift-overflow=2 -Walloc-zero -Wduplicated-branches -Wformat-overflow=2
-Wformat-truncation=2 -Wimplicit-fallthrough -Wrestrict -Warith-conversion
-Wdouble-promotion -Wenum-conversion -Wpragmas -Wunused-const-variable
""".split()


class BuildError(Exception):
    """A build step failed; the message says what to install or do."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sshpump", SDIST_NAME)


def _download() -> bytes:
    try:
        req = urllib.request.Request(SDIST_INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            meta = json.load(r)
        url = next(f["url"] for f in meta["files"] if f["filename"] == SDIST_NAME)
        with urllib.request.urlopen(url, timeout=300) as r:
            return r.read()
    except (OSError, ValueError, StopIteration, KeyError) as e:
        raise BuildError(
            f"cannot download the ssh2-python 1.2.0.post1 sdist from PyPI ({e}); "
            f"offline, set {SDIST_ENV}=/path/to/{SDIST_NAME} "
            "(pip download --no-binary :all: --no-deps ssh2-python==1.2.0.post1)"
        ) from e


def sdist_bytes() -> bytes:
    """The pinned sdist: from SSHPUMP_SSH2_PYTHON_SDIST, the cache, or PyPI."""
    given = os.environ.get(SDIST_ENV)
    if given:
        try:
            with open(given, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BuildError(f"{SDIST_ENV}={given}: {e.strerror}") from e
        origin = given
    else:
        cached = _cache_path()
        if os.path.exists(cached):
            with open(cached, "rb") as f:
                data = f.read()
            if sha256(data) == SDIST_SHA256:
                return data
        data = _download()
        origin = SDIST_INDEX
    if sha256(data) != SDIST_SHA256:
        raise BuildError(
            f"{origin}: sha256 {sha256(data)} is not the pinned {SDIST_SHA256} "
            f"of {SDIST_NAME}; refusing to build from it"
        )
    if not given:
        os.makedirs(os.path.dirname(_cache_path()), exist_ok=True)
        with open(_cache_path() + ".tmp", "wb") as f:
            f.write(data)
        os.replace(_cache_path() + ".tmp", _cache_path())
    return data


def extract_libssh2(data: bytes, dest: str) -> str:
    """Unpack libssh2's include/ and src/ from the sdist into dest/libssh2."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = [
            m for m in tar.getmembers()
            if m.isfile() and m.name.startswith((LIBSSH2_DIR + "src/", LIBSSH2_DIR + "include/"))
        ]
        for m in members:
            m.name = m.name[len("ssh2_python-1.2.0.post1/"):]
        tar.extractall(dest, members=members, filter="data")
    return os.path.join(dest, "libssh2")


def apply_patches(root: str) -> None:
    if not shutil.which("patch"):
        raise BuildError("the 'patch' program is missing: apt-get install patch")
    for path in PATCHES:
        r = subprocess.run(
            ["patch", "-p1", "--batch", "--forward", "-i", path],
            cwd=root, capture_output=True, text=True,
        )
        if r.returncode != 0:
            raise BuildError(f"{os.path.basename(path)} does not apply: {r.stdout.strip()} {r.stderr.strip()}")


def wheel_libs() -> tuple[str, str]:
    """(bundled libssh2, bundled libcrypto) of the installed ssh2-python wheel."""
    import importlib.util

    spec = importlib.util.find_spec("ssh2")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("ssh2-python is not installed in the build environment (pip install ssh2-python==1.2.0.post1)")
    libs = os.path.join(os.path.dirname(list(spec.submodule_search_locations)[0]), "ssh2_python.libs")
    ssh2 = sorted(glob.glob(os.path.join(libs, "libssh2-*.so*")))
    crypto = sorted(glob.glob(os.path.join(libs, "libcrypto-*.so*")))
    if not ssh2 or not crypto:
        raise BuildError(f"no bundled libssh2/libcrypto in {libs}: sshpump needs ssh2-python's manylinux wheel")
    return ssh2[0], crypto[0]


def _check_tools() -> None:
    if not shutil.which(os.environ.get("CC", "gcc")):
        raise BuildError("no C compiler: apt-get install gcc")
    for header, package in (("openssl/evp.h", "libssl-dev"), ("zlib.h", "zlib1g-dev")):
        r = subprocess.run([os.environ.get("CC", "gcc"), "-E", "-x", "c", "-"],
                           input=f"#include <{header}>\n", capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"<{header}> not found: apt-get install {package}")


def sources(root: str) -> list[str]:
    """libssh2's CSOURCES, read from its own src/Makefile.inc."""
    text = open(os.path.join(root, "src", "Makefile.inc")).read()
    block = text.split("CSOURCES =", 1)[1].split("\n\n", 1)[0]
    return [os.path.join(root, "src", w) for w in block.replace("\\", " ").split() if w.endswith(".c")]


def compile_args(root: str, extra: list[str] = ()) -> list[str]:
    return [os.environ.get("CC", "gcc"), *CFLAGS, *DEFINES, *extra,
            "-I", os.path.join(root, "include"), "-I", os.path.join(root, "src")]


def compile_all(root: str, objdir: str, extra: list[str] = ()) -> list[str]:
    """Compile every source in parallel; returns the object files."""
    with open(os.path.join(root, "src", "libssh2_config.h"), "w") as f:
        f.write(CONFIG_H)
    jobs, objs = [], []
    for src in sources(root) + [IDENT_SOURCE]:
        obj = os.path.join(objdir, os.path.basename(src)[:-2] + ".o")
        objs.append(obj)
        jobs.append((src, subprocess.Popen(
            [*compile_args(root, extra), "-c", src, "-o", obj],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    failed = []
    for src, proc in jobs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            failed.append(f"{os.path.basename(src)}:\n{out}")
    if failed:
        raise BuildError("compiling libssh2 failed:\n" + "\n".join(failed))
    return objs


def build(outdir: str, cflags: list[str] = (), ldflags: list[str] = ()) -> str:
    """Build the patched library into outdir; returns its path.

    cflags/ldflags are added last (the sanitizer test builds with
    ``-fsanitize=address,undefined -UNDEBUG``)."""
    _check_tools()
    stock_ssh2, crypto = wheel_libs()
    soname = os.path.basename(stock_ssh2)
    data = sdist_bytes()
    os.makedirs(outdir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sshpump-libssh2-") as tmp:
        root = extract_libssh2(data, tmp)
        apply_patches(root)
        objs = compile_all(root, tmp, list(cflags))
        out = os.path.join(outdir, soname)
        cmd = [os.environ.get("CC", "gcc"), "-shared", "-o", out + ".tmp", *objs,
               f"-Wl,-soname,{soname}", "-Wl,--no-undefined", "-Wl,-z,defs",
               # Linking the wheel's libcrypto by path records its soname; the
               # rpath finds it in a regular install, and sshpump loads it by
               # absolute path first in any case.
               crypto, "-lz", "-Wl,-rpath,$ORIGIN/../../ssh2_python.libs", *ldflags]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"linking libssh2 failed: {r.stderr.strip()}")
        os.replace(out + ".tmp", out)
    patch_sha = {}
    for path in PATCHES:
        with open(path, "rb") as f:
            patch_sha[os.path.basename(path)] = sha256(f.read())
    with open(out, "rb") as f:
        lib_sha = sha256(f.read())
    with open(os.path.join(outdir, BUILD_INFO), "w") as f:
        json.dump({"soname": soname, "sdist_sha256": SDIST_SHA256,
                   "patch_sha256": patch_sha, "library_sha256": lib_sha}, f, indent=1)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: build_libssh2.py OUTDIR", file=sys.stderr)
        return 2
    try:
        print(build(argv[1]))
    except BuildError as e:
        print(f"sshpump: building the patched libssh2: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
