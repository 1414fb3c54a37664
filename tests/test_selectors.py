"""Every selector on tiny random models: budget, question, determinism, ratio 1 == full prefill."""

import pytest
import torch
from conftest import tiny_model_dir

from kvfuse.loader.store import ChunkData
from kvfuse.pipeline.precompute import prefill_chunk, prefill_prefix
from kvfuse.runtime.attention import use_kvfuse_attention
from kvfuse.runtime.fusion import full_prefill, fuse, greedy, greedy_batch, prepare, run
from kvfuse.runtime.kvcache import kv_from_cache
from kvfuse.runtime.model import load_model
from kvfuse.runtime.selectors import SELECTORS, LayerPlan, get_selector
from kvfuse.runtime.selectors import gradual
from kvfuse.runtime.selectors.base import layer_schedule
from kvfuse.runtime.selectors.cacheblend import deviation
from kvfuse.runtime.selectors import kvfuse, kvfuse_staged
from kvfuse.runtime.selectors.kvfuse import chunk_budgets

PREFIX = [2, 10, 11, 12]
LENS = (23, 9, 31, 17)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def lm(request, tmp_path_factory):
    lm = load_model(str(tiny_model_dir(tmp_path_factory, arch=request.param)))
    use_kvfuse_attention(lm.model)
    return lm


@pytest.fixture(scope="module")
def prompt(lm):
    return make_prompt(lm)


def make_prompt(lm):
    """(prefix, chunks, question) of random tokens, the chunks prefilled after the prefix."""
    g = torch.Generator().manual_seed(3)
    prefix_kv = prefill_prefix(lm, PREFIX)
    prefix = ChunkData("prefix", prefix_kv, torch.tensor(PREFIX, dtype=torch.int32), torch.zeros(2, len(PREFIX)), 0)
    chunks = []
    for i, n in enumerate(LENS):
        toks = torch.randint(5, 100, (n,), generator=g).tolist()
        kv, sal = prefill_chunk(lm, prefix_kv, toks)
        chunks.append(ChunkData(f"c{i}", kv, torch.tensor(toks, dtype=torch.int32), sal, len(PREFIX)))
    question = torch.randint(5, 100, (7,), generator=g)
    return prefix, chunks, question


def full_reference(lm, prompt):
    prefix, chunks, question = prompt
    ids = torch.cat([prefix.tokens, *[c.tokens for c in chunks], question.int()])
    cache, logits = full_prefill(lm, ids)
    return ids, cache, logits


@pytest.mark.parametrize("name", [n for n in SELECTORS if n != "full"])
@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.5])
def test_budget_respected_positions_valid_and_question_recomputed(lm, prompt, name, ratio):
    prefix, chunks, question = prompt
    res = fuse(lm, prefix, chunks, question, name, ratio)
    lay = res.layout
    budget = round(ratio * lay.context_len)
    sel = res.recomputed
    assert res.n_recomputed <= budget
    if name != "reuse":
        assert res.n_recomputed == budget  # every selector but reuse spends its whole budget
    if res.layer_counts is not None:       # a layer plan: budget x layers at equal FLOPs, nested sets
        assert sum(res.layer_counts) == budget * lm.spec.n_layers
        assert res.layer_counts[0] == sel.numel() and res.kept.numel() == res.layer_counts[-1]
        assert torch.isin(res.kept, sel).all()
    else:
        assert sel.numel() == res.n_recomputed
    assert torch.equal(sel, sel.unique())  # sorted, no duplicates
    assert ((sel >= lay.prefix_len) & (sel < lay.question_start)).all()  # context only, never the question
    # the question's K/V are always fresh: the cache holds every position up to the question's end,
    # and its question slots match a pass of the question over the same cache recomputed by hand
    assert res.cache.get_seq_length() == lay.total_len
    q_kv = kv_from_cache(res.cache, lay.question_start, lay.total_len)
    assert q_kv.abs().sum() > 0 and torch.isfinite(res.logits).all()


@pytest.mark.parametrize("name", list(SELECTORS))
def test_deterministic(lm, prompt, name):
    prefix, chunks, question = prompt
    a = fuse(lm, prefix, chunks, question, name, 0.15)
    b = fuse(lm, prefix, chunks, question, name, 0.15)
    assert torch.equal(a.recomputed, b.recomputed)
    assert torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("name", [n for n in SELECTORS if n != "reuse"])
