"""The vLLM sampler pool: weight sync equals transformers, versions on every
sample, a killed actor mid-batch, a failed sync, the version guard."""

from dataclasses import replace
import threading
import time

import pytest
import torch

from raydpo.config import TinyModelConfig
from raydpo.records import SamplingSettings, Stale
from raydpo.tasks import style
from raydpo.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow  # starts Ray, vLLM or Serve, or trains: `make test-fast` leaves it out

GREEDY = SamplingSettings(n=1, temperature=0.0, max_new_tokens=16)
PROMPTS = style.split_prompts()[1][:24]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, style_corpus):
    # peaked logits (see test_cross_engine): greedy outputs differ per prompt and between weight versions
    return build_tiny_model(style_corpus, tmp_path_factory.mktemp("sampler") / "base",
                            TinyModelConfig(initializer_range=0.2), seed=0)


@pytest.fixture(scope="module")
def pool(ray_local, base_dir):
    from raydpo.config_io import load_config
    from raydpo.sampler.pool import SamplerPool

    cfg = load_config(None, ["cluster.sampler.count=2", "cluster.sampler.cpus=1", "sampler.sync_timeout_s=60"])
    p = SamplerPool.from_config(cfg, str(base_dir))
    assert len(p.actors) == 2 and p.sync_timeout_s == 60
    yield p
    p.shutdown()


