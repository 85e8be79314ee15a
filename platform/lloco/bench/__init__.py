"""Performance benchmarks: programs that print a table and write JSON, comparing in one run."""
