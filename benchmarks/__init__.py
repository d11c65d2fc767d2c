"""gradkit's benchmarks: each module measures one claim against its peer and writes
``benchmarks/results/<name>.json``; ``python -m benchmarks.render_docs`` turns those files into
docs/benchmarks.md. Run each from the repository root as ``python -m benchmarks.<name>``."""
