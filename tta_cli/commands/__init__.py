"""CLI layer: parse flags, call the maths modules, print with rich. No maths here."""
