from setuptools import setup

# Everything else is in pyproject.toml; cffi_modules has no pyproject spelling.
setup(cffi_modules=["vmediad/_native/build.py:ffibuilder", "codec_backend/_framepool_build.py:ffibuilder"])
