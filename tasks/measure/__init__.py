"""How good the quantized model is: KL and perplexity of the shipped folder (evaluate), the
Triton kernels against their references (kernel_check, fused_check), and the league table of
allocators × budgets with its figures (league, plots).

May import: expertbits.tasks.allocation, .quantization, .model, .checkpoints, .store and the root
modules; expertbits.kernels, expertbits.zoo.
"""
