"""Sampling and scoring backends (Hugging Face, vLLM) behind one interface each."""
