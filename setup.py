"""Build the Cython protocol core, the load generator's loop, the hot folder's batch I/O
and the intake's epoll loop.

Metadata is in pyproject.toml.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("relay._core", ["relay/_core.pyx"], extra_compile_args=["-O2"]),
         Extension("relay._loadgen", ["relay/_loadgen.pyx"], extra_compile_args=["-O2"]),
         Extension("relay._dirio", ["relay/_dirio.pyx"], extra_compile_args=["-O2"]),
         Extension("relay._fastloop", ["relay/_fastloop.pyx"], extra_compile_args=["-O2"])],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        },
        nthreads=os.cpu_count() or 1,   # the .pyx files translate in parallel
    ),
)
