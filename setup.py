from setuptools import setup

setup(cffi_modules=["nbdquorum/_native_build.py:ffibuilder"])
