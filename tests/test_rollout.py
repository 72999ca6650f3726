"""rollout.generate against Hugging Face generate and a teacher-forced forward pass, in each of its modes."""
import pytest
import torch

import decode
import kvcache
import graphs
from conftest import tiny_model
from rollout import generate
from sampling import filter_logits, sample

PROMPT_LENGTHS = (5, 9, 3, 12, 7)
# the CPU path (oneDNN-packed weights, eager, exact shapes); the modules as they are (what CUDA runs);
# CUDA's static shapes (rows padded to buckets, power-of-two cache spans, stop checks every 3 steps), run eagerly
MODES = {"packed": {}, "unpacked": dict(pack=False), "static": dict(pack=False, static=True, sync_every=3)}


@pytest.fixture(params=list(MODES))
def mode(request):
    return MODES[request.param]


def prompts_for(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def hf_greedy(model, prompt, n, eos=None):
    ids = torch.tensor([prompt])
    kw = dict(eos_token_id=eos) if eos is not None else dict(min_new_tokens=n, eos_token_id=None)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3_text"])
def test_greedy_matches_hf_generate_one_by_one(arch, mode):
    model, prompts = tiny_model(arch), prompts_for()
    r = generate(model, prompts, max_new_tokens=12, temperature=0, **mode)
    for i, p in enumerate(prompts):  # gemma3: prompt + response spans its sliding window of 6
        assert r.tokens[i].tolist() == hf_greedy(model, p, 12)
    assert r.lengths.tolist() == [12] * len(prompts) and not r.finished.any()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 0.9)])
def test_logprobs_equal_teacher_forcing(arch, temperature, top_k, top_p, mode):
    model, prompts = tiny_model(arch), prompts_for()
    r = generate(model, prompts, max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p, seed=3,
                 eos_token_id=[5, 6, 7, 8], **mode)
    for i, p in enumerate(prompts):
        n = r.lengths[i].item()
        resp = r.tokens[i, :n]
        logits = model(torch.tensor([p + resp.tolist()])).logits[0, len(p) - 1:-1] / temperature  # (n, V)
        want = logits.log_softmax(-1).gather(-1, resp[:, None])[:, 0]
        torch.testing.assert_close(r.logprobs[i, :n], want, atol=1e-4, rtol=0)
        assert (r.logprobs[i, n:] == 0).all()


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_eos_lengths_padding_and_compaction(arch, mode):
    """Greedy with several EOS ids: rows end at different steps, the batch is compacted; each row equals HF's."""
    model, prompts = tiny_model(arch), prompts_for(2) * 3  # 15 rows
    first = [hf_greedy(model, p, 20) for p in prompts]
    never = set(first[2])  # rows of prompt 2 must run to the end
    eos = sorted(({first[0][2], first[1][5], first[3][9], first[4][14]} - never) or {96})  # rows end at different steps
    r = generate(model, prompts, max_new_tokens=20, temperature=0, eos_token_id=eos, pad_token_id=0, **mode)
    assert r.finished.any() and not r.finished.all() and len(set(r.lengths.tolist())) > 2
    for i, p in enumerate(prompts):
        want = hf_greedy(model, p, 20, eos=eos)
        n = r.lengths[i].item()
        assert r.tokens[i, :n].tolist() == want[:n]
        assert (r.tokens[i, n:] == 0).all()
        assert r.finished[i].item() == (r.tokens[i, n - 1].item() in eos)
        assert not any(t in eos for t in r.tokens[i, :n - 1].tolist())


