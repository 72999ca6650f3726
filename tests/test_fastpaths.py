"""The decode step's fast paths on CPU: each way they failed on a GPU (issue 29), caught here.

SDPA's kernel-chosen output layout, torch.compile failing at its first call, the recompiles
of a GRPO run's calls against dynamo's limit, and a CUDA graph whose replay differs from its
warm-up (a stand-in graph object, so the check runs without a GPU)."""
import pytest
import torch
import torch.nn.functional as F

import decode
import graphs
import hardware
from conftest import tiny_model
from test_rollout import hf_greedy, prompts_for
import rollout
import bench_rollout
from bench_rollout import attention_kernels
from rollout import generate


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """Each test starts with no fallback taken and no kept Decoder."""
    monkeypatch.setattr(graphs, "FELL_BACK", {})
    decode.release()
    yield
    decode.release()


def cuda_layout_sdpa(q, K, V, **kw):
    """SDPA whose output is laid out as the flash and memory-efficient kernels lay it out on CUDA: (B, H, T, hd)
    values in a (B, T, H, hd) buffer, so that .view(B, H*g, T/g, hd) of it fails."""
    o = torch.ops.aten.scaled_dot_product_attention(q, K, V, **kw)
    return o.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("arch", ["qwen3", "llama", "gemma3_text"])
def test_sdpa_with_cudas_output_strides_changes_no_token(arch, monkeypatch):
    """Prefill (T > 1) and decode (T = 1) through SDPA with the (B, T, H, hd) strides of CUDA's fused kernels:
    greedy tokens equal HF generate's (the old `.view` raised here)."""
    model, prompts, calls = tiny_model(arch), prompts_for(), []
    want = [hf_greedy(model, p, 10) for p in prompts]
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(a[0].shape[2]) or cuda_layout_sdpa(*a, **kw))
    for static in (False, True):
        r = generate(model, prompts, max_new_tokens=10, temperature=0, pack=False, static=static, sync_every=3,
                     attention="sdpa")
        assert r.tokens.tolist() == want
    assert not cuda_layout_sdpa(torch.zeros(2, 2, 3, 4), torch.zeros(2, 2, 5, 4),
                                torch.zeros(2, 2, 5, 4)).is_contiguous()
    assert min(calls) == 2 and max(calls) > 2  # decode steps (g*T = 2 * 1) and prefills (g*T > 2) both went through it


def test_a_compile_that_raises_at_its_first_call_falls_back_with_one_warning(monkeypatch, capsys):
    """A torch.compile whose compiled forward raises at its first call: one warning line naming the reason, the
    step runs on eagerly and samples the eager tokens; a second call warns no more."""
    def broken(gm, inputs):
        raise RuntimeError("inductor says no")
    monkeypatch.setattr(graphs, "COMPILE", dict(dynamic=True, fullgraph=True, backend=broken))
    torch._dynamo.reset()
    model, prompts = tiny_model("qwen3"), prompts_for()
    kw = dict(max_new_tokens=10, seed=2, pack=False, static=True, sync_every=3)
    r = generate(model, prompts, compile=True, **kw)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "torch.compile off" in lines[0] and "inductor says no" in lines[0], lines
    assert r.mode == "eager" and "compile" in graphs.FELL_BACK
    eager = generate(model, prompts, compile=False, **kw)
    assert torch.equal(r.tokens, eager.tokens) and torch.equal(r.logprobs, eager.logprobs)
    again = generate(model, prompts, compile=True, **kw)
    assert capsys.readouterr().err == "" and torch.equal(again.tokens, eager.tokens)


def test_compile_is_refused_on_a_torch_with_the_split_scan_bug(monkeypatch, capsys):
    """compile=True on CUDA with torch 2.11 (pytorch/pytorch#180221): off, with the one warning line."""
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    assert not graphs.compile_allowed(torch.device("cuda"))
    assert "#180221" in capsys.readouterr().err
    monkeypatch.setattr(graphs, "FELL_BACK", {})
    monkeypatch.setattr(torch, "__version__", "2.12.0")
    assert graphs.compile_allowed(torch.device("cuda")) and graphs.compile_allowed(torch.device("cpu"))


def test_a_grpo_runs_calls_stay_within_the_recompile_limit(monkeypatch):
    """The compiled forward over the calls a GRPO run makes: training rollouts in a bf16 copy (continuous batching,
    every bucket), the greedy evaluation, a single prompt (bucket 1) and the float32 model itself. Counted by
    dynamo's counting backend, the compiles stay within decode's budget, below dynamo's recompile limit (past which
    a fullgraph compile raises); the sampling (temperature, top-k, top-p) is never compiled."""
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    monkeypatch.setattr(graphs, "COMPILE", dict(dynamic=True, fullgraph=True, backend=counter))
    torch._dynamo.reset()
    model, g = tiny_model("qwen3"), torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (4, 9, 6, 7)]
    group = [p for p in prompts for _ in range(4)]  # 16 rows
    kw = dict(pack=False, static=True, sync_every=3, compile=True, eos_token_id=[5, 6])
    for step in range(2):  # two training steps, 8 rows at a time, then their evaluation (evaluate.evaluate's way)
        generate(model, group, max_new_tokens=12, seed=step, dtype=torch.bfloat16, max_batch=8, **kw)
        with decode.kept_apart():
            generate(model, prompts, max_new_tokens=8, temperature=0, dtype=torch.bfloat16, max_batch=8, **kw)
    generate(model, prompts[:1], max_new_tokens=8, seed=0, dtype=torch.bfloat16, **kw)  # bucket 1
    r = generate(model, prompts, max_new_tokens=8, temperature=0, top_k=5, **kw)  # the float32 model
    assert not graphs.FELL_BACK and r.mode == "compile"
    assert 0 < counter.frame_count <= graphs.RECOMPILES < torch._dynamo.config.recompile_limit, counter.frame_count


