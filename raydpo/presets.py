"""Shapes of the Llama a run builds when model.path is None (`model.preset`)."""

# model.preset: the built Llama's shape (the demo tokenizer's 720 tokens; 64-wide heads, as
# vLLM's CPU attention wants). Parameters: tiny 0.41M, small 25.6M, medium 99.7M.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {},  # TinyModelConfig's defaults
    "small": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 8},
    "medium": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 14, "num_attention_heads": 12,
               "num_key_value_heads": 12},
}
