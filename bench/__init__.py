"""Benchmarks (not tests): each prints a table and writes JSON. Timing comparisons are ratios taken in
one run on one machine, and every figure is a median. May import engine, tradeoff_kernels, voice; never tui.
"""
