"""The online-DPO loop: `loop` is the algorithm; `collect`, `pairs`, `prompts`,
`training_data`, `evaluate`, `resume` and `offline_baseline` are what it calls."""