class FakeGraph:
    """A stand-in for torch.cuda.CUDAGraph on CPU: replay() runs the captured step, then `then(state)`."""

    def __init__(self, fn, then):
        self.fn, self.then, self.replays = fn, then, 0

    def replay(self):
        self.fn()
        self.then()
        self.replays += 1

    def pool(self):
        return None


@pytest.mark.parametrize("broken", [False, True])
def test_the_first_replay_is_checked_against_its_warm_up(broken, monkeypatch, capsys):
    """Graphs on CPU through a stand-in capture: a replay that does what the step did is kept and replayed by
    later steps; one whose sampled tokens differ (a stale input, say) falls back to the eager step with one
    warning line, and the tokens are the eager step's either way."""
    made = []

    def capture(fn, pool):
        d = next(reversed(decode._DECODERS.values()))
        made.append(FakeGraph(fn, (lambda: d.s.tok.add_(1)) if broken else (lambda: None)))
        return made[-1]
    monkeypatch.setattr(graphs, "capture", capture)
    model, prompts = tiny_model("llama"), prompts_for()
    kw = dict(max_new_tokens=12, seed=1, pack=False, static=True, sync_every=3)
    eager = generate(model, prompts, **kw)
    decode.release()
    r = generate(model, prompts, graphs=True, **kw)
    err = capsys.readouterr().err.strip().splitlines()
    assert torch.equal(r.tokens, eager.tokens) and torch.equal(r.logprobs, eager.logprobs)
    if broken:
        assert len(err) == 1 and "CUDA graphs off" in err[0] and "tok differs" in err[0] and r.mode == "eager"
        assert [g.replays for g in made] == [1]
    else:
        assert err == [] and r.mode == "graphs" and sum(g.replays for g in made) == 12
        # every step replayed: tokens 1..11 (token 0 comes from the prefill) and one step past the end,
        # before the host's check


def test_a_capture_that_fails_falls_back_to_the_eager_step(capsys):
    """graphs=True on CPU, where torch.cuda.graph cannot capture: one warning line, the eager tokens."""
    model, prompts = tiny_model("qwen3"), prompts_for()
    kw = dict(max_new_tokens=8, seed=4, pack=False, static=True, sync_every=3)
    r = generate(model, prompts, graphs=True, **kw)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA graphs off" in err[0] and r.mode == "eager"
    assert torch.equal(r.tokens, generate(model, prompts, **kw).tokens)


def test_the_attention_switch_is_checked():
    with pytest.raises(ValueError, match="attention must be one of sdpa, eager"):
        generate(tiny_model("llama"), [[5]], max_new_tokens=2, attention="flash")
    with pytest.raises(ValueError, match="need static=True"):
        generate(tiny_model("llama"), [[5]], max_new_tokens=2, graphs=True, static=False)


def test_the_attention_kernel_is_named_from_the_profilers_event_names():
    """Names as torch.profiler reports them on an H100/H200 and on CPU, each mapped to the SDPA kernel that ran."""
    assert attention_kernels(["aten::mm", "aten::scaled_dot_product_attention"]) == {}
    assert set(attention_kernels(["aten::_scaled_dot_product_efficient_attention",
                                  "fmha_cutlassF_bf16_aligned_64x64_rf_sm80"])) == {"memory-efficient"}
    assert (attention_kernels(["void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>"]).keys()
            == {"flash"})
    assert attention_kernels(["cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16"]).keys() == {"cuDNN"}
    assert attention_kernels(["aten::_scaled_dot_product_attention_math"]).keys() == {"math"}
    model = tiny_model("qwen3")
    assert bench_rollout.attention_ran(model, 2).startswith("written out")  # CPU's default: no SDPA call
    rollout.configure(attention="sdpa")
    try:
        assert bench_rollout.attention_ran(model, 2) == "flash: aten::_scaled_dot_product_flash_attention_for_cpu"
    finally:
        rollout.configure()


def test_the_clis_set_the_process_defaults_that_generate_reads(capsys):
    """configure (what --compile and --attention call) sets what generate uses where a call names nothing."""
    model, prompts = tiny_model("llama"), prompts_for()
    try:
        rollout.configure(compile=True, attention="sdpa")
        r = generate(model, prompts, max_new_tokens=4, temperature=0, static=True, pack=False)
        assert r.mode == "compile" and rollout.DEFAULTS == dict(compile=True, attention="sdpa")
    finally:
        rollout.configure()
    assert rollout.DEFAULTS == dict(compile=False, attention=None)
    with pytest.raises(ValueError, match="--attention must be sdpa or eager"):
        rollout.configure(attention="flash")


def test_the_gpus_busy_time_is_the_union_of_its_kernels():
    """profile_summary's idle time between kernels: overlapping and nested kernels counted once, gaps not at all."""
    assert hardware.busy_time([(10, 20), (15, 25), (30, 40), (32, 35)]) == (25, 30)  # 10..25 and 30..40 of 10..40
    assert hardware.busy_time([(0, 5)]) == (5, 5)
