"""The validation ladder (DESIGN.md 4): every backend compared with the torch reference."""