def test_ratio_one_matches_full_prefill(lm, prompt, name):
    ids, ref_cache, ref_logits = full_reference(lm, prompt)
    ref_kv = kv_from_cache(ref_cache)
    res = fuse(lm, *prompt, name, 1.0)
    assert res.n_recomputed == res.layout.context_len
    assert (res.logits - ref_logits).abs().max() < 1e-3
    assert torch.allclose(kv_from_cache(res.cache), ref_kv, atol=1e-4)
    assert greedy(lm, res.cache, res.logits, len(ids), 6) == greedy(lm, ref_cache, ref_logits, len(ids), 6)


def test_reuse_recomputes_nothing_at_any_ratio(lm, prompt):
    for ratio in (0.0, 0.5, 1.0):
        assert fuse(lm, *prompt, "reuse", ratio).n_recomputed == 0


def test_shared_signals_are_reused_across_runs(lm, prompt):
    prep = prepare(lm, *prompt)
    calls = []
    attend = prep.ctx.attend
    prep.ctx.attend = lambda sel: calls.append(sel.numel()) or attend(sel)
    for name in ("a3", "qattn", "kvfuse", "prophet"):
        for ratio in (0.1, 0.3):
            run(prep, name, ratio)
    assert calls.count(0) == 1  # one plain probe pass served every run (later stages probe their own picks)
    r = run(prep, "kvfuse", 0.1)
    assert r.timings["select_s"] >= prep.ctx.costs[("attn", ())]  # charged for the probe it used


def test_epic_takes_the_first_tokens_of_every_chunk(lm, prompt):
    prep = prepare(lm, *prompt)
    sel = get_selector("epic")(prep.ctx, 20)  # 4 chunks: 5 each
    want = torch.cat([torch.arange(s, s + 5) for s in prep.layout.chunk_starts])
    assert torch.equal(sel, want)


def test_cacheblend_layer1_kv_equals_full_prefill(lm, prompt):
    ids, ref_cache, _ = full_reference(lm, prompt)
    prep = prepare(lm, *prompt)
    lay = prep.layout
    fresh = prep.ctx.layer_kv(1)                                            # [2, H, C, D]
    ref = kv_from_cache(ref_cache, lay.prefix_len, lay.question_start)[1]   # [2, H, C, D]
    assert torch.allclose(fresh, ref, atol=1e-4)
    # layer 0 sees only embeddings: re-rotated stored K/V are exact there, so no deviation
    assert deviation(prep.ctx, 0).max() < 1e-6
    assert deviation(prep.ctx, 1)[LENS[0]:].max() > 1e-6  # later chunks missed their predecessors


def test_kvfuse_chunk_budgets():
    assert chunk_budgets(torch.tensor([1.0, 1.0, 2.0]), [10, 10, 10], 8) == [2, 2, 4]
    assert chunk_budgets(torch.tensor([0.0, 0.0, 10.0]), [10, 10, 5], 9) == [2, 2, 5]  # capped, rest spread
    assert sum(chunk_budgets(torch.rand(7), [3, 50, 8, 20, 1, 9, 30], 40)) == 40


def test_kvfuse_staged_refines_in_stages(lm, prompt):
    prep = prepare(lm, *prompt)
    seen = []
    attend = prep.ctx.attend
    prep.ctx.attend = lambda sel: seen.append(sel.clone()) or attend(sel)
    sel = run(prep, "kvfuse-joint-probes", 0.3).recomputed
    budget = round(0.3 * prep.layout.context_len)
    starts = kvfuse_staged.chunk_starts(prep.ctx, budget)
    assert starts.numel() > 0 and torch.isin(starts, sel).all()
    assert starts.numel() <= budget * kvfuse_staged.START_SHARE
    # one probe per stage, each over the tokens chosen before it (a growing subset of the result)
    rest = budget - starts.numel()
    stages = kvfuse_staged.STAGES
    assert [s.numel() for s in seen] == [starts.numel() + round(rest * k / stages) for k in range(stages)]
    assert all(bool(torch.isin(s, sel).all()) for s in seen)


