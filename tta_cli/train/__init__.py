"""Joint training of the TTT model and its checkpoints."""
