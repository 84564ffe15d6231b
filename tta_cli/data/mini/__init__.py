"""Package data: `cifar10-mini.tar.gz`, the embedded CIFAR-10 subset (made by scripts/make_mini.py)."""