def test_seed_reproducible():
    model, prompts = tiny_model("qwen3"), prompts_for()
    a = generate(model, prompts, max_new_tokens=16, seed=7)
    b = generate(model, prompts, max_new_tokens=16, seed=7)
    c = generate(model, prompts, max_new_tokens=16, seed=8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


def test_a_batch_split_in_parts_samples_what_the_whole_batch_samples(mode):
    """batch_index: each row gets its draws from the whole batch's stream (what lets ranks share a step)."""
    model, prompts = tiny_model("llama"), prompts_for()
    kw = dict(max_new_tokens=10, seed=4, eos_token_id=[5, 6, 7], **mode)
    whole = generate(model, prompts, **kw)
    for part in ([3, 0], [1, 4, 2]):  # any rows, in any order
        r = generate(model, [prompts[i] for i in part], batch_index=part, batch_rows=len(prompts), **kw)
        assert torch.equal(r.tokens, whole.tokens[part]) and torch.equal(r.lengths, whole.lengths[part])
        torch.testing.assert_close(r.logprobs, whole.logprobs[part], atol=1e-5, rtol=0)
    alone = generate(model, [prompts[3], prompts[0]], **kw)  # without batch_index: its own stream
    assert not torch.equal(alone.tokens, whole.tokens[[3, 0]])
    with pytest.raises(ValueError, match="distinct rows in 0..4"):
        generate(model, prompts[:2], batch_index=[0, 5], batch_rows=5, **kw)
    with pytest.raises(ValueError, match="distinct"):
        generate(model, prompts[:2], batch_index=[1, 1], batch_rows=5, **kw)


def test_top_k_top_p_keep_exactly_the_right_tokens():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True, True]]
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05
    keep = lambda p: (~torch.isinf(filter_logits(probs.log(), top_p=p))).tolist()[0]
    assert keep(0.4) == [False, True, False, False]
    assert keep(0.75) == [False, True, False, True]
    assert keep(0.85) == [False, True, True, True]
    assert keep(1.0) == [True, True, True, True]
    assert (~torch.isinf(filter_logits(probs.log(), top_k=3, top_p=0.75))).tolist()[0] == [False, True, False, True]


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -30.0]]).repeat(20000, 1)
    tok, lp = sample(logits, 1.0, 0, 1.0, torch.rand(len(logits), generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(tok, minlength=4).float() / len(tok)
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.015, rtol=0)
    assert (tok != 3).all()
    tok, _ = sample(logits[:100], 1.0, 2, 1.0, torch.rand(100, generator=torch.Generator().manual_seed(0)))
    assert set(tok.tolist()) <= {1, 2}


def test_bad_inputs():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[5], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="context"):
        generate(model, [[5] * 250], max_new_tokens=10)  # context is 256
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[5]], max_new_tokens=4, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[5]], max_new_tokens=4, top_p=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[5]], max_new_tokens=4, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, [[5]], max_new_tokens=4, top_k=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[5]], max_new_tokens=0)


def test_bf16_rollout_copy_keeps_the_model_and_stays_close():
    """A bf16 copy samples; the float32 model is untouched, and the log-probs it reports stay within bf16's rounding of
    the float32 policy's on the same tokens (bf16 keeps 8 bits: 2^-8 relative on logits of |x| <~ 10 here)."""
    model, prompts = tiny_model("qwen3"), prompts_for()
    r = generate(model, prompts, max_new_tokens=6, seed=0, dtype=torch.bfloat16)
    assert model.dtype == torch.float32 and r.tokens.shape == (len(prompts), 6)
    d = []
    for i, p in enumerate(prompts):
        want = model(torch.tensor([p + r.tokens[i].tolist()])).logits[0, len(p) - 1:-1].log_softmax(-1)
        d.append((want.gather(-1, r.tokens[i, :, None])[:, 0] - r.logprobs[i]).abs())
    d = torch.cat(d)
    assert 0 < d.mean() < 0.1 and d.max() < 0.5


