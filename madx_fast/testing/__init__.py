"""Testing aids that ship with madx_fast (used by its test suite, usable in yours)."""
