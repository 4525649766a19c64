"""infllm-eval: an evaluation harness for long-context LLM inference methods."""

__version__ = "0.1.0"