def trained(base_dir, seed, steps=3, lr=3e-3):
    """The base model after a few high-lr steps on the style text: new weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    texts = style.corpus(seed=seed, count=64)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for i in range(steps):
        b = tok(texts[i * 8:(i + 1) * 8], return_tensors="pt", padding=True)
        model(**b, labels=b.input_ids.masked_fill(b.attention_mask == 0, -100)).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), tok


def hf_greedy(model, tok, prompts, max_new):
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            out.append(tuple(model.generate(ids, max_new_tokens=max_new, do_sample=False)[0, ids.shape[1]:].tolist()))
    return out


def ids(samples):
    return [s.token_ids for s in samples]


def test_sync_makes_pool_equal_transformers_of_the_trained_weights(pool, base_dir, tmp_path):
    before = pool.sample(PROMPTS, GREEDY)
    assert {s.policy_version for s in before} == {pool.version}
    start = pool.version
    model, tok = trained(base_dir, seed=1)
    secs = pool.publish(start + 1, state_dict={k: v.detach().clone() for k, v in model.state_dict().items()})
    after = pool.sample(PROMPTS, GREEDY)
    assert ids(after) == hf_greedy(model, tok, PROMPTS, GREEDY.max_new_tokens)
    assert sum(a != b for a, b in zip(ids(after), ids(before))) > len(PROMPTS) // 2  # the weights really changed
    assert {s.policy_version for s in after} == {start + 1}
    print(f"state-dict sync of the tiny model to 2 engines: {secs:.3f}s")
    # the same through a checkpoint folder (shared storage path)
    model2, _ = trained(base_dir, seed=2)
    model2.save_pretrained(tmp_path / "v2")
    pool.publish(start + 2, path=str(tmp_path / "v2"))
    again = pool.sample(PROMPTS, GREEDY)
    assert ids(again) == hf_greedy(model2, tok, PROMPTS, GREEDY.max_new_tokens)
    assert {s.policy_version for s in again} == {start + 2}


def test_settings_from_config():
    from raydpo.config_io import load_config

    cfg = load_config(None, ["sampler.samples_per_prompt=3", "sampler.stop=[x]", "sampler.seed=5"])
    assert SamplingSettings.from_config(cfg.sampler) == SamplingSettings(n=3, temperature=1.0, top_p=1.0,
                                                                         max_new_tokens=24, stop=("x",), seed=5)


def test_samples_carry_logprobs_and_finish_reasons(pool):
    out = pool.sample(PROMPTS[:4], SamplingSettings(n=3, temperature=1.0, max_new_tokens=8, seed=7))
    assert [(s.prompt_index, s.sample_index) for s in out] == [(i, j) for i in range(4) for j in range(3)]
    assert all(len(s.logprobs) == len(s.token_ids) and all(lp <= 0 for lp in s.logprobs) for s in out)
    assert all(s.finish_reason in ("stop", "length") for s in out)
    assert all(s.prompt == PROMPTS[s.prompt_index] for s in out)
    seeded = pool.sample(PROMPTS[:4], SamplingSettings(n=3, temperature=1.0, max_new_tokens=8, seed=7))
    assert ids(seeded) == ids(out)  # per-prompt seeds: same draw whichever actor ran it


def test_leaving_out_logprobs_or_text_draws_the_same_tokens(pool):
    """The evaluation asks for no log-probs (win rate) or no text (KL): the same seeded draws,
    without what was left out; with stop strings the text is still decoded, to match them."""
    settings = SamplingSettings(n=2, temperature=1.0, max_new_tokens=8, seed=11)
    full = pool.sample(PROMPTS[:4], settings)
    bare = pool.sample(PROMPTS[:4], replace(settings, logprobs=False))
    mute = pool.sample(PROMPTS[:4], replace(settings, text=False))
    assert ids(bare) == ids(mute) == ids(full)
    assert [s.text for s in bare] == [s.text for s in full] and all(s.text for s in full)
    assert all(s.logprobs == () for s in bare) and all(s.logprobs for s in full)
    assert all(s.text == "" for s in mute) and [s.logprobs for s in mute] == [s.logprobs for s in full]
    assert [s.finish_reason for s in bare + mute] == [s.finish_reason for s in full + full]
    stop = full[0].text.split()[0]  # a word the first sample says
    stopped = pool.sample(PROMPTS[:4], replace(settings, text=False, stop=(stop,)))
    assert stopped[0].finish_reason == "stop" and len(stopped[0].token_ids) <= len(full[0].token_ids)


def test_failed_sync_names_actor_and_version_and_pool_keeps_serving(pool):
    from raydpo.errors import SamplerError

    v = pool.version
    before = pool.sample(PROMPTS, GREEDY)
    t = time.perf_counter()
    with pytest.raises(SamplerError, match=rf"weight sync to version {v + 1} failed: sampler 0: .*does not exist"):
        pool.publish(v + 1, path="/nonexistent/checkpoint")
    assert time.perf_counter() - t < pool.sync_timeout_s
    bad = {"model.embed_tokens.weight": torch.zeros(3, 3)}
    with pytest.raises(SamplerError, match="weights do not fit the model: missing"):
        pool.publish(v + 1, state_dict=bad)
    assert pool.version == v
    after = pool.sample(PROMPTS, GREEDY)
    assert ids(after) == ids(before) and {s.policy_version for s in after} == {v}


def test_version_guard_rejects_counts_and_refreshes_a_stale_actor(pool, base_dir):
    import ray

    from raydpo.errors import SamplerError

    if pool.version == 0:  # run on its own (-k), not after the module's syncs: publish a version
        pool.publish(1, path=str(base_dir))
    v = pool.version
    # an actor still on the base weights (version 0), e.g. one that missed a sync
    pool.actors[1] = pool._start(1)
    pool._wait_ready([1])
    assert ray.get(pool.actors[1].generate.remote(PROMPTS[:1], 0, GREEDY, v)) == Stale(0)  # refused: its version
    rejected = pool.stats.stale_rejections
    out = pool.sample(PROMPTS, GREEDY, chunk_size=2)
    assert pool.stats.stale_rejections > rejected
    assert {s.policy_version for s in out} == {v}
    with pytest.raises(SamplerError, match="never published"):
        pool.sample(PROMPTS[:2], GREEDY, min_version=v + 5)


def test_killed_actor_mid_batch_still_one_result_per_prompt_and_sample(pool):
    import ray

    prompts = style.split_prompts()[0][:160]
    settings = SamplingSettings(n=4, temperature=1.0, max_new_tokens=48)
    restarts, retried = pool.stats.restarts, pool.stats.retried_chunks
    victim = pool.actors[0]

    def kill_soon():
        time.sleep(0.5)
        ray.kill(victim)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    out = pool.sample(prompts, settings, chunk_size=4)
    killer.join()
    keys = [(s.prompt_index, s.sample_index) for s in out]
    assert len(keys) == len(set(keys)) == len(prompts) * 4
    assert sorted(keys) == [(i, j) for i in range(len(prompts)) for j in range(4)]
    assert pool.stats.restarts == restarts + 1 and pool.stats.retried_chunks > retried  # the kill landed mid-batch
    assert {s.policy_version for s in out} == {pool.version}


def test_stream_yields_chunks_as_they_finish(pool, ray_local):
    settings = SamplingSettings(n=2, temperature=1.0, max_new_tokens=8, seed=3)
    chunks = list(pool.stream(PROMPTS, settings, chunk_size=5))
    assert len(chunks) == 5  # 24 prompts in chunks of 5, each yielded once
    flat = sorted((s.prompt_index, s.sample_index) for c in chunks for s in c)
    assert flat == [(i, j) for i in range(len(PROMPTS)) for j in range(2)]
    whole = pool.sample(PROMPTS, settings)  # same seeds per prompt whether streamed in chunks or not
    assert sorted((s.prompt_index, s.sample_index, s.token_ids) for c in chunks for s in c) == \
        [(s.prompt_index, s.sample_index, s.token_ids) for s in whole]


def hf_token_logps(model, prompt_ids, response_ids) -> list[float]:
    """transformers' log-prob of each response token after the prompt (a plain second implementation)."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    p = len(prompt_ids)
    return [float(logps[p - 1 + t, tok]) for t, tok in enumerate(response_ids)]


