"""Studies of TaskEdge-FL: benchmarks, their harness and support (FLOPs, memory profiling), figures.

Not part of the installed wheel; run from a checkout (`python -m benchmarks.<name>`)."""
