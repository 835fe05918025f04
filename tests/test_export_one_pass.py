"""GGUF export in one pass: with an adapter, each tensor is folded as it is read and the file is
byte for byte the export of the merged checkpoint (`qlora merge`, then export); the disk must
hold the output file only, and one without room for it is refused before any tensor is read;
the tensors stream (read, encoded, written) with only those in flight held."""

from __future__ import annotations

import json
import re
from collections import namedtuple

import pytest
import torch

gguf = pytest.importorskip("gguf")
peft = pytest.importorskip("peft")

from qlora import files  # noqa: E402
from qlora.errors import QloraError  # noqa: E402
from qlora.export import gguf as gguf_export  # noqa: E402
from qlora.export import kquants  # noqa: E402
from qlora.export.gguf import export_gguf  # noqa: E402
from qlora.merge import merge_adapter  # noqa: E402
from qlora.tiny import build_tiny_model  # noqa: E402

SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
# a bf16 base: each folded tensor is rounded to bf16 as `qlora merge` stores it, so a one-pass
# export that rounded otherwise (or not at all) would differ in its bytes
FAMILIES = {"llama": dict(dtype="bfloat16", **SIZES),
            "mixtral": dict(dtype="bfloat16", seed=3)}
TARGETS = {"llama": dict(target_modules="all-linear"),
           "mixtral": dict(target_modules=["q_proj", "o_proj"],
                           target_parameters=["mlp.experts.down_proj", "mlp.experts.gate_up_proj"])}


def _random_adapter(model_dir, out_dir, family):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      **TARGETS[family]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: make the adapter change the weights
                p.normal_(0, 0.05)
    model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("one-pass")
    out = {}
    for family, options in FAMILIES.items():
        model = build_tiny_model(root / family, family, **options)
        out[family] = (model, _random_adapter(model, root / f"{family}-ad", family))
    return out


@pytest.mark.parametrize("family,qtype,base", [("llama", "f16", "original"), ("llama", "q4_k_m", "original"),
                                               ("llama", "q8_0", "nf4"), ("mixtral", "q8_0", "original")])
def test_adapter_export_is_the_export_of_the_merged_checkpoint(bases, tmp_path, family, qtype, base):
    if base == "nf4":
        pytest.importorskip("bitsandbytes")
    model, adapter = bases[family]
    one_pass = export_gguf(model, tmp_path / "one-pass.gguf", qtype, adapter_dir=adapter,
                           merge_base=base, threads=1, device="cpu")
    # the two steps: merge in the base's own precision, then export; the merged folder is named
    # as the one-pass export names the model (general.name: "base + adapter")
    dtype = json.loads((model / "config.json").read_text())["dtype"]
    merged = merge_adapter(model, adapter, tmp_path / f"{model.name} + {adapter.name}", dtype=dtype,
                           base=base)
    two_steps = export_gguf(merged, tmp_path / "two-steps.gguf", qtype, threads=1, device="cpu")
    assert one_pass.read_bytes() == two_steps.read_bytes()
    plain = export_gguf(model, tmp_path / "plain.gguf", qtype, threads=1, device="cpu")
    assert plain.read_bytes() != one_pass.read_bytes()  # the adapter did change the weights
    # nothing beside the outputs: no merged checkpoint, no temporary file
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["one-pass.gguf", "two-steps.gguf", "plain.gguf", merged.name])


Usage = namedtuple("Usage", "total used free")


def _disk_with(monkeypatch, free):
    """shutil.disk_usage as qlora.files sees it, reporting `free` bytes (no test reads the
    machine's own); returns the folders asked about."""
    asked = []

    def disk_usage(folder):
        asked.append(str(folder))
        return Usage(total=10**12, used=10**12 - free, free=free)

    monkeypatch.setattr(files.shutil, "disk_usage", disk_usage)
    return asked


def _refusal_numbers(err) -> tuple[int, int]:
    """(bytes still needed, file size) from the refusal's message."""
    m = re.search(r"needs ([\d,]+) more \(([\d,]+) bytes in all", str(err))
    assert m, str(err)
    return tuple(int(g.replace(",", "")) for g in m.groups())


def test_a_disk_without_room_is_refused_before_any_tensor_is_read(bases, tmp_path, monkeypatch):
    model, adapter = bases["llama"]
    out = tmp_path / "out" / "m.gguf"
    asked = _disk_with(monkeypatch, free=1000)
    read = gguf_export.ShardReader.__call__
    monkeypatch.setattr(gguf_export.ShardReader, "__call__", lambda *a: pytest.fail("a tensor was read"))
    with pytest.raises(QloraError, match=r"--out: .*out has 1,000 bytes free") as err:
        export_gguf(model, out, "q4_k_m", adapter_dir=adapter)
    assert "free that much space there, or give an --out on a disk with room" in str(err.value)
    assert asked == [str(out.parent)]
    assert list(out.parent.iterdir()) == []  # the staged file is gone
    needed, size = _refusal_numbers(err.value)
    assert 0 < needed < size

    # the numbers are exact: room for `needed` more bytes is enough, one fewer is not
    monkeypatch.setattr(gguf_export.ShardReader, "__call__", read)
    _disk_with(monkeypatch, free=needed - 1)
    with pytest.raises(QloraError, match="bytes free"):
        export_gguf(model, out, "q4_k_m", adapter_dir=adapter)
    _disk_with(monkeypatch, free=needed)
    assert export_gguf(model, out, "q4_k_m", adapter_dir=adapter).stat().st_size == size


