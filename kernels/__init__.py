"""expertbits.kernels: Triton kernels, their launch wrappers and pure-torch references.

Without a CUDA device the kernels run in the Triton interpreter, chosen for these kernels alone
(triton_mode.py): importing this package changes no environment variable or Triton setting.
"""
