"""BASIC (ICCV 2025) as a basic-llava plugin: refined LLM states supervise the projector."""
