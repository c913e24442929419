"""One module per CLI sub-command; see moe_engine/cli.py for the contract."""