def test_qlora_export_refuses_a_full_disk_before_the_importance_matrix(bases, tmp_path, monkeypatch):
    from qlora.export import imatrix
    from qlora.export.pipeline import export_model

    model, adapter = bases["llama"]
    _disk_with(monkeypatch, free=0)
    monkeypatch.setattr(imatrix, "compute_imatrix", lambda *a, **k: pytest.fail("forwards ran"))
    with pytest.raises(QloraError, match="bytes free"):
        export_model(model, tmp_path / "m.gguf", "q4_k_m", adapter_dir=adapter,
                     imatrix_data=tmp_path / "data.jsonl", check=False)
    assert list(tmp_path.iterdir()) == []


def test_an_encoded_tensor_unlike_its_plan_is_a_bug_and_leaves_nothing(bases, tmp_path, monkeypatch):
    model, _ = bases["llama"]
    encode = gguf_export.encode
    # a bug: one tensor encoded from fewer columns than its header has
    monkeypatch.setattr(gguf_export, "encode", lambda x, kind, *rest: encode(
        x[:, :-32] if x.shape == (512, 256) else x, kind, *rest))
    with pytest.raises(RuntimeError, match="planned entry says"):
        export_gguf(model, tmp_path / "m.gguf", "q8_0", threads=1, device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_tensors_stream_and_shards_are_read_one_after_the_other(tmp_path, monkeypatch):
    """With nothing allowed to queue (kquants.IN_FLIGHT_VALUES 0), at most the tensor being
    written and the one read after it are held: reads never run more than two ahead of writes;
    and a shard is unmapped once its last tensor is read, before the next one is mapped."""
    model = build_tiny_model(tmp_path / "sharded", "llama", max_shard_size="100KB", **SIZES)
    shards = len(list(model.glob("*.safetensors")))
    monkeypatch.setattr(kquants, "IN_FLIGHT_VALUES", 0)
    events, open_shards = [], []
    read, write = gguf_export.ShardReader.__call__, gguf.GGUFWriter.write_tensor_data

    def counting_read(self, hf_name):
        events.append("read")
        x = read(self, hf_name)
        open_shards.append(len(self.opened))
        return x

    def counting_write(self, data, *args):
        events.append("write")
        return write(self, data, *args)

    monkeypatch.setattr(gguf_export.ShardReader, "__call__", counting_read)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", counting_write)
    out = export_gguf(model, tmp_path / "m.gguf", "q4_k_m", threads=1, device="cpu")
    ahead = [events[:i].count("read") - events[:i].count("write") for i in range(len(events) + 1)]
    assert max(ahead) <= 2 and events.count("read") == events.count("write") > 10
    assert len(gguf.GGUFReader(str(out)).tensors) == events.count("write")
    assert shards > 3 and max(open_shards) <= 1 and open_shards[-1] == 0


@pytest.mark.parametrize("full_at", ["metadata", "tensors"])
def test_a_disk_that_fills_while_writing_is_a_clear_refusal_and_leaves_nothing(bases, tmp_path,
                                                                               monkeypatch, full_at):
    """A disk with less free than the metadata (written before its size, and so the check, is
    known), or one that another writer fills meanwhile: the write's ENOSPC becomes a QloraError
    naming --out, and the staged file is gone."""
    import errno

    model, _ = bases["llama"]
    _disk_with(monkeypatch, free=10**12)  # the up-front check passes: the disk fills later
    name = "write_kv_data_to_file" if full_at == "metadata" else "write_tensor_data"
    write, calls = getattr(gguf.GGUFWriter, name), []

    def full(self, *args):
        calls.append(name)
        if len(calls) == 3 or full_at == "metadata":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, *args)

    monkeypatch.setattr(gguf.GGUFWriter, name, full)
    with pytest.raises(QloraError, match=r"--out: the disk of .* filled up while the file was written"):
        export_gguf(model, tmp_path / "m.gguf", "q8_0", threads=1, device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_an_export_and_a_merge_read_each_shard_header_once(tmp_path, monkeypatch):
    """An export with an adapter and its check (in qlora's engine, on the CPU: the host-memory
    guard runs too) reads each shard's safetensors header once: the guard, the adapter's checks,
    the plan, the tensor reader and the check's GGUF-as-weights all take them from there. So does
    `qlora merge` with its check. (Loading the reference model reads the tensors themselves,
    through the loader's own handles.)"""
    from collections import Counter

    from qlora.cli import main
    from qlora.export.pipeline import export_model
    from qlora.models import weights

    model = build_tiny_model(tmp_path / "sharded", "llama", max_shard_size="100KB", **SIZES)
    adapter = _random_adapter(model, tmp_path / "adapter", "llama")
    shards = sorted(model.glob("*.safetensors"))
    reads = Counter()
    read = weights.read_shard_header

    def counting_read(path):
        reads[path] += 1
        return read(path)

    monkeypatch.setattr(weights, "read_shard_header", counting_read)
    export_model(model, tmp_path / "m.gguf", "q8_0", adapter_dir=adapter, check=True,
                 check_engine="qlora", check_samples=2, device="cpu", threads=1,
                 log=lambda _: None, note=lambda _: None)
    assert (tmp_path / "m.check.json").exists()  # the check ran
    assert len(shards) > 3 and reads == Counter(dict.fromkeys(shards, 1))

    reads.clear()
    assert main(["merge", "--model", str(model), "--adapter", str(adapter), "--out",
                 str(tmp_path / "merged"), "--device", "cpu", "--check-samples", "2"]) == 0
    assert (tmp_path / "merged.check.json").exists()
    assert reads == Counter(dict.fromkeys(shards, 1))