def test_stored_pair_trains_on_exactly_the_sampled_ids_and_sampler_logprobs_match_transformers(pool, base_dir, tmp_path):
    """What you sample is what you train: the training row of a stored online pair is the
    sampler's prompt + response ids, EOS only where the sampler stopped on it; the sampler's
    recorded log-probs equal transformers' at the same weights."""
    import pyarrow as pa

    from raydpo.data.store import PreferenceStore, training_rows
    from raydpo.online.pairs import build_pairs

    model, tok = trained(base_dir, seed=5)
    pool.publish(pool.version + 1, state_dict={k: v.detach().clone() for k, v in model.state_dict().items()})
    k = 4
    out = pool.sample(PROMPTS[:16], SamplingSettings(n=k, temperature=1.0, max_new_tokens=10, seed=11))
    groups = [out[i * k:(i + 1) * k] for i in range(16)]
    assert {s.finish_reason for s in out} == {"stop", "length"}  # both kinds occur at this cap
    for s in out:
        assert list(s.prompt_token_ids) == tok(s.prompt, add_special_tokens=False).input_ids  # no BOS in this tokenizer
        ends_with_eos = s.token_ids[-1] == tok.eos_token_id
        assert ends_with_eos == (s.finish_reason == "stop")
        assert s.finish_reason == "stop" or len(s.token_ids) == 10
    # sampler log-probs vs transformers at the same weights (fp32 both; the gap is rounding)
    gaps = [abs(a - b) for s in out for a, b in zip(s.logprobs, hf_token_logps(model, s.prompt_token_ids, s.token_ids))]
    print(f"sampler vs transformers log-prob gap over {len(gaps)} tokens: max {max(gaps):.2e}")
    assert max(gaps) < 1e-4
    # stored, then turned into training rows: the very ids
    scores = [[float(j) for j in range(k)] for _ in groups]  # the last sample wins, the first loses
    pairs, _ = build_pairs(groups, scores, iteration=1, first_prompt=0, judge="t")
    store = PreferenceStore(tmp_path / "store")
    store.write_chunk(1, 0, pairs)
    rows, counts = training_rows(store.read_table([1]), "keep")
    assert counts.rows == rows.num_rows == len(pairs) == 16
    assert counts.truncated == sum(g[-1].finish_reason == "length" or g[0].finish_reason == "length" for g in groups)
    for r, g in zip(rows.to_pylist(), groups):
        assert r["prompt_ids"] == list(g[0].prompt_token_ids)
        assert r["chosen_ids"] == list(g[-1].token_ids) and r["rejected_ids"] == list(g[0].token_ids)
    stored = store.read_pairs()
    assert [p.chosen_logprobs for p in stored] == [tuple(pa.array(g[-1].logprobs, pa.float32()).to_pylist())
                                                   for g in groups]
    dropped, c2 = training_rows(store.read_table([1]), "drop")
    assert dropped.num_rows == 16 - counts.truncated and c2.truncated_dropped == counts.truncated
    short, c3 = training_rows(store.read_table([1]), "keep", max_length=14)
    assert c3.over_length_dropped == 16 - short.num_rows
    assert all(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= 14 for r in short.to_pylist())


