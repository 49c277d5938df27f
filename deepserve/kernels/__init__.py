"""Triton kernels, one per module, each with a pure-PyTorch `<name>_ref` and a checking host wrapper.

Import the module you need (`deepserve.kernels.paged_decode_attention`, ...); this package imports
nothing itself, so `import deepserve.kernels` never pulls in Triton.
"""