def test_kvfuse_1probe_runs_one_plain_probe_and_splits_by_chunk(lm, prompt):
    """kvfuse-1probe: chunk starts, then the rest by the plain probe's relevance with per-chunk budgets;
    the question probe is its only model pass besides the recompute."""
    prep = prepare(lm, *prompt)
    seen = []
    attend = prep.ctx.attend
    prep.ctx.attend = lambda sel: seen.append(sel.numel()) or attend(sel)
    budget = round(0.3 * prep.layout.context_len)
    sel = run(prep, "kvfuse-1probe", 0.3).recomputed
    assert seen == [0]                                                     # one probe, of the question alone
    starts = kvfuse.chunk_starts(prep.ctx, budget)
    assert starts.numel() > 0 and torch.isin(starts, sel).all() and sel.numel() == budget
    rel = kvfuse.relevance(prep.ctx)
    owner = prep.layout.chunk_index()
    free = torch.bincount(owner, minlength=len(LENS)) - torch.bincount(owner[starts - prep.layout.prefix_len],
                                                                      minlength=len(LENS))
    chunk_rel = torch.zeros(len(LENS)).index_add_(0, owner, rel.float())
    want = torch.tensor(chunk_budgets(chunk_rel, free.tolist(), budget - starts.numel()))
    got = torch.bincount(owner[sel - prep.layout.prefix_len], minlength=len(LENS)) - (free.new_tensor(LENS) - free)
    assert torch.equal(got, want)


def test_kvfuse_probe_share_sets_the_request_probe_depth(lm, monkeypatch):
    from kvfuse.runtime.fusion import probe_depth
    assert probe_depth("kvfuse-1probe", 32) == 32
    monkeypatch.setattr(kvfuse.select, "probe_share", 0.5)
    assert probe_depth("kvfuse-1probe", 32) == 16 and probe_depth("kvfuse", 32) == 32


@pytest.mark.parametrize("option", [{"CHUNK_BUDGET": True}, {"SPAN": 4}, {"PRIOR_EXP": 1.0}])
def test_kvfuse_staged_options_keep_the_contract(lm, prompt, monkeypatch, option):
    for k, v in option.items():
        monkeypatch.setattr(kvfuse_staged, k, v)
    prep = prepare(lm, *prompt)
    for ratio in (0.1, 0.4, 1.0):
        sel = run(prep, "kvfuse-staged", ratio).recomputed
        assert sel.numel() == round(ratio * prep.layout.context_len)
        assert torch.equal(sel, sel.unique())
        assert ((sel >= prep.layout.prefix_len) & (sel < prep.layout.question_start)).all()


def test_greedy_batch_matches_greedy(lm, prompt):
    ids, ref_cache, ref_logits = full_reference(lm, prompt)
    want = greedy(lm, ref_cache, ref_logits, len(ids), 6)
    res = [fuse(lm, *prompt, name, 0.3) for name in ("reuse", "kvfuse")]
    got = greedy_batch(lm, [full_reference(lm, prompt)[1]] + [r.cache for r in res],
                       [ref_logits] + [r.logits for r in res], len(ids), 6)
    assert got[0] == want
    assert got[1] == greedy(lm, fuse(lm, *prompt, "reuse", 0.3).cache, res[0].logits, len(ids), 6)


# ----------------------------------------------------------------------------- layer plans (gradual filtering)

def test_layer_schedule_spends_the_budget_at_equal_flops():
    levels = [(0.0, 2.0), (1 / 3, 0.75), (2 / 3, 0.25)]
    for n_layers, budget, n_context in [(24, 31, 216), (32, 2458, 16384), (2, 5, 50), (24, 100, 120), (24, 0, 9)]:
        keep = layer_schedule(levels, n_layers, budget, n_context)
        assert sum(keep) == n_layers * budget
        assert all(a >= b for a, b in zip(keep, keep[1:])) and max(keep) <= n_context
    assert layer_schedule(levels, 24, 120, 120) == [120] * 24      # ratio 1: every token at every layer
    keep = layer_schedule([(0.0, 2.0), (0.5, 0.5)], 4, 10, 100)
    assert keep[0] > 10 > keep[-1] and len(set(keep)) == 2


