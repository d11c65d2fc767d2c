"""Low-rank adaptation on top of PEFT's LoRA layers: pair discovery, LoRA-GA, export."""
