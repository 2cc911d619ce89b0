"""The plugin kit's fixtures, as a plugin author's conftest would import them."""

from orchestrator.testing import sim_config, sim_llm, worker_harness

__all__ = ("sim_config", "sim_llm", "worker_harness")
