"""`atomo bench`: emulated networks (network namespaces + tc), the benchmark runs, the gradient study and the report."""
