"""Probe: can a Triton kernel gather embedding rows straight from pinned host memory (CUDA's
unified addressing), inside a CUDA graph, and how long does it take for Llama-3-8B's table?

Why: a frozen input embedding is read only by a gather (2048 rows of 128,256 per step at 2048
tokens). Left in pinned host memory it would free 0.98 GiB of the GPU for Llama-3-8B.
Prints one line per finding; no file is written. (Run 1 of the sixth session timed its own copy
of the kernel, since moved into kernels/embedding.py, which this now calls.)
"""

import time

import torch

from qlora.kernels.embedding import gather_rows_triton


def ms(fn, reps=20):
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main():
    vocab, hidden, tokens = 128256, 4096, 2048
    t0 = time.time()
    table = torch.empty(vocab, hidden, dtype=torch.bfloat16).pin_memory()
    table.normal_()
    print(f"host-gather: pinned table {table.nbytes / 2**30:.2f} GiB in {time.time() - t0:.1f} s")
    ids = torch.randint(0, vocab, (tokens,), device="cuda")
    try:
        out = gather_rows_triton(table, ids)
        torch.cuda.synchronize()
    except Exception as err:  # the finding is whether Triton takes a host pointer at all
        print(f"host-gather: Triton refused the pinned table: {type(err).__name__}: {err}")
        return
    want = table[ids.cpu()].cuda()
    print(f"host-gather: equal to the CPU gather: {torch.equal(out, want)}")
    gpu_table = table.cuda()
    print(f"host-gather: {ms(lambda: gather_rows_triton(table, ids)):.3f} ms from host memory, "
          f"{ms(lambda: gather_rows_triton(gpu_table, ids)):.3f} ms from GPU memory, "
          f"{ms(lambda: torch.embedding(gpu_table, ids)):.3f} ms torch.embedding on the GPU")
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        gather_rows_triton(table, ids)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            out = gather_rows_triton(table, ids)  # the graph's output buffer
    ids.copy_(torch.randint(0, vocab, (tokens,), device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    print(f"host-gather: in a CUDA graph, new ids: equal {torch.equal(out, table[ids.cpu()].cuda())}; "
          f"{ms(graph.replay):.3f} ms per replay")

if __name__ == "__main__":
    main()
