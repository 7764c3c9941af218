"""Compiled Cython modules (built from cext/*.pyx by setup.py)."""
