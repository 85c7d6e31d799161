"""Training: the corpus, the tokenizer, and (later) the optax/orbax training loop."""
