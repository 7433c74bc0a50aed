import os

# The Triton interpreter must be chosen before triton/kernels are imported; tests run the kernels on the CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