def test_a_load_that_fails_part_way_leaves_no_mixed_or_mislabelled_engine(pool, base_dir):
    """One actor's reload dies after a few tensors went in (its engine then holds two
    versions' weights): the pool replaces it, brings every actor back to the current
    version, and says so; samples after that are the current version's, correctly labelled."""
    import ray

    from raydpo.errors import SamplerError

    v = pool.version
    before = pool.sample(PROMPTS, GREEDY, chunk_size=3)  # spread over both actors
    restarts = pool.stats.restarts
    ray.get(pool.actors[0].inject_reload_fault.remote(3))
    model, _ = trained(base_dir, seed=9)
    with pytest.raises(SamplerError, match=rf"sampler 0: loading version {v + 1} failed part-way.*back on version {v}"):
        pool.publish(v + 1, state_dict={k: t.detach().clone() for k, t in model.state_dict().items()})
    assert pool.version == v and pool.stats.restarts == restarts + 1  # the broken engine was replaced
    assert ray.get([a.get_version.remote() for a in pool.actors]) == [v, v]
    for actor in pool.actors:  # each engine, alone, gives the current version's greedy output
        got = ray.get(actor.generate.remote(PROMPTS, 0, GREEDY, v))
        assert ids(got) == ids(before) and {s.policy_version for s in got} == {v}


def test_weights_whose_owner_died_are_refused_before_anything_loads(pool, base_dir):
    """Engines read the buckets of an update one at a time while they load. A bucket that
    cannot be read (its owner, the trainer, died) used to fail the load part-way: mixed
    weights, the engine replaced. Every bucket is now fetched first: refused, engine kept."""
    import ray

    from raydpo.errors import SamplerError
    from raydpo.weights import StoredWeights, buckets, put_weights

    @ray.remote(num_cpus=0)
    class Owner:
        def put(self, arrays):
            return [ray.put(arrays)]  # owned by this actor

    v, restarts = pool.version, pool.stats.restarts
    model, _ = trained(base_dir, seed=11)
    good = put_weights(buckets(model.state_dict().items(), 64 << 10))
    owner = Owner.remote()
    lost = ray.get(owner.put.remote(ray.get(good.parts[-1])))[0]
    ray.kill(owner)
    deadline = time.monotonic() + 60
    while True:  # until Ray has seen the owner die
        try:
            ray.get(lost, timeout=10)
        except ray.exceptions.RayError:
            break
        assert time.monotonic() < deadline, "the object outlived its owner"
        time.sleep(0.2)
    stored = StoredWeights(good.shapes, (*good.parts[:-1], lost), good.bf16, good.nbytes)
    with pytest.raises(SamplerError, match=rf"weights of version {v + 1} cannot be read .*keeps version {v}"):
        pool.publish(v + 1, state_dict=stored)
    assert pool.version == v and pool.stats.restarts == restarts  # no engine was left on mixed weights
    assert ray.get([a.get_version.remote() for a in pool.actors]) == [v, v]


def test_samples_carry_the_version_that_produced_them_across_a_mid_run_update(pool, base_dir):
    """A publish while a stream runs: the new weights go in between an actor's calls, so each
    chunk is one version, tagged with it, and its ids are exactly that version's greedy ids.
    A held version keeps a publish waiting until it is released (evaluation beside training)."""
    model, _ = trained(base_dir, seed=2)
    state = model.state_dict()
    v = pool.version
    before = ids(pool.sample(PROMPTS, GREEDY))
    held = pool.hold()
    published = threading.Event()
    t = threading.Thread(target=lambda: (pool.publish(v + 1, state_dict=state), published.set()))
    t.start()
    time.sleep(1.5)
    assert not published.is_set() and pool.version == v  # waiting for the hold, not loading
    assert ids(pool.sample(PROMPTS, GREEDY, min_version=v)) == before  # and the samplers still serve v
    pool.release(held)
    t.join(120)
    assert published.is_set() and pool.version == v + 1
    after = ids(pool.sample(PROMPTS, GREEDY))
    assert after != before

    chunks, prompts = [], PROMPTS * 4  # 24 chunks of 4 over 2 actors

    def consume():
        for chunk in pool.stream(prompts, GREEDY, min_version=v + 1, chunk_size=4):
            chunks.append(chunk)

    reader = threading.Thread(target=consume)
    reader.start()
    while len(chunks) < 3:
        time.sleep(0.01)
    pool.publish(v + 2, state_dict=trained(base_dir, seed=3)[0].state_dict())
    reader.join(300)
    newest = ids(pool.sample(PROMPTS, GREEDY))
    assert newest != after
    versions = [{s.policy_version for s in c} for c in chunks]
    assert all(len(vs) == 1 for vs in versions)  # no chunk mixes versions
    assert {vs.pop() for vs in versions} == {v + 1, v + 2}  # the update landed mid-stream
    expected = {v + 1: after, v + 2: newest}
    for c in chunks:
        for s in c:
            assert s.token_ids == expected[s.policy_version][s.prompt_index % len(PROMPTS)], s


