"""Speed and memory measurements (scripts that print a table; not tests)."""
