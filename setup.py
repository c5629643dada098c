"""Build script: the package, plus (in a later step) the compiled extension kdkernels._C.

No extension sources exist yet, so this builds a pure-Python package; the C++/CUDA extension joins here.
"""

from setuptools import setup

setup()
