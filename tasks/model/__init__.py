"""The quantized model and running it: the packed folder's format and reader (packed_folder), the
transformers loader whose experts run packed (load), layer-at-a-time execution of any model
(streaming), and the compressed-tensors export (export).

May import: expertbits.tasks.checkpoints, .store and the root modules; expertbits.kernels.
"""
