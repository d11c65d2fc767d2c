"""Integrations with other training frameworks (Hugging Face Trainer callbacks)."""