def test_repeated_prompts_share_one_prefill(mode):
    """A GRPO group repeats its prompt: rows prefilled once and shared equal rows prefilled alone."""
    model, prompts = tiny_model("qwen3"), prompts_for()
    grouped = [p for p in prompts[:3] for _ in range(4)]
    r = generate(model, grouped, max_new_tokens=8, temperature=0, **mode)
    for i, p in enumerate(grouped):
        assert r.tokens[i].tolist() == hf_greedy(model, p, 8)
    s = generate(model, grouped, max_new_tokens=8, seed=1, eos_token_id=[5, 6], **mode)
    for i, p in enumerate(grouped):
        n = s.lengths[i].item()
        want = model(torch.tensor([p + s.tokens[i, :n].tolist()])).logits[0, len(p) - 1:-1].log_softmax(-1)
        torch.testing.assert_close(s.logprobs[i, :n], want.gather(-1, s.tokens[i, :n, None])[:, 0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_equal_length_prompts_need_no_mask(arch, mode):
    """No padding: decode runs without a key mask (Gemma 3 still applies its sliding window)."""
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 97, (8,), generator=g).tolist() for _ in range(3)]
    r = generate(model, prompts, max_new_tokens=10, temperature=0, **mode)
    for i, p in enumerate(prompts):
        assert r.tokens[i].tolist() == hf_greedy(model, p, 10)


