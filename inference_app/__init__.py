"""Serves a base model with its LoRA adapter: Gradio chat UI and an OpenAI-compatible API (python -m inference_app)."""
