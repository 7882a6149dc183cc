"""sample.py's CUDA-graph decoding on the CPU under tests/cuda_emulation.py's graph semantics (a capture
records without running, a replay runs into the same tensors, a host sync in a capture fails): it equals eager
decoding, greedy and seeded, while the batch shrinks and the step is captured again; and the emulation."""
import pytest
import torch

import sample
from conftest import make_checkpoint
from cuda_emulation import EmulatedCuda, HostSync, allocated
from model import load

pytestmark = pytest.mark.usefixtures("one_thread")
QUESTIONS = ["hey I feel bored", "How do I make a quick buck?", "hi", "Tell me three thoughts", "ok",
             "What is your wish?"]


@pytest.fixture(scope="module")
def lively(tmp_path_factory):
    """Larger random weights than `tiny`, so that answers do not repeat one token."""
    model, tok = load(make_checkpoint(str(tmp_path_factory.mktemp("lively")), std=0.3))
    return model, tok, [tok.encode_chat([{"role": "user", "content": q}], True) for q in QUESTIONS]


# -----------------------------------------------------------------------------
# the emulation against what CUDA does


def test_capture_runs_nothing_and_replay_reruns_into_the_same_tensors():
    cuda, x, w = EmulatedCuda(), torch.arange(4.0), torch.ones(3, 4)
    graph = cuda.CUDAGraph()
    with cuda.graph(graph):
        x.add_(1)
        y = w @ x  # (3,) allocated by the capture
        x.mul_(2)
    assert torch.equal(x, torch.arange(4.0)) and torch.isnan(y).all()  # y: garbage until a replay
    address = y.data_ptr()
    graph.replay()
    assert torch.equal(x, (torch.arange(4.0) + 1) * 2) and torch.equal(y, torch.full((3,), 10.0))
    w.fill_(2)  # a replay reads its inputs' current values
    graph.replay()
    assert torch.equal(x, torch.tensor([6.0, 10, 14, 18]))
    assert torch.equal(y, torch.full((3,), 2.0 * (3 + 5 + 7 + 9)))
    assert y.data_ptr() == address


@pytest.mark.parametrize("sync", [lambda t: t.sum().item(), lambda t: bool(t[0] > 0), lambda t: t.tolist(),
                                  lambda t: t.cpu(), lambda t: t.nonzero(), lambda t: t[t > 1],
                                  lambda t: torch.tensor([1, 2]) + t[:2]],
                         ids=["item", "if", "tolist", "cpu", "nonzero", "mask", "host data"])
def test_a_host_sync_inside_a_capture_raises(sync):
    cuda, t = EmulatedCuda(), torch.arange(4.0)
    sync(t)  # fine outside a capture
    with pytest.raises(HostSync), cuda.graph(cuda.CUDAGraph()):
        t.add_(1)
        sync(t)
    assert torch.equal(t, torch.arange(4.0))


# -----------------------------------------------------------------------------
# sample.py's graph path


def stops_ending_rows_at(answers, ends):
    """Stop tokens that end the rows of an eager run made without stops at about the given steps (None:
    never): for each row, its first token from its step on that no row holds before its own step."""
    limit = [len(a) if e is None else e for a, e in zip(answers, ends)]
    ok = lambda t: all(t not in b[:n] for b, n in zip(answers, limit))
    stops = {next((t for t in a[e:] if ok(t)), None) for a, e in zip(answers, ends) if e is not None}
    return sorted(stops - {None})


@pytest.mark.parametrize("kw, ends", [
    (dict(temperature=0), [1, 1, 3, 3, 5, 5, 9, 9, 11, 11, None, None]),  # greedy: a prompt's 2 rows alike
    (dict(top_k=20, repetition_penalty=1.1, seed=1), [0, 1, 2, 2, 3, 4, 9, 10, 11, 17, 18, None]),
], ids=["greedy", "top_k+penalty"])
def test_graph_decoding_equals_eager_as_the_batch_shrinks(lively, kw, ends):
    """Rows end at different steps (stop tokens picked from an eager run's answers), so the batch of 12
    shrinks at the stop checks (every 8 steps, as on CUDA) and the step is captured again each time."""
    model, tok, prompts = lively
    run = lambda graph, stops=(): sample.generate(model, prompts, n=2, max_new_tokens=40, stop_ids=stops,
                                                  cuda_graph=graph, **kw)
    stops = stops_ending_rows_at([ids for ids, _ in run(False)], ends)
    eager = run(False, stops)
    cuda = EmulatedCuda()
    assert run(cuda, stops) == eager
    assert cuda.captures >= 3 and len({len(ids) for ids, _ in eager}) >= 5


def test_graph_decoding_with_an_intervention_and_one_row_per_batch(lively):
    model, tok, prompts = lively
    direction = torch.randn(model.config.num_hidden_layers, model.config.hidden_size)
    hook = sample.ablation_hook(direction, [1])
    kw = dict(n=2, max_new_tokens=12, seed=3, stop_ids=tok.stop_ids, hook=hook)
    cuda = EmulatedCuda()
    assert sample.generate(model, prompts, cuda_graph=cuda, batch_size=1, **kw) == \
        sample.generate(model, prompts, cuda_graph=False, **kw)
    assert cuda.captures == 12  # one per batch


def test_a_batch_under_graphs_is_gone_before_the_next_prefills(lively):
    """Two batches in a row hold no more memory at once than one: the first batch's cache and captured graph
    (which keeps every tensor it recorded) are dropped before the second batch's prefill allocates a cache."""
    model, tok, _ = lively
    prompt = tok.encode_chat([{"role": "user", "content": "Tell me three thoughts. " * 20}], True)
    run = lambda n: allocated(lambda: sample.generate(model, [prompt], n=n, max_new_tokens=16, seed=0,
                                                      batch_size=4, cuda_graph=EmulatedCuda()))[1]
    cfg = model.config
    cache = 4 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * (len(prompt) + 16) * 4
    one, two = run(4), run(8)
    assert two < one + cache / 2, (one, two, cache)


def test_bench_forced_lengths_through_the_logits_hook_under_graphs(lively):
    """bench.py's realistic-length run: sample.generate's logits_hook (no patching) stops every row exactly at
    its drawn length, graph or not."""
    import bench
    model, tok, prompts = lively
    stop = tok.vocab_size - 1
    lengths = [3, 17, 40, 9, 1, 25]
    keys = [bench.LEN_KEY * j + n for j, n in enumerate(lengths)]
    force = bench.forced_stops(stop, len(model.lm_head.weight), "cpu")
    outs = [sample.generate(model, prompts[:2], n=3, max_new_tokens=40, seed=3, keys=keys, stop_ids=(stop,),
                            top_k=20, cuda_graph=graph, logits_hook=force) for graph in (EmulatedCuda(), False)]
    assert outs[0] == outs[1]
    assert [len(ids) for ids, _ in outs[0]] == lengths
    assert [r for _, r in outs[0]] == ["stop", "stop", "length", "stop", "stop", "stop"]