class RuleJudge:
    """The style task's rule, scored in-process (the Serve deployment of it runs in test_judge)."""
    name = "rule:raydpo.tasks.style:score"

    def rank(self, groups, tally=None):  # JudgeClient.rank's signature; a rule compares nothing to tally
        return [[style.score(p, t) for p, t in g] for g in groups]


class Window:
    def window(self, it, n):
        return [PROMPTS[(it * n + i) % len(PROMPTS)] for i in range(n)]


def test_a_producer_ahead_of_a_slow_trainer_never_hands_it_a_pair_staler_than_k(pool, base_dir, tmp_path):
    """The overlapped loop's producer with the real pool and store, k=1, and a trainer that
    takes 2 s per iteration: it samples ahead, but never from a version more than k behind
    the one that trains on the pairs; a resumed trainer with k=0 drops the 1-behind ones,
    counted."""
    from types import SimpleNamespace

    from raydpo.config_io import load_config
    from raydpo.data.store import PreferenceStore
    from raydpo.online.overlapped import Producer
    from raydpo.online.training_data import training_table

    cfg = load_config(None, [f"run_dir={tmp_path}", "loop.max_staleness=1", "loop.prompts_per_iteration=8",
                             "loop.chunk_prompts=4", "sampler.samples_per_prompt=2", "sampler.max_new_tokens=8"])
    r = SimpleNamespace(prompts=Window(), pool=pool, judge=RuleJudge(), store=PreferenceStore(tmp_path / "prefs"))
    state = trained(base_dir, seed=4)[0].state_dict()
    v0 = pool.version  # iteration i trains version i-1 into i, so iterations start at v0+1
    its = range(v0 + 1, v0 + 5)
    producer = Producer(cfg, r, its[0], its[-1])
    hists = []
    try:
        for it in its:
            counts, _ = producer.pairs(it, 300)
            time.sleep(2.0)  # the slow trainer
            rows, stats = training_table(cfg, r.store, it)
            versions = r.store.read_table([it]).column("policy_version").to_pylist()
            assert versions and all(it - 2 <= v <= it - 1 for v in versions)  # k = 1
            assert stats["stale_dropped"] == 0 and sum(stats["staleness_hist"]) == rows.num_rows == counts.pairs
            hists.append(stats["staleness_hist"])
            pool.publish(it, state_dict=state)
    finally:
        producer.stop()
    assert sum(h[1] for h in hists) > 0  # sampled ahead: from one version behind
    tight = load_config(None, [f"run_dir={tmp_path}", "loop.max_staleness=0"])
    last = its[-1]
    behind = r.store.read_table([last]).column("policy_version").to_pylist().count(last - 2)
    rows, stats = training_table(tight, r.store, last)
    assert stats["stale_dropped"] == behind > 0 and rows.num_rows == len(r.store.read_table([last])) - behind


