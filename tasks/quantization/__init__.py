"""Turning expert matrices into codes: which quantizer and its options (method), the packed
folder writer (writer), and GPTQ calibrated on routed tokens, layer after layer (gptq_sequential).

May import: expertbits.tasks.model, .checkpoints, .store and the root modules; expertbits.kernels.
"""
