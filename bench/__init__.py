"""s2s-bench: the s2s runtime against eager PyTorch, optimum and CTranslate2 (see bench/README.md)."""