def test_constant_layer_plan_is_the_fixed_set_exactly(lm, prompt):
    prep = prepare(lm, *prompt)
    fixed = run(prep, "a3", 0.3)
    plan = LayerPlan(initial=fixed.recomputed, keep=[fixed.recomputed.numel()] * lm.spec.n_layers)
    got = run(prep, "a3", 0.3, selected=plan)
    assert torch.equal(got.logits, fixed.logits)
    assert torch.equal(kv_from_cache(got.cache), kv_from_cache(fixed.cache))
    assert got.n_recomputed == fixed.n_recomputed and torch.equal(got.kept, fixed.recomputed)


def test_narrowing_plan_keeps_what_the_question_attends_to(lm, prompt):
    """2 layers: S_0 at layer 0, the top k by the question's layer-0 attention at layer 1.
    Layer-l K/V of a token depend only on its own layer-l input, so the narrowed cache must be
    the fixed-S_0 pass's at layer 0, and at layer 1 the same for the kept tokens and the
    question, the stored KV for the dropped ones."""
    prep = prepare(lm, *prompt)
    lay = prep.layout
    s0 = run(prep, "a3", 0.5).recomputed
    k = s0.numel() // 3
    pinned = s0[-2:]                                            # never dropped, whatever they score
    res = run(prep, "a3", 0.5, selected=LayerPlan(initial=s0, keep=[s0.numel(), k], pinned=pinned))
    ref = kv_from_cache(run(prep, "a3", 0.5, selected=s0).cache)   # [L, 2, H, N + Q, D]
    got = kv_from_cache(res.cache)
    attn = prep.ctx.question_attention(s0)[0].sum(0)[s0 - lay.prefix_len]     # layer 0, [S_0]
    attn[-2:] = float("inf")
    want = s0[torch.sort(attn, descending=True, stable=True).indices[:k].sort().values]
    assert torch.equal(res.kept, want) and torch.isin(pinned, res.kept).all()
    assert res.layer_counts == [s0.numel(), k] and res.n_recomputed == round((s0.numel() + k) / 2)
    assert torch.allclose(got[0], ref[0], atol=1e-5)
    dropped = s0[~torch.isin(s0, want)]
    keep_rows = torch.cat((want, torch.arange(lay.question_start, lay.total_len)))
    assert torch.allclose(got[1][:, :, keep_rows], ref[1][:, :, keep_rows], atol=1e-5)
    assert torch.equal(got[1][:, :, dropped], prep.kv[1][:, :, dropped])
    assert not torch.allclose(res.logits, run(prep, "a3", 0.5, selected=s0).logits)


def test_gradual_selector_plans_chunk_starts_then_probe_picks(lm, prompt):
    prep = prepare(lm, *prompt)
    budget = round(0.3 * prep.layout.context_len)
    plan = gradual.plan(prep.ctx, budget)
    starts = kvfuse_staged.chunk_starts(prep.ctx, budget)
    assert plan.keep == layer_schedule(list(gradual.LEVELS), lm.spec.n_layers, budget, prep.layout.context_len)
    assert torch.isin(starts, plan.initial).all() and torch.equal(plan.pinned, starts)
    assert plan.initial.numel() > budget > plan.keep[-1]


# ----------------------------------------------------------------------------- incremental selection (repairs)

def _register(monkeypatch, name, fn):
    monkeypatch.setitem(SELECTORS, name, fn)


@pytest.mark.parametrize("name", ["kvfuse", "kvfuse-inc"])
def test_incremental_probes_run_each_pick_once_and_equal_joint_probes_on_two_layers(lm, prompt, monkeypatch, name):
    """The probes recompute the chunk starts, then stage 1's and stage 2's picks, each once, into
    the run's working cache; the final pass runs every pick (kvfuse) or only stage 3's (kvfuse-inc)
    with the question. With 2 layers a recomputed token's K/V are exact whatever else is stale
    (layer-0 K/V depend on the token alone), so both must select and answer as joint probes do."""
    from kvfuse.runtime import fusion
    prep = prepare(lm, *prompt)
    stored = prep.kv.clone()
    sizes = []
    real = fusion.recompute
    monkeypatch.setattr(fusion, "recompute", lambda *a, **k: sizes.append(a[5].numel()) or real(*a, **k))
    res = run(prep, name, 0.3)
    budget = round(0.3 * prep.layout.context_len)
    starts = kvfuse_staged.chunk_starts(prep.ctx, budget)
    rest = budget - starts.numel()
    third = [round(rest * k / 3) for k in range(4)]
    stages = [starts.numel()] + [b - a for a, b in zip(third, third[1:])]
    assert sizes == stages[:3] + ([budget] if name == "kvfuse" else stages[3:])   # 3 probes + the final pass
    assert res.n_recomputed == budget
    assert torch.equal(prep.kv, stored)                                   # the stored KV are untouched
    monkeypatch.setattr(fusion, "recompute", real)
    joint = run(prep, "kvfuse-joint-probes", 0.3)
    assert torch.equal(res.recomputed, joint.recomputed)
    assert (res.logits - joint.logits).abs().max() < 1e-4
    assert torch.allclose(kv_from_cache(res.cache), kv_from_cache(joint.cache), atol=1e-5)


