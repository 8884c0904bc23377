"""Benchmarks (``lightmem bench ...``): LoCoMo quality and cost, segmentation, the stream and the
sleep-time worker, and the OpenAI-protocol LLM stub they use.
"""

__all__ = ["llm_stub", "locomo", "locomo_data", "segment", "sleep", "stream"]
