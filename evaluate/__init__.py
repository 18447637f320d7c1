"""Evaluation harness: perplexity, passkey retrieval, memory accounting."""
