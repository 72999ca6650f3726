"""update.py: the PPO update against hand computations and the Hugging Face gradient, micro-batches, the on-policy
first mini-batch, KL terms, host syncs; the rollout of a step in chunks."""
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import policy
import update
from config import GRPOConfig
from conftest import FakeTok, tiny_model
from distributed import Wrapped
from loss import aggregate, kl_penalty, policy_loss
from policy import Batch, output_policy, pad_rows
from rollout import generate

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def fixed_batch(model, G=4, prompts=((5, 6, 7, 8), (9, 10, 11)), seed=0):
    """Two groups of sampled responses with hand-set advantages."""
    rows = [list(p) for p in prompts for _ in range(G)]
    r = generate(model, rows, max_new_tokens=6, seed=seed, eos_token_id=[5, 6])
    responses = [r.tokens[i, :r.lengths[i]].tolist() for i in range(len(rows))]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.3, -0.2, 0.9, -1.0][:len(rows)])
    return Batch(*pad_rows(rows, responses, 0), adv)


class GradRecorder:
    """An optimizer stand-in: records each mini-batch's gradients, changes nothing."""
    def __init__(self, model):
        self.model, self.grads = model, []

    def step(self):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def update_grads(model, batch, cfg, **kw):
    runner, rec = Wrapped(model), GradRecorder(model)
    old, _ = update.policy_logprobs(output_policy, runner, batch, cfg)
    stats, _ = update.ppo_update(runner, rec, output_policy, batch, old, kw.pop("ref", None), cfg, **kw)
    return rec.grads, stats, old


@pytest.mark.parametrize("agg", AGGS)
def test_micro_batches_add_up_to_the_mini_batch_gradient(agg):
    """Gradient accumulation over micro-batches of 1, 3 or 8 rows gives the gradient of the whole mini-batch."""
    model = tiny_model("llama")
    batch = fixed_batch(model)
    cfg = GRPOConfig(group_size=4, mini_batch_prompts=2, loss_agg=agg, max_new_tokens=6, precision="float32")
    grads = [update_grads(model, batch, replace(cfg, micro_batch=mb))[0][0] for mb in (1, 3, 8)]
    for g in grads[:2]:
        for n in g:
            torch.testing.assert_close(g[n], grads[2][n], atol=1e-6, rtol=1e-4)


def test_on_policy_first_mini_batch_equals_a_separate_old_pass():
    """The first mini-batch's old log-probs taken from the update itself (detached) change nothing: same stats and
    weights, to float rounding (the old pass groups rows into other micro-batches, so its products have other
    shapes)."""
    model = tiny_model("qwen3")
    batch = fixed_batch(model)
    cfg = GRPOConfig(group_size=4, mini_batch_prompts=1, micro_batch=3, max_new_tokens=6, precision="float32",
                          clip_low=0.1)
    runs = []
    for on_policy in (True, False):
        m = tiny_model("qwen3")
        runner, opt = Wrapped(m), torch.optim.AdamW(m.parameters(), lr=1e-2)
        rows = torch.arange(4 if on_policy else 0, 8)  # the later mini-batch only, or every row
        old, ent = update.policy_logprobs(output_policy, runner, batch, cfg, rows=rows)
        stats, first = update.ppo_update(runner, opt, output_policy, batch, old, None, cfg, on_policy_first=on_policy)
        runs.append((stats, ent + first, [p.detach().clone() for p in m.parameters()]))
    (s1, e1, p1), (s2, e2, p2) = runs
    assert s1 == pytest.approx(s2, rel=1e-4, abs=1e-7) and s1["approx_kl"] > 1e-2  # the 2nd mini-batch is off-policy
    torch.testing.assert_close(e1, e2, atol=1e-5, rtol=1e-5)
    # whole updates: Adam turns rounding noise on ~0 gradients into ~lr
    for a, b, p0 in zip(p1, p2, tiny_model("qwen3").parameters()):
        assert (a - b).norm() <= 1e-3 * (a - p0).norm()


