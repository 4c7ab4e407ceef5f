"""Builds the C pump (cffi) and sshpump's patched libssh2 (csrc/build_libssh2.py)."""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
import build_libssh2  # noqa: E402


class BuildExtWithLibssh2(build_ext):
    """Build the extensions, and the patched libssh2 beside the pump (sshpump/_libssh2/)."""

    def run(self):
        super().run()
        outdir = os.path.join(os.path.dirname(self.get_ext_fullpath("sshpump._pump")), "_libssh2")
        try:
            path = build_libssh2.build(outdir)
        except build_libssh2.BuildError as e:
            sys.exit(f"sshpump: building the patched libssh2: {e}")
        print(f"sshpump: built {path}")


setup(
    cffi_modules=["csrc/build_pump.py:ffibuilder"],
    cmdclass={"build_ext": BuildExtWithLibssh2},
)