def test_a_dead_actor_seen_by_two_threads_is_replaced_once_and_never_after_shutdown():
    """The producer's stream and a publish can both see one actor die; the second replace
    must not throw away the first one's fresh engine. After shutdown nothing restarts."""
    from raydpo.errors import SamplerError
    from raydpo.sampler.pool import PoolStats, SamplerPool

    pool = SamplerPool.__new__(SamplerPool)  # the slot bookkeeping only: no engines
    pool._lock, pool.closed, pool.stats, pool._weights = threading.RLock(), False, PoolStats(), None
    started = []
    pool._start = lambda i: started.append(i) or f"engine-{len(started)}"
    pool._wait_ready = lambda indices: None
    pool.actors = ["engine-0"]
    pool._replace(0, "engine-0")
    pool._replace(0, "engine-0")  # the other thread, a moment later
    assert pool.actors == ["engine-1"] and pool.stats.restarts == 1
    pool.closed = True
    with pytest.raises(SamplerError, match="shut down"):
        pool._replace(0, "engine-1")


def test_an_engine_no_alive_node_can_place_fails_naming_what_it_reserves(ray_local, base_dir):
    """A replacement whose node died waits to be placed; after sampler.start_timeout_s the
    error names the resources no alive node has, and the way back (a node, then --resume)."""
    from raydpo.config_io import load_config
    from raydpo.errors import SamplerError
    from raydpo.sampler.pool import SamplerPool

    cfg = load_config(None, ["cluster.sampler.resources={sampler_node: 1}", "sampler.start_timeout_s=3"])
    t = time.time()
    with pytest.raises(SamplerError) as e:
        SamplerPool.from_config(cfg, str(base_dir))
    assert time.time() - t < 30
    msg = str(e.value)
    assert msg.startswith("sampler engines did not start within 3s (sampler.start_timeout_s): no alive node has "
                          "what one engine reserves (1 CPU, 1 sampler_node)")
    assert "--resources=" in msg and "--resume" in msg


def test_an_engine_that_dies_with_its_node_while_starting_is_started_again(ray_local):
    """Ray places a replacement on a node it has not yet seen die (until heartbeats are
    missed); that engine dies unstarted and is started again. One whose own start-up
    raises is not retried: the error names it."""
    import ray

    from raydpo.errors import SamplerError
    from raydpo.sampler.pool import PoolStats, SamplerPool

    @ray.remote(num_cpus=0)
    class Engine:
        def __init__(self, fail: bool = False):
            if fail:
                raise RuntimeError("no such model")

        def get_version(self):
            return 0

    pool = SamplerPool.__new__(SamplerPool)
    pool.start_timeout_s, pool.stats, pool._opts = 60, PoolStats(), {"num_cpus": 0, "num_gpus": 0}
    started = []

    def start(i):
        started.append(i)
        return Engine.remote()

    pool._start = start
    pool.actors = [Engine.remote(), Engine.remote()]
    ray.kill(pool.actors[0])  # dies before it answers, as if with its node
    pool._wait_ready([0, 1])
    assert started == [0] and ray.get(pool.actors[0].get_version.remote()) == 0
    pool.actors = [Engine.remote(fail=True)]
    with pytest.raises(SamplerError, match="(?s)sampler 0 failed to start: .*RuntimeError: no such model"):
        pool._wait_ready([0])
    assert started == [0]

    @ray.remote(num_cpus=0)
    class Crashing:  # its process dies every time (as out of memory would): not retried forever
        def __init__(self):
            import os
            os._exit(1)

        def get_version(self):
            return 0

    started.clear()
    pool._start = lambda i: started.append(i) or Crashing.remote()
    pool.actors = [Crashing.remote()]
    with pytest.raises(SamplerError, match=f"sampler 0 failed to start \\(started {SamplerPool.START_ATTEMPTS} times\\)"):
        pool._wait_ready([0])
    assert started == [0] * (SamplerPool.START_ATTEMPTS - 1)  # the first one, then restarts


def test_a_model_folder_a_node_cannot_see_names_shared_storage(ray_local, tmp_path):
    """On a multi-node cluster, a run_dir on the driver's own disk is missing on the other
    nodes: the engine fails at once saying so, instead of later on a missing folder."""
    from raydpo.errors import SamplerError
    from raydpo.sampler.pool import SamplerPool

    with pytest.raises(SamplerError) as e:
        SamplerPool(str(tmp_path / "run" / "base_model"), cpus=0)
    msg = str(e.value)
    assert msg.startswith("sampler 0 failed to start") and f"sampler 0: {tmp_path}/run/base_model does not exist on" in msg
    assert "must be on storage every node sees" in msg
