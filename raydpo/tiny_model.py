"""Build a tiny Llama and its byte-level BPE tokenizer from scratch.

Nothing can be downloaded here, so the demo and the tests make their own
model: a tokenizer trained with `tokenizers` on a corpus we are given, a
`LlamaForCausalLM` built from a `LlamaConfig`, both saved with
`save_pretrained` (safetensors). transformers and vLLM load the folder as is.

The chat template is ChatML (``<|im_start|>role\\n...<|im_end|>\\n``) and
``<|im_end|>`` is the EOS token, so a plain-text completion and a chat turn
both end the same way. No BOS token is added.

``tokenizer_style="llama3"`` builds a tokenizer that behaves like Llama 3's
instead: it adds ``<|begin_of_text|>`` before every text (a post-processor, as
Llama 3's does), ends turns with ``<|eot_id|>`` (its EOS), and has Llama 3's
header-based chat template, which writes the BOS itself. Every code path that
a BOS-adding checkpoint (Llama 3, Gemma, Mistral) takes runs on it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from raydpo.config import TinyModelConfig
from raydpo.errors import ConfigError
from raydpo.model_check import CPU_HEAD_SIZES  # vLLM CPU attention's head sizes (checked against vLLM by a test)

PAD = "<|pad|>"
EOS = "<|im_end|>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = [PAD, EOS, IM_START]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A Llama-3-like tokenizer's special tokens and chat template.
BOS3, EOT3 = "<|begin_of_text|>", "<|eot_id|>"
LLAMA3_SPECIAL_TOKENS = [PAD, BOS3, EOT3, "<|start_header_id|>", "<|end_header_id|>"]
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int, style: str = "chatml"):
    """Train a byte-level BPE on `corpus`; return a transformers fast tokenizer.
    `style`: "chatml" (no BOS, ChatML template) or "llama3" (adds BOS, Llama 3 template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style not in ("chatml", "llama3"):
        raise ValueError(f"tokenizer style must be 'chatml' or 'llama3', got {style!r}")
    llama3 = style == "llama3"

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=LLAMA3_SPECIAL_TOKENS if llama3 else SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    if llama3:  # like Llama 3's tokenizer.json: BOS before every text, nothing after
        bos_id = tok.token_to_id(BOS3)
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS3}:0 $A:0", pair=f"{BOS3}:0 $A:0 {BOS3}:1 $B:1",
                                                           special_tokens=[(BOS3, bos_id)])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOT3 if llama3 else EOS,
        bos_token=BOS3 if llama3 else None,
        pad_token=PAD,
        model_max_length=1 << 30,
        padding_side="right",
    )
    hf_tok.chat_template = LLAMA3_CHAT_TEMPLATE if llama3 else CHAT_TEMPLATE
    return hf_tok


def build_model(tokenizer, shape: TinyModelConfig, seed: int):
    """A randomly initialised LlamaForCausalLM sized by `shape`, deterministic in `seed`."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    head_dim, rem = divmod(shape.hidden_size, shape.num_attention_heads)
    if rem or head_dim not in CPU_HEAD_SIZES:
        raise ConfigError(
            f"model.tiny: hidden_size {shape.hidden_size} / num_attention_heads "
            f"{shape.num_attention_heads} gives head size {shape.hidden_size / shape.num_attention_heads:g}; "
            f"vLLM's CPU attention needs one of {sorted(CPU_HEAD_SIZES)}"
        )
    if shape.num_attention_heads % shape.num_key_value_heads:
        raise ConfigError("model.tiny: num_attention_heads must be a multiple of num_key_value_heads")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings,
        initializer_range=shape.initializer_range,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id
    )
    return model


def build_tiny_model(
    corpus: Iterable[str], out_dir: str | Path, shape: TinyModelConfig | None = None, seed: int = 0,
    tokenizer_style: str = "chatml",
) -> Path:
    """Train the tokenizer (see `train_tokenizer`), build the model, save both to `out_dir`; return it."""
    shape = shape or TinyModelConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus, shape.vocab_size, tokenizer_style)
    model = build_model(tokenizer, shape, seed)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