def test_ppo_update_returns_the_first_mini_batchs_entropies_and_changes_none_of_its_arguments():
    """Issue 33: ppo_update returns the on-policy first mini-batch's entropies (those of the weights before the update,
    as a separate pass computes them; 0 in the later rows, everywhere without on_policy_first) and writes into none of
    the tensors it is given."""
    model = tiny_model("qwen3")
    batch = fixed_batch(model)
    cfg = GRPOConfig(group_size=4, mini_batch_prompts=1, micro_batch=3, max_new_tokens=6, precision="float32")
    runner = Wrapped(model)
    _, before = update.policy_logprobs(output_policy, runner, batch, cfg)  # (8, T) every row, before any update
    old, ent = update.policy_logprobs(output_policy, runner, batch, cfg, rows=range(4, 8))
    args = lambda: (old, ent, batch.input_ids, batch.attention_mask, batch.response_mask, batch.advantages)
    given = [t.clone() for t in args()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats, first = update.ppo_update(runner, opt, output_policy, batch, old, None, cfg)
    assert stats["updates"] == 2 and stats["approx_kl"] > 0  # the later mini-batch ran on updated weights
    torch.testing.assert_close(first[:4], before[:4])
    assert first[4:].abs().sum() == 0
    assert all(torch.equal(a, b) for a, b in zip(given, args()))
    _, none = update.ppo_update(runner, torch.optim.AdamW(model.parameters()), output_policy, batch, old, None, cfg,
                                on_policy_first=False)
    assert none.shape == before.shape and none.abs().sum() == 0


def test_kl_term_by_hand():
    """The logged KL is k3 between the policy and the reference on the sampled tokens, token-mean over the
    mini-batch."""
    model, ref = tiny_model("llama"), tiny_model("llama", seed=1)
    batch = fixed_batch(model)
    cfg = GRPOConfig(group_size=4, mini_batch_prompts=2, micro_batch=3, max_new_tokens=6, precision="float32",
                          kl_coef=0.1)
    ref_logp, _ = update.policy_logprobs(output_policy, Wrapped(ref), batch, cfg)
    _, stats, old = update_grads(model, batch, cfg, ref=ref_logp)
    lp = old[batch.response_mask]  # the policy before the update: the first (only) mini-batch is on-policy
    r = torch.exp(ref_logp[batch.response_mask] - lp)
    k3 = r - 1 - torch.log(r)
    assert (k3 > 10).any()  # this pair of random models has tokens past verl's bound
    # verl's low_var_kl clamps to [-10, 10]
    assert stats["kl"] == pytest.approx(k3.clamp(max=10).mean().item(), rel=1e-5)


def test_kl_estimators_hand_computed():
    """k1 and k3 on hand-set log-probs: log pi = -1, log ref = -2 gives k1 = 1, k3 = e^-1 - 1 + 1 = 0.3679;
    a token 30 nats apart gives k3 = e^30 - 31, clamped to 10."""
    logp, ref = torch.tensor([-1.0, -1.0, -31.0]), torch.tensor([-2.0, -1.0, -1.0])
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx([1.0, 0.0, -30.0])
    assert kl_penalty(logp, ref, "k3").tolist() == pytest.approx([0.36787944, 0.0, 10.0])
    mask = torch.tensor([[True, True, False]])
    assert aggregate(kl_penalty(logp, ref, "k1")[None], mask).item() == pytest.approx(0.5)


def test_updates_on_a_fixed_batch_lower_the_loss():
    model = tiny_model("qwen3")
    model.train()
    cfg = GRPOConfig(group_size=4, mini_batch_prompts=1, micro_batch=3, lr=3e-3, max_new_tokens=8,
                          precision="float32")
    batch = fixed_batch(model)
    runner = Wrapped(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    old, _ = update.policy_logprobs(output_policy, runner, batch, cfg)
    losses = [update.ppo_update(runner, opt, output_policy, batch, old, None, cfg, on_policy_first=False)[0]["pg_loss"]
              for _ in range(4)]
    assert losses[-1] < losses[0]


def test_rollout_in_chunks_samples_what_one_call_samples():
    """rollout_batch bounds the KV cache; every row keeps its random draws, so the batch is the same."""
    from problems import task_problems
    model, problems = tiny_model("llama"), task_problems("arithmetic", 3, 0, "train")
    cfg = GRPOConfig(group_size=4, max_new_tokens=6, seed=2)
    whole, res = update.rollout_step(model, FakeTok(), problems, cfg, step=1)
    parts, res2 = update.rollout_step(model, FakeTok(), problems, replace(cfg, rollout_batch=4), step=1)
    for f in ("input_ids", "attention_mask", "response_mask", "advantages"):
        assert torch.equal(getattr(whole, f), getattr(parts, f)), f
    assert all(torch.equal(res[k], res2[k]) for k in res)


class CallRecorder:
    """A runner that records the rows (token ids) of every forward it runs."""
    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def __call__(self, policy, ids, *args, **kw):
        self.calls.append(ids.tolist())
        return self.runner(policy, ids, *args, **kw)

    def parameters(self):
        return self.runner.parameters()


@pytest.mark.parametrize("micro", [3, 5, 8])
def test_old_logprobs_run_the_updates_micro_batches(micro):
    """The old-log-prob pass runs exactly the update's micro-batches (cut at mini-batch boundaries first), so that
    under bf16 the ratio of unchanged weights is 1 whatever the kernels' blocking, for any --micro-batch; with
    lr 0 every ratio is 1 and nothing is clipped."""
    model = tiny_model("qwen3")
    batch = fixed_batch(model)
    cfg = GRPOConfig(group_size=4, mini_batch_prompts=1, micro_batch=micro, max_new_tokens=6, precision="bfloat16",
                          lr=0.0)
    old_pass, update_pass = CallRecorder(Wrapped(model)), CallRecorder(Wrapped(model))
    old, _ = update.policy_logprobs(output_policy, old_pass, batch, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    stats, _ = update.ppo_update(update_pass, opt, output_policy, batch, old, None, cfg, on_policy_first=False)
    assert old_pass.calls == update_pass.calls and len(update_pass.calls) == 2 * -(-4 // micro)
    assert stats["updates"] == 2 and stats["approx_kl"] == 0.0
    assert stats["clip_frac_upper"] == stats["clip_frac_lower"] == 0.0


def hf_update_grads(model, batch, cfg, mini):
    """The trusted reference of one update's gradients: each row through Hugging Face's plain forward alone (no
    padding, no prompt sharing, no chunking), log_softmax(logits / T), verl's loss over the whole mini-batch of rows
    `mini`, clipped."""
    ids, resp = batch.input_ids[mini], batch.response_mask[mini]
    logp = torch.zeros(ids.shape)
    for i, n in enumerate(batch.attention_mask[mini].sum(1).tolist()):
        lp = (model(ids[i:i + 1, :n]).logits[0, :-1] / cfg.temperature).log_softmax(-1)  # (n-1, V)
        logp = logp.index_put((torch.tensor(i), torch.arange(1, n)), lp.gather(-1, ids[i, 1:n, None])[:, 0])
    loss, _ = policy_loss(logp, logp.detach(), batch.advantages[mini], resp, cfg.clip_low, cfg.clip_high, cfg.clip_c,
                               cfg.loss_agg, n_seqs=len(mini), max_len=cfg.max_new_tokens)
    model.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # as the update
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, loss.item()


@pytest.mark.parametrize("share,tokens", [((), 30), ((), 1 << 15), (("cpu",), 30), (("cpu",), 1 << 15)],
                         ids=["gpu-path-budget", "gpu-path-one-forward", "shared-prompts-budget", "shared-prompts-one"])
def test_budget_micro_batches_give_the_per_row_hf_gradient(share, tokens, monkeypatch):
    """The update's micro-batches sized by a token budget (30 tokens: 1-3 rows each; or the whole mini-batch in one
    forward), with prompts shared per group (the CPU path) or one plain forward (the GPU path), give the gradient and
    loss of each row run alone through Hugging Face's forward, to float rounding."""
    monkeypatch.setattr(policy, "SHARE_PROMPTS", share)
    model = tiny_model("qwen3")
    batch = fixed_batch(model)
    cfg = GRPOConfig(group_size=4, mini_batch_prompts=2, micro_batch=256, micro_tokens=tokens, max_new_tokens=6,
                          precision="float32", temperature=0.8)
    sizes = [len(range(8)[j]) * ids.shape[1] for j, ids, *_ in policy.micro_slices(batch, range(8), 256, tokens)]
    assert (max(sizes) <= tokens and len(sizes) > 2) if tokens == 30 else len(sizes) == 1
    (got,), stats, _ = update_grads(model, batch, cfg)
    want, loss = hf_update_grads(tiny_model("qwen3"), batch, cfg, list(range(8)))
    assert stats["pg_loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-4)


class HostReads(TorchDispatchMode):
    """Counts what reads a tensor's values back to the host: .item(), int(), float(), bool() (aten's
    _local_scalar_dense, which waits for the device on a GPU) and .tolist()."""
    def __init__(self, monkeypatch):
        super().__init__()
        self.n, tolist = 0, torch.Tensor.tolist
        monkeypatch.setattr(torch.Tensor, "tolist", lambda t: setattr(self, "n", self.n + 1) or tolist(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_one_host_sync_per_mini_batch(precision, monkeypatch):
    """On the GPU path (no prompt sharing), an update of 2 mini-batches of several micro-batches reads values back to
    the host twice: once per mini-batch (its statistics and gradient norm, which decide the step); the old-log-prob
    pass not at all. The batch's lengths are on the host, as rollout_step builds it."""
    monkeypatch.setattr(policy, "SHARE_PROMPTS", ())
    model = tiny_model("qwen3")
    b = fixed_batch(model)
    lengths = (b.attention_mask.sum(1).tolist(), b.response_mask.sum(1).tolist())
    batch = Batch(b.input_ids, b.attention_mask, b.response_mask, b.advantages, lengths)
    cfg = GRPOConfig(group_size=4, mini_batch_prompts=1, micro_tokens=30, max_new_tokens=6, precision=precision,
                          kl_coef=0.1)
    runner, opt = Wrapped(model), torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    with HostReads(monkeypatch) as reads:
        old, _ = update.policy_logprobs(output_policy, runner, batch, cfg, rows=range(4, 8))
    assert reads.n == 0
    with HostReads(monkeypatch) as reads:
        stats, _ = update.ppo_update(runner, opt, output_policy, batch, old, old, cfg)
    assert reads.n == 2 and stats["updates"] == 2 and len(list(policy.micro_slices(batch, range(4), 256, 30))) > 1
