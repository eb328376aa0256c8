"""Hugging Face checkpoint import/export (GPT-2, BERT, and the Llama family: Llama, Mistral, Qwen2, Qwen3) through
config.json + safetensors."""
from .hf import SUPPORTED, config_from_hf, config_to_hf, load_hf, save_hf

__all__ = ["load_hf", "save_hf", "config_from_hf", "config_to_hf", "SUPPORTED"]
