"""Benchmarks: lit-adapter side by side with Hugging Face transformers + PEFT (run as `python -m benchmarks.<name>`)."""
