"""The vLLM plugin's tests run in their own environment (.ci/vllm): vLLM pins its own transformers."""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # an in-process engine: ~30 s to start, not ~55
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # compute on every core
