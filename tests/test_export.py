"""kiln/export.py: the streamed export, against `save_pretrained`, peft's merge and the export it replaced.

    .venv/bin/pytest tests/test_export.py -q                    # ~45 s on 2 cores
    torchrun --nproc_per_node 2 tests/test_export.py OUT_DIR    # the engine cases (the fixture starts it)

The writer: safetensors files read back by `safetensors` and checkpoints laid out as huggingface_hub
shards them. Live models (no DeepSpeed): the keys, tensors and config `save_pretrained` writes, tied
weights dropped as it drops them, LoRA merged as `merge_and_unload` merges. Real DeepSpeed engines
(gloo; ZeRO-2 and ZeRO-3, fp32 and bf16, 1 and 2 ranks, after one training step): the streamed export
against the old one (bench/export_memory.py `old_export_engine`, the whole model gathered and saved
in fp32), key for key in the training dtype, loaded by `from_pretrained` with the same logits, and
converted to plain Mixtral (kiln/hf_convert.py) with the same logits.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script by torchrun
    sys.path.insert(0, str(ROOT))

from kiln.export import export_model  # noqa: E402
from kiln.safetensors_stream import INDEX_NAME, CheckpointWriter, SafetensorsFile, TensorSpec  # noqa: E402
from tests.dist.common import free_port, torchrun  # noqa: E402
from tests.tiny_models import tiny  # noqa: E402

# ---------------------------------------------------------------------------------------------------- helpers


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder (one file or shards), through `safetensors`."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / INDEX_NAME
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    out = {}
    for name in files:
        with safe_open(folder / name, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for k in f.keys():
                assert k not in out, k
                out[k] = f.get_tensor(k)
    return out


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


def tokens(vocab: int, batch=2, length=10) -> torch.Tensor:
    return torch.randint(2, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def specs_of(tensors: dict) -> list[TensorSpec]:
    return [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(7, 5, generator=g).bfloat16(),
        "b.f32": torch.randn(3, 4, 2, generator=g),
        "c.f16": torch.randn(9, generator=g).half(),
        "d.i64": torch.randint(-(2**40), 2**40, (4, 3), generator=g),
        "e.i32": torch.randint(-1000, 1000, (5,), generator=g, dtype=torch.int32),
        "f.u8": torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8),
        "g.bool": torch.rand(6, generator=g) > 0.5,
        "h.f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "i.scalar": torch.tensor(3.5),
        "j.empty": torch.zeros(0, 3),
        "k.i8": torch.randint(-100, 100, (11,), generator=g, dtype=torch.int8),
        "l.big": torch.randn(64, 40, generator=g),  # 10 240 bytes: past the small shard size below
    }


# ---------------------------------------------------------------------------------------------------- writer


@pytest.mark.timeout(30)
def test_a_safetensors_file_written_in_any_order_reads_back_every_dtype_and_shape(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = sample_tensors()
    f = SafetensorsFile(tmp_path / "x.safetensors", specs_of(tensors))
    for k in reversed(list(tensors)):  # not the file's order: each lands at its offsets
        f.write(k, tensors[k])
    f.close()
    assert_same(load_file(tmp_path / "x.safetensors"), tensors)
    with safe_open(tmp_path / "x.safetensors", "pt") as r:
        assert r.metadata() == {"format": "pt"} and sorted(r.keys()) == sorted(tensors)
    raw = (tmp_path / "x.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    assert n % 8 == 0 and header["a.bf16"]["dtype"] == "BF16" and header["g.bool"]["dtype"] == "BOOL"
    for k, v in tensors.items():  # each tensor starts aligned to its element size
        assert (8 + n + header[k]["data_offsets"][0]) % v.element_size() == 0, k
    assert len(raw) == 8 + n + max(h["data_offsets"][1] for k, h in header.items() if k != "__metadata__")


@pytest.mark.timeout(30)
def test_a_file_refuses_a_tensor_unlike_its_plan_and_a_missing_one(tmp_path):
    f = SafetensorsFile(
        tmp_path / "x.safetensors",
        [TensorSpec("w", (2, 3), torch.bfloat16), TensorSpec("v", (1,), torch.float32)],
    )
    with pytest.raises(ValueError, match="planned"):
        f.write("w", torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="never written"):
        f.close()


@pytest.mark.timeout(30)
def test_shards_are_laid_out_as_huggingface_hub_shards_them(tmp_path):
    from huggingface_hub import save_torch_state_dict

    tensors = sample_tensors()
    max_shard = 300
    with CheckpointWriter(tmp_path / "ours", specs_of(tensors), max_shard, total_parameters=7) as w:
        for k, v in tensors.items():
            w.write(k, v)
    (tmp_path / "hub").mkdir()
    save_torch_state_dict(tensors, tmp_path / "hub", max_shard_size=max_shard)
    ours = json.loads((tmp_path / "ours" / INDEX_NAME).read_text())
    hub = json.loads((tmp_path / "hub" / INDEX_NAME).read_text())
    assert ours["weight_map"] == hub["weight_map"]
    assert ours["metadata"] == {"total_size": hub["metadata"]["total_size"], "total_parameters": 7}
    files = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "hub").iterdir())
    n = len(files) - 1
    assert n >= 3 and f"model-00001-of-{n:05d}.safetensors" in files
    assert_same(read_folder(tmp_path / "ours"), tensors)


@pytest.mark.timeout(30)
def test_one_shard_is_model_safetensors_without_an_index(tmp_path):
    tensors = sample_tensors()
    with CheckpointWriter(tmp_path, specs_of(tensors)) as w:
        for k, v in tensors.items():
            w.write(k, v)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert_same(read_folder(tmp_path), tensors)


@pytest.mark.timeout(30)
def test_the_reader_reads_back_each_tensor_of_a_hub_sharded_folder_and_names_a_damaged_file(tmp_path):
    from huggingface_hub import save_torch_state_dict

    from kiln.safetensors_stream import CheckpointReader

    tensors = sample_tensors()
    save_torch_state_dict(tensors, tmp_path, max_shard_size=300)  # several files and their index
    assert (tmp_path / INDEX_NAME).exists()
    reader = CheckpointReader(tmp_path)
    assert sorted(reader.names()) == sorted(tensors) and "nope" not in reader
    assert_same({k: reader.read(k) for k in reader.names()}, tensors)
    assert reader.spec("a.bf16").dtype == torch.bfloat16
    big = max(tensors, key=lambda k: tensors[k].nbytes)
    path = tmp_path / json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"][big]
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(ValueError, match=f"{path.name}.*{big} is cut short"):
        CheckpointReader(tmp_path).read(big)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        CheckpointReader(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------- live models


def kiln(dtype=torch.float32, classifier=False, **overrides):
    from kiln.model import KilnForCausalLM, KilnForSequenceClassification

    torch.manual_seed(0)
    config = tiny(**overrides)
    return (KilnForSequenceClassification if classifier else KilnForCausalLM)(config).to(dtype).eval()


def saved_files(folder: Path) -> dict[str, str]:
    return {
        p.name: p.read_text() for p in Path(folder).iterdir() if p.suffix == ".json" and p.name != INDEX_NAME
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "dtype, classifier, overrides",
    [
        (torch.float32, False, {"tie_word_embeddings": True}),
        (torch.bfloat16, False, {"num_experts": 3, "moe_intermediate_size": 16}),
        (torch.bfloat16, True, {}),
    ],
    ids=["fp32-tied", "bf16-moe", "bf16-classifier"],
)
def test_the_export_writes_what_save_pretrained_writes(tmp_path, dtype, classifier, overrides):
    """Keys (tied duplicate dropped), tensors in the model's own dtype, config.json and
    generation_config.json: exactly save_pretrained's; the folder loads back in that dtype."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model = kiln(dtype, classifier, **overrides)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"a tokenizer": 1}')
    export_model(model, tmp_path / "ours", rank=0, tokenizer_dir=tmp_path / "tok")
    model.save_pretrained(tmp_path / "hf")  # after: it sets the model's config.dtype and architectures
    assert_same(read_folder(tmp_path / "ours"), read_folder(tmp_path / "hf"))
    if overrides.get("tie_word_embeddings"):
        assert "lm_head.weight" not in read_folder(tmp_path / "ours")
    assert saved_files(tmp_path / "ours") == {
        **saved_files(tmp_path / "hf"),
        "tokenizer.json": '{"a tokenizer": 1}',
    }
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path / "ours", dtype="auto").eval()
    assert loaded.dtype == dtype
    x = tokens(97)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.mark.timeout(30)
