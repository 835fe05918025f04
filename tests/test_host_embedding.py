"""The input embedding in pinned host memory (kernels/embedding.py, embedding_on_host): the gather
kernel against torch.embedding through Triton's interpreter, the refusals, and what the memory
planner counts. (On the GPU: benchmarks/gpu_check.py check_host_embedding.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlora import memory
from qlora.config import RunConfig
from qlora.errors import QloraError
from qlora.kernels.embedding import gather_rows, move_to_host

from test_dequant_kernel import interpreted  # noqa: E402

GATHER_CHECK = r"""
import json, torch
from qlora.kernels.embedding import gather_rows_triton

g = torch.Generator().manual_seed(0)
out = {}
# widths below, at and across the kernel's 1024-column step; repeated ids; a 2-d batch of ids
for dtype, width in ((torch.float32, 48), (torch.bfloat16, 1024), (torch.float16, 2500)):
    table = torch.randn(97, width, generator=g).to(dtype)
    ids = torch.randint(0, 97, (3, 11), generator=g)
    ids[0, :4] = 5
    got = gather_rows_triton(table, ids)
    out[f"{dtype}-{width}"] = [list(got.shape), got.dtype == dtype, torch.equal(got, torch.embedding(table, ids))]
out["empty"] = list(gather_rows_triton(torch.randn(5, 8), torch.zeros(0, dtype=torch.long)).shape)
print(json.dumps(out))
"""


def test_gather_kernel_gives_torch_embeddings_rows():
    out = interpreted(GATHER_CHECK)
    assert out.pop("empty") == [0, 8]
    assert out == {"torch.float32-48": [[3, 11, 48], True, True],
                   "torch.bfloat16-1024": [[3, 11, 1024], True, True],
                   "torch.float16-2500": [[3, 11, 2500], True, True]}


def test_a_table_on_one_device_and_ids_on_another_are_refused_with_the_fix():
    table = torch.randn(10, 4)
    assert torch.equal(gather_rows(table, torch.tensor([3, 1])), table[[3, 1]])  # one device
    with pytest.raises(QloraError, match="cannot be read by ids on meta.*move_to_host"):
        gather_rows(table, torch.tensor([3, 1], device="meta"))


def test_a_trainable_embedding_stays_where_it_is():
    embedding = nn.Embedding(10, 4)
    with pytest.raises(QloraError, match="trainable.*embedding_on_host: false"):
        move_to_host(embedding)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA build and GPU")
def test_move_to_host_pins_a_frozen_table():  # runs where a GPU is (CI has none)
    embedding = nn.Embedding(10, 4).cuda().requires_grad_(False)
    assert move_to_host(embedding) == 10 * 4 * 4
    assert embedding.weight.device.type == "cpu" and embedding.weight.is_pinned()


def test_the_planner_counts_one_table_on_the_gpu_when_the_embedding_is_on_the_host():
    llama, qwen = memory.resolve_arch(shape="llama-3-8b"), memory.resolve_arch(shape="qwen2.5-1.5b")
    table = 128256 * 4096 * 2
    on_gpu = memory.plan(llama, memory.PlanConfig(kernels="fused"))
    on_host = memory.plan(llama, memory.PlanConfig(kernels="fused", embedding_on_host=True))
    assert on_gpu.embeddings - on_host.embeddings == table
    assert on_gpu.allocated - on_host.allocated == table
    assert any("host memory" in note for note in on_host.notes)
    # a tied table is the head's weight too: it stays, and so does the plan
    tied = [memory.plan(qwen, memory.PlanConfig(embedding_on_host=h)).allocated for h in (False, True)]
    assert tied[0] == tied[1]
    # qlora train's default is on, and the run's plan says so
    cfg = RunConfig(model="m", data="d")
    assert cfg.embedding_on_host and memory.plan_config_for_run(cfg).embedding_on_host


def test_the_compute_device_is_not_read_from_the_input_embedding():
    """Graphs, evaluation and generation ask compute_device where to put their inputs: with the
    table in host memory the first parameter is on the CPU while the model runs on the GPU."""
    from qlora.models.decoder import compute_device
    from test_step_parts import tiny_model

    model = tiny_model(0.0)
    model.model.embed_tokens.weight = nn.Parameter(torch.empty(300, 64, device="meta"),
                                                   requires_grad=False)
    assert next(model.parameters()).device.type == "meta"
    assert compute_device(model) == torch.device("cpu")
    with pytest.raises(QloraError, match="no parameters"):
        compute_device(nn.Module())


def test_a_table_that_cannot_be_page_locked_is_refused_with_the_fix(monkeypatch):
    def refused(self, *args, **kwargs):
        raise RuntimeError("cudaHostAlloc failed: out of memory\nmore detail")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refused)
    embedding = nn.Embedding(10, 4).requires_grad_(False)
    with pytest.raises(QloraError, match="could not page-lock .*cudaHostAlloc failed: out of memory\\); "
                                         "set embedding_on_host: false"):
        move_to_host(embedding)
    assert embedding.weight.shape == (10, 4)  # left as it was
