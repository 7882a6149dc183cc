"""CUDA-graph semantics on the CPU, so that CI runs the code paths a GPU would run (issue 24).

    cuda = EmulatedCuda()                             # the torch.cuda calls sample.Stepper makes
    sample.generate(model, prompts, cuda_graph=cuda)  # injected: nothing is monkeypatched

- the side-stream warm-up runs for real (streams and devices are no-ops);
- a capture records the aten ops (a TorchDispatchMode) and leaves no trace: every write it made is undone from
  a snapshot of each argument the op schema marks as written (`Tensor(a!)`), and the tensors it allocated hold
  garbage (NaN, True, the integer type's largest) until a replay, as memory from a graph's pool does;
- replay() runs the recorded ops again into the same output tensors (static addresses), reading the inputs'
  current values;
- a host sync inside a capture raises HostSync, as it fails on CUDA: `.item()`, a tensor in an `if`,
  `.tolist()`, `.cpu()`, `.numpy()`, `torch.tensor(data)` (a host-to-device copy), and ops whose output size
  depends on values (`nonzero`, a boolean index, `masked_select`, `unique`).

It cannot see what depends on the GPU itself: kernel timing and stream races, which device and stream a
call runs on, cuBLAS/cuDNN workspaces and their place in a graph's pool, the caching allocator reusing a
freed block inside a capture, CUDA RNG offsets, NCCL.

allocated(fn): the most CPU memory fn had allocated at once, from torch.profiler's memory events."""
from contextlib import contextmanager, nullcontext

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default,
            aten.masked_select.default, aten.equal.default, aten._unique2.default, aten.unique_dim.default,
            aten.unique_consecutive.default}
HOST_READS = {torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.tensor}


class HostSync(RuntimeError):
    """What CUDA raises (cudaErrorStreamCaptureUnsupported) when a capture waits for the host."""


def _written(func, args, kwargs):
    """The tensors an op writes into, by its schema's alias info (`Tensor(a!)`)."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        value = args[i] if i < len(args) and not a.kwarg_only else kwargs.get(a.name)
        out += [t for t in (value if isinstance(value, (list, tuple)) else [value])
                if isinstance(t, torch.Tensor)]
    return out


class _Record(TorchDispatchMode):
    """Runs each op (its results feed the ops after it), records it, and snapshots what it overwrites."""

    def __init__(self, graph):
        super().__init__()
        self.graph, self.snapshots = graph, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        masks = func == aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])
        if func in SYNC_OPS or masks:
            raise HostSync(f"{func} inside a CUDA-graph capture needs the host to wait for the GPU")
        written = [(t, t.clone()) for t in _written(func, args, kwargs)]
        self.snapshots += written
        out = func(*args, **kwargs)
        fresh = [r.alias_info is None for r in func._schema.returns]  # else a view of, or the very, argument
        if written or any(fresh):  # a view needs no replay: it shares its argument's memory
            self.graph.ops.append((func, args, kwargs, out, fresh))
        return out


class _NoHostReads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            raise HostSync(f"{getattr(func, '__name__', func)} inside a CUDA-graph capture copies between "
                           "host and device, which waits for the GPU")
        return func(*args, **(kwargs or {}))


class Graph:
    """torch.cuda.CUDAGraph: the ops of one capture, replayed into the same tensors."""

    def __init__(self):
        self.ops = []

    @torch.no_grad()
    def replay(self):
        for func, args, kwargs, out, fresh in self.ops:
            new = func(*args, **kwargs)  # in place ops write into their recorded arguments
            pairs = zip(out, new) if isinstance(out, (tuple, list)) else [(out, new)]
            for (o, n), f in zip(pairs, fresh):
                if f and isinstance(o, torch.Tensor):
                    o.copy_(n)

    def poison(self):
        """A capture's own tensors hold garbage until a replay (CUDA: uninitialised memory of its pool)."""
        for _, args, kwargs, out, fresh in self.ops:
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            for o, f in zip(out if isinstance(out, (tuple, list)) else [out], fresh):
                if f and isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                    o.fill_(float("nan") if o.is_floating_point() else True if o.dtype == torch.bool
                            else torch.iinfo(o.dtype).max)


class EmulatedCuda:
    """The torch.cuda calls sample.Stepper makes, on the CPU; `captures` counts them."""
    CUDAGraph = Graph

    def __init__(self):
        self.captures = 0

    @contextmanager
    def graph(self, graph, pool=None, stream=None, capture_error_mode=None):
        self.captures += 1
        record = _Record(graph)
        try:
            with torch.no_grad(), _NoHostReads(), record:
                yield
        finally:
            with torch.no_grad():
                for t, snap in reversed(record.snapshots):  # nothing ran: every write undone
                    t.copy_(snap)
                graph.poison()

    class Stream:
        def wait_stream(self, other):
            pass

    def stream(self, s):
        return nullcontext()

    def current_stream(self):
        return self.Stream()

    def device(self, d):
        return nullcontext()


def allocated(fn):
    """(fn(), the most bytes fn had allocated at once, the bytes it left allocated), above what existed before
    it: torch.profiler's memory events (the CPU allocator's running total), not RSS."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    def walk(events):
        for e in events:
            yield e
            yield from walk(e.children)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    tree = prof.profiler.kineto_results.experimental_event_tree()
    events = sorted((e for e in walk(tree) if e.tag == _EventType.Allocation), key=lambda e: e.start_time_ns)
    if not events:
        return out, 0, 0
    first = events[0].extra_fields
    start = first.total_allocated - first.alloc_size  # the running total counts earlier profiles' tensors too
    totals = [e.extra_fields.total_allocated - start for e in events]
    return out, max(totals), totals[-1]
