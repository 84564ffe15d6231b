"""Test-time adaptation: TTT (episodic, batched), TTT-Online with reset/rollback, and comparators."""
