"""Who gets the bits: per-expert statistics (Λ, MaxVar), calibration (routing and quantization
error per width), the budget arithmetic, the allocators, and the allocation itself.

May import: expertbits.tasks.quantization, .model, .checkpoints, .store and the root modules;
expertbits.kernels.
"""
