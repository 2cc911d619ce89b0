from orchestrator.testing import real_llm

__all__ = ("real_llm",)