def test_repair_reduces_where_the_pass_ran(lm, prompt):
    """`repair(reduce=)` returns the reduction of the attention the same pass gives without it,
    bit for bit (on the CPU the same ops run on the same tensor)."""
    from kvfuse.runtime.selectors.base import fused_layer_attention
    first, second = prepare(lm, *prompt), prepare(lm, *prompt)     # each with its own working cache
    new = torch.tensor([start + 1 for start in first.layout.chunk_starts])
    plain = fused_layer_attention(first.ctx.repair(new))
    reduced = second.ctx.repair(new, reduce=fused_layer_attention)
    assert reduced.shape == plain.shape == (first.layout.context_len,)
    assert torch.equal(reduced, plain)


def test_incremental_run_does_not_leak_into_later_runs(lm, prompt):
    prep = prepare(lm, *prompt)
    fresh = run(prepare(lm, *prompt), "kvfuse-joint-probes", 0.3)
    run(prep, "kvfuse-inc", 0.3)
    after = run(prep, "kvfuse-joint-probes", 0.3)
    assert torch.equal(after.recomputed, fresh.recomputed) and torch.equal(after.logits, fresh.logits)


def test_repairing_every_token_at_once_is_the_full_prefill(tmp_path_factory, monkeypatch):
    """One repair pass of all context tokens + the question over the working cache, then a final
    pass of the question alone: a full prefill (4 layers, where stale K/V would show)."""
    lm4 = load_model(str(tiny_model_dir(tmp_path_factory, arch="llama", num_hidden_layers=4)))
    use_kvfuse_attention(lm4.model)
    p = make_prompt(lm4)
    ids, ref_cache, ref_logits = full_reference(lm4, p)

    def repair_all(ctx, budget):
        everything = torch.arange(ctx.layout.prefix_len, ctx.layout.question_start)
        ctx.repair(everything)
        return everything

    _register(monkeypatch, "repair-all", repair_all)
    prep = prepare(lm4, *p)
    res = run(prep, "repair-all", 0.5)
    assert (res.logits - ref_logits).abs().max() < 1e-3
    assert torch.allclose(kv_from_cache(res.cache), kv_from_cache(ref_cache), atol=1e-4)
    # ... while staged picks repaired one stage at a time are an approximation there
    inc = run(prep, "kvfuse-inc", 0.5)
    joint = run(prep, "kvfuse-inc", 0.5, selected=inc.recomputed)
    assert not torch.allclose(kv_from_cache(inc.cache), kv_from_cache(joint.cache), atol=1e-4)


def test_a_repaired_token_must_be_returned(lm, prompt, monkeypatch):
    def forgets(ctx, budget):
        ctx.repair(torch.tensor([ctx.layout.prefix_len]))
        return torch.tensor([ctx.layout.prefix_len + 1])

    def twice(ctx, budget):
        ctx.repair(torch.tensor([ctx.layout.prefix_len]))
        ctx.repair(torch.tensor([ctx.layout.prefix_len]))

    _register(monkeypatch, "forgets", forgets)
    _register(monkeypatch, "twice", twice)
    prep = prepare(lm, *prompt)
    with pytest.raises(ValueError, match="did not select"):
        run(prep, "forgets", 0.1)
    with pytest.raises(ValueError, match="repaired twice"):
        run(prep, "twice", 0.1)
