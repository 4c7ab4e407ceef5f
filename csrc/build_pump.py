"""cffi build script for sshpump's C pump (``sshpump._pump``).

The pump links against the libssh2 that ssh2-python's wheel ships, found
through the installed ``ssh2`` package, so that one libssh2 lives in the
process. The extension's RUNPATH points at ``../ssh2_python.libs`` relative to
itself; at run time ``sshpump.pump`` imports ``ssh2.session`` first, which loads
that library (and its libcrypto) under the same soname.
"""
import glob
import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def find_bundled_libssh2():
    try:
        import ssh2
    except ImportError:
        sys.exit(
            "sshpump build: ssh2-python is not installed in the build environment; "
            "it must be (pyproject.toml lists it in build-system.requires)."
        )
    libs = os.path.join(os.path.dirname(os.path.dirname(ssh2.__file__)), "ssh2_python.libs")
    found = sorted(glob.glob(os.path.join(libs, "libssh2-*.so*")))
    if not found:
        sys.exit(
            f"sshpump build: no bundled libssh2 in {libs}. sshpump needs the "
            "manylinux wheel of ssh2-python (1.2.0.post1), not a source build."
        )
    return found[0]


def read_cdef():
    with open(os.path.join(HERE, "pump.h")) as f:
        return f.read()


ffibuilder = FFI()
ffibuilder.cdef(read_cdef())

_libssh2 = find_bundled_libssh2()
_extra_compile = ["-O2", "-Wall", "-Wextra", "-std=gnu11"]
_extra_link = [_libssh2, "-Wl,-rpath,$ORIGIN/../ssh2_python.libs"]
_sanitize = bool(os.environ.get("SSHPUMP_SANITIZE"))
# Debug builds (made by the tests with ffibuilder.compile()): PUMP_DEBUG makes
# an impossible pump state change abort the process, and SSHPUMP_PUMP_TRACE=1
# at run time logs every state change to stderr (csrc/conn.c).
_debug = _sanitize or bool(os.environ.get("SSHPUMP_PUMP_DEBUG"))
if _sanitize:
    # Debug build for CI: AddressSanitizer + UndefinedBehaviorSanitizer.
    _extra_compile += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
    _extra_link += ["-fsanitize=address,undefined"]
if _debug:
    _extra_compile += ["-DPUMP_DEBUG"]

# pump.c: the session and its loop; conn.c: one connection's states; flow.c:
# its bytes; mux.c: --mux streams over one channel. pump_private.h is what
# they share.
SOURCES = ["pump.c", "conn.c", "flow.c", "mux.c"]

ffibuilder.set_source(
    "sshpump._pump",
    '#include "pump.h"',
    # setuptools wants paths relative to setup.py; ffibuilder.compile() (the
    # debug builds in the tests) runs from a temporary directory.
    sources=[os.path.join(HERE, f) if _debug else os.path.relpath(os.path.join(HERE, f)) for f in SOURCES],
    include_dirs=[HERE],
    extra_compile_args=_extra_compile,
    extra_link_args=_extra_link,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
