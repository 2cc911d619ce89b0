from orchestrator.testing import inference_client, inference_settings, sim_config, sim_llm

__all__ = ("inference_client", "inference_settings", "sim_config", "sim_llm")
