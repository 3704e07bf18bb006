"""Greedy-decode token-id prompts with vLLM (CPU); print the ids as JSON.

    python tests/helpers/vllm_greedy.py MODEL_DIR PROMPTS_JSON MAX_NEW_TOKENS

Runs in its own process: vLLM's engine and env vars stay out of pytest's.
"""

import json
import sys

from raydpo.sampler.engine import make_llm


def greedy_token_ids(llm, prompt_ids, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation ids per prompt (EOS included when it stops there)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


if __name__ == "__main__":  # vLLM's engine core may spawn: keep the guard
    model_dir, prompts_json, max_new = sys.argv[1], sys.argv[2], int(sys.argv[3])
    prompts = json.loads(open(prompts_json).read())
    llm = make_llm(model_dir, max_model_len=128, kv_cache_gib=1)
    print("RESULT_JSON " + json.dumps(greedy_token_ids(llm, prompts, max_new)))
