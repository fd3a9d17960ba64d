"""Benchmarks run under the same CPU allocator settings as every `xbench` command
(:func:`xbench.environment.tune_allocator`); references measured in-process share them."""

from xbench.environment import tune_allocator

tune_allocator()
