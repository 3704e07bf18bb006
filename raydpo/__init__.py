"""raydpo: DPO and online DPO on Ray."""
