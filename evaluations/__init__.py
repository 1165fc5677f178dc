"""basin.evaluations: landscape evaluator, Hessian and NTK probes, benchmark harness, and the CLI."""
