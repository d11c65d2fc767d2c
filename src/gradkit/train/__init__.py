"""The fine-tuning harness behind the CLI: methods registry, loop, metrics, plots."""
