from setuptools import setup

setup(cffi_modules=["csrc/build_pump.py:ffibuilder"])