def test_a_failed_export_leaves_the_folder_as_it_was_and_a_finished_one_replaces_it(tmp_path):
    class FullDisk:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("half")
            raise OSError("disk full")

    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("before")
    model = kiln()
    with pytest.raises(OSError, match="disk full"):  # the weights and configs written, the tokenizer fails
        export_model(model, out, rank=0, tokenizer=FullDisk())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no partial sibling left
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    export_model(model, out, rank=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


def lora_model(base, targets, task_type, seed=1, **extra):
    """`base` with LoRA adapters whose B is not zero (as after training), so the merge moves weights."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type=task_type, **extra
    )
    model = get_peft_model(base, lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, lora


def merged_reference(model, dtype):
    """What the old TRL export wrote: the adapters merged by peft into an fp32 copy, then cast."""
    import copy

    ref = copy.deepcopy(model).float().merge_and_unload()
    return {k: v.to(dtype) for k, v in on_disk(ref, ref.state_dict()).items()}, ref


def on_disk(model, state_dict):
    """The state dict as save_pretrained writes it (a MoE layer's stacked experts split, one key per expert)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, state_dict)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_is_merged_as_merge_and_unload_merges_it(tmp_path, dtype):
    from pipeline.config import LORA_TARGETS

    model, _ = lora_model(kiln(dtype, num_experts=2, moe_intermediate_size=16, tie_word_embeddings=True),
                          list(LORA_TARGETS), "CAUSAL_LM")  # fmt: skip
    export_model(model, tmp_path / "ours", rank=0, use_cache=True)
    got = read_folder(tmp_path / "ours")
    want, ref = merged_reference(model, dtype)
    want.pop("lm_head.weight")  # tied: save_pretrained drops it
    assert_same(got, want)
    if dtype == torch.float32:  # and in fp32, exactly what peft's own in-place merge gives
        import copy

        merged = copy.deepcopy(model).merge_and_unload()
        assert_same(got, {k: v for k, v in on_disk(merged, merged.state_dict()).items() if k in got})
    else:  # peft merges a bf16 model in bf16 (rounding its delta first): within one bf16 ulp of it
        import copy

        merged = copy.deepcopy(model).merge_and_unload()
        peft_bf16 = on_disk(merged, merged.state_dict())
        for k, v in got.items():
            torch.testing.assert_close(v.float(), peft_bf16[k].float(), rtol=2**-7, atol=2**-8, msg=k)
    ref.save_pretrained(tmp_path / "ref")
    assert sorted(read_folder(tmp_path / "ref")) == sorted(got)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["dtype"] == str(dtype).removeprefix("torch.") and config["architectures"] == [
        "KilnForCausalLM"
    ]
    assert config["use_cache"] is True and "peft" not in json.dumps(config)


@pytest.mark.timeout(60)
def test_the_trl_stages_export_merges_lora_turns_use_cache_on_and_saves_the_tokenizer(tmp_path):
    from types import SimpleNamespace

    from kiln.trl_bridge import export

    class Tokenizer:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{}")

    model, lora = lora_model(kiln(torch.bfloat16), ["q_proj", "down_proj"], "CAUSAL_LM")
    model.config.use_cache = False  # as the trainers leave it
    trainer = SimpleNamespace(model=model, model_wrapped=model)
    export(trainer, str(tmp_path / "out"), Tokenizer(), lora, rank=0)
    want, _ = merged_reference(model, torch.bfloat16)
    assert_same(read_folder(tmp_path / "out"), want)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["use_cache"] is True and config["dtype"] == "bfloat16"
    assert model.config.use_cache is False  # the live model's config is left alone
    assert (tmp_path / "out" / "tokenizer.json").exists() and (
        tmp_path / "out" / "generation_config.json"
    ).exists()
    with pytest.raises(RuntimeError, match="no adapters"):
        export(
            SimpleNamespace(model=kiln(), model_wrapped=None), str(tmp_path / "x"), Tokenizer(), lora, rank=0
        )


@pytest.mark.timeout(60)
def test_a_reward_model_keeps_its_trained_score_head_and_fan_in_fan_out_layers_merge_transposed(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    # reward: the score head is a modules_to_save copy, written under the head's own name
    model, _ = lora_model(kiln(classifier=True, num_labels=1), ["q_proj", "v_proj"], "SEQ_CLS")
    with torch.no_grad():
        model.base_model.model.score.modules_to_save["default"].weight.add_(1.0)
    export_model(model, tmp_path / "reward", rank=0)
    want, _ = merged_reference(model, torch.float32)
    assert_same(read_folder(tmp_path / "reward"), want)
    assert torch.equal(want["score.weight"], model.base_model.model.score.modules_to_save["default"].weight)
    # GPT-2's Conv1D stores weights (in, out): peft merges with fan_in_fan_out; its lm_head is tied to wte
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    model, _ = lora_model(gpt2, ["c_attn", "c_fc"], "CAUSAL_LM", fan_in_fan_out=True)
    export_model(model, tmp_path / "gpt2", rank=0)
    want, ref = merged_reference(model, torch.float32)
    ref.save_pretrained(tmp_path / "gpt2-ref")
    assert_same(read_folder(tmp_path / "gpt2"), read_folder(tmp_path / "gpt2-ref"))
    assert "lm_head.weight" not in read_folder(tmp_path / "gpt2")


@pytest.mark.timeout(30)
def test_dora_and_lora_on_embeddings_are_refused_with_the_reason(tmp_path):
    model, _ = lora_model(kiln(), ["q_proj"], "CAUSAL_LM", use_dora=True)
    with pytest.raises(NotImplementedError, match="DoRA"):
        export_model(model, tmp_path / "dora", rank=0)
    model, _ = lora_model(kiln(), ["embed_tokens"], "CAUSAL_LM")
    with pytest.raises(NotImplementedError, match="linear layers only"):
        export_model(model, tmp_path / "emb", rank=0)
    assert not (tmp_path / "dora").exists() and not (tmp_path / "emb").exists()


# ---------------------------------------------------------------------------------------------------- engines

ENGINE_CASES = {
    f"zero{z}-{p}-{n}rank": {"zero_stage": z, "precision": p, "world": n}
    for n in (2, 1)
    for z in (3, 2)
    for p in ("bf16", "fp32")
}
ENGINE_CASES["lora-zero3-bf16-2rank"] = {"zero_stage": 3, "precision": "bf16", "world": 2, "lora": True}
SHARDED = "zero3-bf16-2rank"  # exported in ~20 KB shards
SHARD_BYTES = 20_000
VOCAB = 97


def engine_config(case: str):
    # tied embeddings under ZeRO-3 (one shared partitioned parameter), untied under ZeRO-2
    tied = ENGINE_CASES[case]["zero_stage"] == 3
    return tiny(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, tie_word_embeddings=tied)


def run_engine_case(out: Path, case: str) -> None:
    """Train one step on a DeepSpeed engine, export it the old and the new way (every rank calls)."""
    import deepspeed
    import torch.distributed as dist

    from bench.export_memory import old_export_engine
    from kiln import training as T
    from kiln.model import KilnForCausalLM

    c = ENGINE_CASES[case]
    rank = dist.get_rank()
    config = engine_config(case)
    torch.manual_seed(0)
    model = KilnForCausalLM(config)
    lora = None
    if c.get("lora"):
        from pipeline.config import LORA_TARGETS

        model, lora = lora_model(model, list(LORA_TARGETS), "CAUSAL_LM")
    ds = T.deepspeed_config(zero_stage=c["zero_stage"], precision=c["precision"], micro_batch_size=2, grad_accum=1,
                            world_size=c["world"], grad_clip=1.0, zero3_persistence_threshold=100)  # fmt: skip
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    x = tokens(VOCAB)[rank : rank + 1].repeat(2, 1)
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    engine.eval()
    with torch.no_grad():
        before = engine(input_ids=x, labels=x).loss.item()
    tok = out / "tok"
    folder = out / case
    if lora is None:
        old_export_engine(engine, lambda: KilnForCausalLM(config), folder / "old", tok, c["zero_stage"], rank)
    else:  # the old TRL export: the consolidated state into a fresh fp32 peft model, merged, saved
        from peft import get_peft_model

        state = engine._zero3_consolidated_16bit_state_dict()
        if rank == 0:
            fresh = get_peft_model(KilnForCausalLM(config).float(), lora)
            fresh.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
            fresh.merge_and_unload().save_pretrained(folder / "old")
    if case == SHARDED:
        export_model(
            engine.module,
            folder / "new",
            rank=rank,
            engine=engine,
            tokenizer_dir=tok,
            max_shard_size=SHARD_BYTES,
        )
    elif lora is None:
        T.export_engine(engine, folder / "new", tok, rank)
    else:
        export_model(engine.module, folder / "new", rank=rank, engine=engine)
    with torch.no_grad():  # the engine still works after the export, on the same weights
        after = engine(input_ids=x, labels=x).loss.item()
    if rank == 0:
        dtype = next(p.dtype for p in engine.module.parameters())
        (folder / "info.json").write_text(json.dumps({"before": before, "after": after, "dtype": str(dtype)}))


def engine_cases_main(out: Path) -> None:
    """torchrun's 2 processes: the 2-rank cases in torchrun's group, then each process its share of
    the 1-rank cases in a group of its own (as tests/dist/pretrain_cases.py does)."""
    import deepspeed.utils.groups
    import torch.distributed as dist

    from kiln import training as T

    cpu = torch.device("cpu")
    T.init_distributed(cpu, 5)
    world, rank = dist.get_world_size(), dist.get_rank()
    for case in [k for k, c in ENGINE_CASES.items() if c["world"] == world]:
        run_engine_case(out, case)
        dist.barrier()
    dist.destroy_process_group()
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    for case in [k for k, c in ENGINE_CASES.items() if c["world"] == 1][rank::world]:
        deepspeed.utils.groups._WORLD_GROUP = None  # DeepSpeed's clone of the closed group
        os.environ["MASTER_PORT"] = str(free_port())
        T.init_distributed(cpu, 5)
        run_engine_case(out, case)
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo can abort at interpreter exit after the work is done


@pytest.fixture(scope="module")
def engines_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("export-engines")
    (out / "tok").mkdir()
    (out / "tok" / "tokenizer.json").write_text('{"a tokenizer": 1}')
    torchrun(Path(__file__).resolve(), out, timeout=240)
    return out


def logits(folder: Path, x, dtype=torch.float32, hf=False, rounded_to=None):
    """The logits of the model in `folder` loaded in `dtype` (its weights first rounded to `rounded_to`)."""
    from transformers import AutoModelForCausalLM

    import kiln.model  # noqa: F401  (registers the Kiln classes with the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    assert hf or type(model).__name__ == "KilnForCausalLM"
    if rounded_to is not None:
        model.to(rounded_to).to(dtype)
    with torch.no_grad():
        return model(x).logits


@pytest.mark.timeout(300)
@pytest.mark.distributed
@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_an_engine_exports_the_old_exports_tensors_in_the_training_dtype(engines_out, case):
    from transformers import AutoModelForCausalLM

    folder = engines_out / case
    info = json.loads((folder / "info.json").read_text())
    dtype = {"torch.bfloat16": torch.bfloat16, "torch.float32": torch.float32}[info["dtype"]]
    assert dtype == (torch.bfloat16 if "bf16" in case else torch.float32)
    assert info["after"] == info["before"]  # the engine is left as it was
    old, new = read_folder(folder / "old"), read_folder(folder / "new")
    assert all(v.dtype == torch.float32 for v in old.values())
    assert_same(new, {k: v.to(dtype) for k, v in old.items()})  # the same keys, tied duplicate dropped
    assert ("lm_head.weight" in new) == (not engine_config(case).tie_word_embeddings)
    assert (folder / "new" / INDEX_NAME).exists() == (case == SHARDED)
    if case == SHARDED:
        assert len(list((folder / "new").glob("model-*-of-*.safetensors"))) >= 3
    # the configs: the old one's but for the dtype (and the architecture the TRL path named after merging)
    old_cfg, new_cfg = (json.loads((folder / d / "config.json").read_text()) for d in ("old", "new"))
    assert new_cfg.pop("dtype") == str(dtype).removeprefix("torch.") and old_cfg.pop("dtype") == "float32"
    assert new_cfg == old_cfg
    assert (folder / "new" / "generation_config.json").read_text() == (
        folder / "old" / "generation_config.json"
    ).read_text()
    if "lora" not in case:
        assert (folder / "new" / "tokenizer.json").read_text() == '{"a tokenizer": 1}'
    assert not list(engines_out.glob(f".{case}*")) and not list(folder.glob(".new*"))
    # loads as the training dtype; in fp32, the logits of the old export (its merged LoRA weights, fp32
    # sums, rounded to the training dtype first)
    assert AutoModelForCausalLM.from_pretrained(folder / "new").dtype == dtype
    x = tokens(VOCAB)
    want = logits(folder / "old", x, rounded_to=dtype)
    torch.testing.assert_close(logits(folder / "new", x), want, rtol=0, atol=0)


@pytest.mark.timeout(300)
@pytest.mark.distributed
@pytest.mark.parametrize("case", [SHARDED, "zero2-fp32-1rank"])
def test_an_engine_export_converts_to_plain_mixtral_with_the_same_logits(engines_out, case, tmp_path):
    from kiln.hf_convert import export_model as convert

    assert convert(engines_out / case / "new", tmp_path, fmt="auto") == "mixtral"
    x = tokens(VOCAB)
    mixtral = logits(tmp_path, x, hf=True)
    assert (mixtral - logits(engines_out / case / "new", x)).abs().max().item() <= 1e-5


if __name__ == "__main__":
    engine_cases_main(Path(sys.argv[1]))