def test_weights_changed_in_place_are_sampled_from():
    """An optimizer step changes the weights in place (fused AdamW does not bump their version counters): the next
    call must sample from the new weights, not from packed copies of the old ones."""
    model, prompts = tiny_model("llama"), prompts_for()
    generate(model, prompts, max_new_tokens=8, temperature=0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    r = generate(model, prompts, max_new_tokens=8, temperature=0)
    for i, p in enumerate(prompts):
        assert r.tokens[i].tolist() == hf_greedy(model, p, 8)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_shared_prefix_is_prefilled_once(arch, mode):
    """Prompts that share a system prompt: the prefix runs once and the rest follows it after the padding;
    greedy tokens equal HF's one prompt at a time, sampled log-probs equal teacher forcing."""
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(7)
    system = torch.randint(3, 97, (9,), generator=g).tolist()
    prompts = [system + torch.randint(3, 97, (n,), generator=g).tolist() for n in (1, 4, 2, 6)]
    assert kvcache.common_prefix(prompts) == 9
    r = generate(model, prompts, max_new_tokens=10, temperature=0, **mode)
    for i, p in enumerate(prompts):
        assert r.tokens[i].tolist() == hf_greedy(model, p, 10)
    s = generate(model, prompts * 2, max_new_tokens=10, seed=2, eos_token_id=[5, 6, 7], **mode)
    for i, p in enumerate(prompts * 2):
        n = s.lengths[i].item()
        want = model(torch.tensor([p + s.tokens[i, :n].tolist()])).logits[0, len(p) - 1:-1].log_softmax(-1)
        torch.testing.assert_close(s.logprobs[i, :n], want.gather(-1, s.tokens[i, :n, None])[:, 0], atol=1e-4, rtol=0)


def test_the_bf16_sampling_copy_keeps_float32_rotary_frequencies():
    """generate(dtype=bf16) samples from a copy whose cos/sin are float32's rounded once to bf16, at every position up
    to 8k (a bf16 inv_freq would be off by up to 2.0 there), as in a model built in bf16."""
    model = tiny_model("llama", max_position_embeddings=8192, rope_theta=10000.0)
    copy = kvcache.cast_copy(model, torch.bfloat16)
    assert copy.model.rotary_emb.inv_freq.dtype == torch.float32 and copy.dtype == torch.bfloat16
    pos = torch.arange(8192)[None]
    cos32, sin32 = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
    cos16, sin16 = copy.model.rotary_emb(torch.zeros(1, dtype=torch.bfloat16), pos)
    assert torch.equal(cos16, cos32.to(torch.bfloat16)) and torch.equal(sin16, sin32.to(torch.bfloat16))
    naive = copy.model.rotary_emb.inv_freq.to(torch.bfloat16).float()  # what a plain .to(bf16) kept
    assert (pos[0, -1] * (naive - model.model.rotary_emb.inv_freq)).abs().max() > 0.5  # radians off at position 8k


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_static_spans_of_a_few_slots_match_hf_generate(arch, monkeypatch):
    """CUDA's static shapes with spans of 4 cache slots (128 in use): the attended span grows 4 slots at a time, masked
    beyond the filled ones, and greedy decoding still equals HF generate token for token."""
    monkeypatch.setattr(decode, "SPAN", 4)
    spans = []
    real = decode._span
    monkeypatch.setattr(decode, "_span", lambda filled, S, static: spans.append(real(filled, S, static)) or spans[-1])
    model, prompts = tiny_model(arch), prompts_for()
    r = generate(model, prompts, max_new_tokens=12, temperature=0, pack=False, static=True, sync_every=3)
    for i, p in enumerate(prompts):
        assert r.tokens[i].tolist() == hf_greedy(model, p, 12)
    assert all(s % 4 == 0 for s in spans[:-1]) and len(set(spans)) >= 3


@pytest.mark.parametrize("T", [1, 3])
def test_attention_folds_query_groups_exactly_with_and_without_sdpa(T):
    """kvcache._attention on a strided cache view with a mask, grouped queries folded into the query length: the
    written-out path (CPU) and the fused SDPA call (CUDA's) equal attention with K/V repeated to every head."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, S, hd = 3, 6, 2, 9, 8
    q = torch.randn(B, T, H, hd, generator=g).transpose(1, 2)  # (B, H, T, hd), strided as _attend's
    cache = torch.randn(B, Hkv, S + 4, hd, generator=g)
    K, V = cache[:, :, :S], cache.flip(0)[:, :, :S]  # views of a larger cache, as the engine attends
    mask = torch.rand(B, 1, T, S, generator=g) > 0.3
    mask[..., 0] = True  # every query sees a key
    # head h reads K/V head h // g, as HF's repeat_kv
    Kr, Vr = K.repeat_interleave(H // Hkv, 1), V.repeat_interleave(H // Hkv, 1)
    want = ((q @ Kr.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf")).softmax(-1)) @ Vr
    for sdpa in (False, True):
        torch.testing.assert_close(kvcache._attention(q, K, V, mask, 0.3, sdpa), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_the_fused_attention_path_matches_hf_generate(arch):
    """CUDA's attention call (SDPA on the folded groups, the sliding window's mask included) run on CPU with static
    shapes (attention="sdpa"): greedy decoding equals HF generate token for token."""
    model, prompts = tiny_model(arch), prompts_for()
    r = generate(model, prompts, max_new_tokens=12, temperature=0, pack=False, static=True, sync_every=3,
                 attention="sdpa")
    for i, p in enumerate(prompts):
        assert r.tokens[i].tolist() == hf_greedy(model, p, 12)


def spans_cover_every_row_that_runs(monkeypatch):
    """Check at every decode step that the attended span holds each running row's slot, P - 1 + t (rows that ended
    but still run in the bucket included), and that no row attends beyond it."""
    real = decode._step

    def step(fwd, model, packed, cache, s, b, span, opts):
        assert span >= int(s.P) + int(s.t[:b].max()), "a running row writes beyond the attended span"
        return real(fwd, model, packed, cache, s, b, span, opts)
    monkeypatch.setattr(decode, "_step", step)


def test_a_row_that_ended_runs_on_inside_the_span_beside_younger_rows(mode, monkeypatch):
    """9 rows: 8 copies of prompt A end at token 4 and 8 copies of C take their rows; B ends at token 7 while the C rows
    are at token 3, and (1 row of 9: no compaction) runs on beside them: the span must cover its slot, not only the
    live rows' (greedy, EOS ids picked from the three prompts' free runs so that this order holds)."""
    model, g = tiny_model("llama"), torch.Generator().manual_seed(0)
    A, B, C = (torch.randint(10, 97, (5,), generator=g).tolist() for _ in range(3))
    a, b, c = generate(model, [A, B, C], max_new_tokens=10, temperature=0).tokens.tolist()
    assert a[4] not in a[:4] + b[:8] + c[:3] and b[7] not in a[:5] + b[:7] + c[:3]  # the order described
    kw = dict(max_new_tokens=10, temperature=0, eos_token_id=[a[4], b[7]], **mode)
    prompts = [A] * 8 + [B] + [C] * 8
    whole = generate(model, prompts, **kw)
    spans_cover_every_row_that_runs(monkeypatch)
    r = generate(model, prompts, max_batch=9, **kw)
    assert (r.lengths[:9].tolist() == [5] * 8 + [8] and torch.equal(r.tokens, whole.tokens)
            and torch.equal(r.lengths, whole.lengths))


def test_a_batch_that_ends_at_once_is_refilled_without_the_old_rows_slots(mode):
    """Prompts of one length, no EOS: every row stops at max_new_tokens together and 4 new prompts fill the
    empty batch; they attend their own slots only (not the slots the ended rows had reached), so each prompt
    samples what it samples in one batch of all."""
    model, g = tiny_model("llama"), torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 97, (6,), generator=g).tolist() for _ in range(12)]
    whole = generate(model, prompts, max_new_tokens=7, seed=1, **mode)
    r = generate(model, prompts, max_new_tokens=7, seed=1, max_batch=4, **mode)
    assert torch.equal(r.tokens, whole.tokens)
    torch.testing.assert_close(r.logprobs, whole.logprobs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch,rows", [("llama", 3), ("qwen3", 3), ("gemma3_text", 3), ("llama", 9),
                                       ("gemma3_text", 9)])
def test_continuous_batching_refills_rows_and_samples_what_one_batch_samples(arch, rows, mode, monkeypatch):
    """3 or 9 rows for 22 prompts of different lengths: a row that finishes takes the next waiting prompt,
    prefilled into it while the other rows decode on (rows at different steps; a shorter prompt ends where the
    longest does, Gemma's sliding window on the shifted slots). Each prompt's tokens, lengths and log-probs equal
    those of all prompts in one batch, and its log-probs equal teacher forcing."""
    model, g = tiny_model(arch), torch.Generator().manual_seed(9)
    prompts = [torch.randint(10, 97, (n,), generator=g).tolist() for n in (4, 11, 2, 7, 9, 3, 12, 5, 8, 6, 10) * 2]
    free = generate(model, prompts, max_new_tokens=14, seed=5, **mode).tokens
    kw = dict(max_new_tokens=14, seed=5, eos_token_id=sorted({free[0, 2].item(), free[1, 6].item(), free[3, 9].item()}),
              **mode)
    whole = generate(model, prompts, **kw)  # rows end at different steps
    live, real = [], decode._admit
    monkeypatch.setattr(decode, "_admit", lambda d, *a: live.append(int(d.s.alive.sum())) or real(d, *a))
    spans_cover_every_row_that_runs(monkeypatch)
    r = generate(model, prompts, max_batch=rows, **kw)  # 9 rows: an ended row may stay among live ones (no compaction)
    assert len(live) > 3 and max(live) > 0  # prompts entered while other rows were decoding
    assert (torch.equal(r.tokens, whole.tokens) and torch.equal(r.lengths, whole.lengths)
            and torch.equal(r.finished, whole.finished))
    torch.testing.assert_close(r.logprobs, whole.logprobs, atol=1e-4, rtol=0)  # other batch shapes: float32 rounding
    assert len(set(r.lengths.tolist())) > 2 and r.finished.any()
    for i, p in enumerate(prompts):
        n = r.lengths[i].item()
        want = model(torch.tensor([p + r.tokens[i, :n].tolist()])).logits[0, len(p) - 1:-1].log_softmax(-1)
        torch.testing.assert_close(r.logprobs[i, :n], want.gather(-1, r.tokens[i, :n, None])[:, 0], atol=1e-4, rtol=0)


def test_a_kept_decoder_serves_later_calls_on_the_same_buffers_with_nothing_call_specific_in_its_step(monkeypatch):
    """Static shapes keep the Decoder across calls (CUDA replays the graphs captured on its buffers): a second call
    with other prompts, another prompt length and fewer new tokens runs on the same buffers, and its step, traced
    by torch.compile with static shapes, compiles no new graph: none of the call's numbers is baked into the step
    (a CUDA graph would replay a baked one). Its tokens equal the eager per-call path's and HF generate's."""
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    monkeypatch.setattr(graphs, "COMPILE", dict(dynamic=False, fullgraph=True, backend=counter))
    model, kw = tiny_model("qwen3"), dict(temperature=0, pack=False, static=True, sync_every=3, compile=True)
    first = generate(model, prompts_for(1), max_new_tokens=12, **kw)
    cache, frames = ([x.data_ptr() for kv in next(reversed(decode._DECODERS.values())).cache for x in kv],
                     counter.frame_count)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (4, 6, 10, 2, 8)]
    r = generate(model, prompts, max_new_tokens=9, **kw)
    assert [x.data_ptr() for kv in next(reversed(decode._DECODERS.values())).cache for x in kv] == cache
    assert counter.frame_count == frames > 0 and first.setup_s > 0 == r.setup_s
    for i, p in enumerate(prompts):
        assert r.tokens[i].tolist() == hf_greedy(model, p, 9)
    sampled = [generate(model, prompts, max_new_tokens=9, seed=s, **{**kw, "temperature": 1.0}) for s in (1, 1, 2)]
    eager = generate(model, prompts, max_new_tokens=9, seed=1, pack=False)
    assert torch.equal(sampled[0].tokens, eager.tokens) and torch.equal(sampled[1].tokens, eager.tokens)
    assert not torch.equal(sampled[2].tokens, eager.tokens)


def test_the_kept_bf16_copy_follows_the_weights_it_was_made_from():
    """dtype=bf16 samples with a kept copy refreshed in place: after the float32 weights change (an optimizer step),
    the next call samples what a fresh copy of the new weights samples, on the same copy."""
    model, prompts = tiny_model("llama"), prompts_for()
    kw = dict(max_new_tokens=10, seed=3, dtype=torch.bfloat16)
    before = generate(model, prompts, **kw)
    copy = decode.sampling_copy(model, torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    after = generate(model, prompts, **kw)
    assert decode.sampling_copy(model, torch.bfloat16) is copy
    decode.release()
    fresh = generate(model, prompts, **kw)
    assert decode.sampling_copy(model, torch.bfloat16) is not copy
    assert torch.equal(after.tokens, fresh.tokens) and torch.equal(after.logprobs, fresh.logprobs)
    assert not torch.equal(after.tokens, before.tokens)


def test_the_compiled_step_matches_hf_generate():
    """CUDA's compiled step (torch.compile's inductor, one compile for every bucket and span), run on CPU: greedy
    tokens equal HF generate's, sampled ones the eager step's; the compile is paid once (setup_s), not again
    by a second call of the same shapes."""
    model, prompts = tiny_model("qwen3"), prompts_for()
    kw = dict(max_new_tokens=10, pack=False, static=True, sync_every=3, compile=True)
    r = generate(model, prompts, temperature=0, **kw)
    for i, p in enumerate(prompts):
        assert r.tokens[i].tolist() == hf_greedy(model, p, 10)
    again = generate(model, prompts, temperature=0, **kw)
    assert r.setup_s > 0 and again.setup_s == 0 and torch.equal(again.tokens, r.tokens)
    sampled, eager = (generate(model, prompts, seed=2, **kw),
                      generate(model, prompts, max_new_tokens=10, seed=2, pack=False))
    assert torch.equal(sampled.tokens, eager.tokens)
    torch.testing.assert_close(sampled.logprobs, eager.logprobs, atol=1e-4, rtol=0)
