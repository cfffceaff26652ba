"""Triton kernels for the hot decode path, each beside a plain-PyTorch reference with the same signature.

Pure functions over tensors: imports torch and triton only, never engine, voice or tui.
"""
