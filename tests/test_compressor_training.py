"""Compressor training beyond the LM objective: the trainable LoRA, QA steps, the reader, resumable runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from lloco.config import Settings
from lloco.errors import InvalidArgument
from lloco.finetune.pretrain import CHECKPOINT_DIR, pretrain
from lloco.finetune.pretrain_eval import _other_of_same_source
from lloco.finetune.pretrain_options import PretrainOptions
from lloco.finetune.pretrain_qa import QAExamples
from lloco.finetune.shards import load_sharded, save_sharded
from lloco.model import Compressor, LoraSlots, TrainableLora, load_model
from lloco.model.lora import peft_geometry
from lloco.model.trainable_lora import lora_hidden

DATA = Path(__file__).resolve().parent / "data" / "qa"  # small subsets of the QA sets (tests/data/README.md)
TARGETS = ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> object:
    base = load_model(str(tiny_model_dir), tmp_path_factory.mktemp("cache"))
    base.model.requires_grad_(False)
    return base


def _random_lora(config: object, seed: int = 0) -> TrainableLora:
    lora = TrainableLora(config, 4, 8.0, TARGETS, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in lora.b.values():
            b.copy_(torch.randn(b.shape, generator=generator) * 0.1)
    return lora


def test_trainable_lora_matches_the_serving_slots_and_round_trips_through_peft_files(
    tiny_base: object,
) -> None:
    model, config = tiny_base.model, tiny_base.config
    lora = _random_lora(config)
    files = lora.peft_files(tiny_base.model_id, dtype=torch.float32)
    assert peft_geometry(files) == (tuple(sorted(TARGETS)), 4)
    slots = LoraSlots(config, 3, 8, TARGETS)  # another slot count and a larger max rank: same adapter
    slots.load(2, files)
    embeds = torch.randn(2, 7, config.dim)
    trained = model.hidden(embeds, lora.bind(torch.float32))
    served = model.hidden(embeds, slots.batch(torch.tensor([2, 2])))
    assert torch.allclose(trained, served, atol=1e-5)
    assert not torch.allclose(trained, model.hidden(embeds), atol=1e-3)  # the adapter does something
    again = TrainableLora.from_peft_files(config, files)
    for name, value in lora.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    trained.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.parameters())
    wrong_rank = dict(files)
    wrong_rank["adapter_config.json"] = json.dumps(
        {"r": 2, "lora_alpha": 4, "target_modules": list(TARGETS)}
    ).encode()
    with pytest.raises(InvalidArgument, match="shapes"):
        TrainableLora.from_peft_files(config, wrong_rank)


def test_lora_dropout_acts_in_training_only_and_is_recorded(tiny_base: object) -> None:
    model, config = tiny_base.model, tiny_base.config
    plain = _random_lora(config)
    dropping = TrainableLora(config, 4, 8.0, TARGETS, dropout=0.5)
    dropping.load_state_dict(plain.state_dict())
    embeds = torch.randn(2, 7, config.dim)
    dropping.eval()
    assert torch.equal(lora_hidden(model, embeds, dropping), lora_hidden(model, embeds, plain))
    dropping.train()
    torch.manual_seed(0)
    dropped = lora_hidden(model, embeds, dropping)
    assert not torch.allclose(dropped, lora_hidden(model, embeds, plain), atol=1e-4)
    torch.manual_seed(0)
    assert torch.equal(dropped, lora_hidden(model, embeds, dropping))  # the seed decides the mask
    files = dropping.peft_files(tiny_base.model_id)
    assert json.loads(files["adapter_config.json"])["lora_dropout"] == 0.5
    assert TrainableLora.from_peft_files(config, files, dropout=0.1).dropout == 0.1  # this training's
    with pytest.raises(InvalidArgument, match="dropout"):
        TrainableLora(config, 4, 8.0, TARGETS, dropout=1.0)


def test_shards_stay_under_their_size_and_read_back(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.randn(1000 + i) for i in range(10)}  # ~4 KB each
    paths = save_sharded(tensors, tmp_path, "weights", max_bytes=10_000)
    assert len(paths) == 5 and all(path.stat().st_size < 10_500 for path in paths)
    back = load_sharded(tmp_path, "weights")
    assert set(back) == set(tensors) and all(torch.equal(back[n], t) for n, t in tensors.items())
    save_sharded({"only": torch.zeros(3)}, tmp_path, "weights")  # older shards of the stem go away
    assert set(load_sharded(tmp_path, "weights")) == {"only"}


def test_qa_examples_come_from_train_splits_and_hold_some_out(qa_cache: Path, tiny_base: object) -> None:
    train = QAExamples.load(qa_cache.with_suffix(".train.npz"))
    held = QAExamples.load(qa_cache.with_suffix(".held_out.npz"))
    assert set(train.sources) == {"hotpotqa", "squad"} and len(held) > 0
    assert all(0 < len(doc) <= 48 for doc in train.documents)
    eos = tiny_base.tokenizer.eos_token_id
    assert all(answer[-1] == eos for answer in train.answers)
    questions = {tiny_base.tokenizer.decode(p) for p in held.prompts}
    assert not questions & {tiny_base.tokenizer.decode(p) for p in train.prompts}


def _options(corpus: Path, output: Path, **changes: object) -> PretrainOptions:
    values = dict(
        corpus=corpus, output=output, segment_len=16, k=4, segments=3, batch_size=3, learning_rate=5e-3,
        warmup_steps=1, max_steps=6, eval_windows=4, eval_qa=4, log_every=1, lora_rank=4, lora_targets=TARGETS,
    )  # fmt: skip
    return PretrainOptions(**(values | changes))


def test_qa_steps_train_the_reader_and_it_ships_with_the_compressor(
    corpus: Path, qa_cache: Path, tiny_model_dir: Path, tiny_base: object, tmp_path: Path
) -> None:
    settings = Settings(model={"base_model": str(tiny_model_dir), "cache_dir": str(tmp_path / "cache")})
    options = _options(corpus, tmp_path / "out", qa_cache=qa_cache, qa_fraction=0.5, reader_rank=4)
    record = pretrain(settings, options, command="qa")
    kinds = {key for point in record["loss_curve"] for key in point if key.endswith("_loss")}
    assert "qa_loss" in kinds and kinds & {"next_loss", "reconstruct_loss"}
    assert record["qa_examples"]["sources"] == ["hotpotqa", "squad"]
    probe = record["held_out"]["qa_probe"]
    assert probe["decoder"] == "base + reader" and set(probe["answer_nll"]) == {
        "no_context",
        "compressed",
        "compressed_other",  # another document's summaries: the control for answer-format priors
        "full_text",
    }
    # the control pairs each example with the next one of its own source, never itself unless it is alone
    assert _other_of_same_source(["a", "b", "a", "a", "c"]) == [2, 1, 3, 0, 4]
    assert set(probe["answer_nll_by_source"]) == {"hotpotqa", "squad"}  # the probe takes each source in turn
    assert record["held_out"]["next_segment"]["decoder"] == "base + reader"
    compressor = Compressor.load(tmp_path / "out", tiny_base)
    assert compressor.reader_files is not None and peft_geometry(compressor.reader_files)[1] == 4
    assert compressor.compressor_id == record["compressor_id"]
    shards = list((tmp_path / "out" / CHECKPOINT_DIR).glob("*.safetensors"))
    assert {p.name.split("-")[0] for p in shards} == {"weights", "optimizer"}


def test_a_resumed_run_continues_where_it_stopped(corpus: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(model={"base_model": str(tiny_model_dir), "cache_dir": str(tmp_path / "cache")})
    whole = pretrain(settings, _options(corpus, tmp_path / "whole"))
    first = pretrain(settings, _options(corpus, tmp_path / "split", stop_after_steps=3))
    assert first["steps"] == 3
    second = pretrain(settings, _options(corpus, tmp_path / "split"))
    assert second["steps"] == 6 and [run["first_step"] for run in second["runs"]] == [0, 3]
    assert [p["step"] for p in second["loss_curve"]] == [p["step"] for p in whole["loss_curve"]]
    for a, b in zip(whole["loss_curve"], second["loss_curve"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3)  # same data, schedule; bf16 moments differ
    changed = _options(corpus, tmp_path / "split", k=2, max_steps=7)
    with pytest.raises(InvalidArgument, match="other"):
        pretrain(settings, changed)


def test_a_new_run_starts_from_a_finished_compressor_and_keeps_its_record(
    corpus: Path, tiny_model_dir: Path, tiny_base: object, tmp_path: Path
) -> None:
    settings = Settings(model={"base_model": str(tiny_model_dir), "cache_dir": str(tmp_path / "cache")})
    earlier = pretrain(settings, _options(corpus, tmp_path / "a", max_steps=3))
    later = pretrain(settings, _options(corpus, tmp_path / "b", max_steps=2, init_from=tmp_path / "a"))
    assert later["runs"][0]["run_end"] and later["runs"][0]["compressor_id"] == earlier["compressor_id"]
    assert later["total_train_seconds"] >= earlier["train_seconds"] and later["steps"] == 2
    assert later["total_tokens_seen"] == earlier["train_tokens_seen"] + later["train_tokens_seen"]
    with pytest.raises(InvalidArgument, match="k=4"):
        pretrain(settings, _options(corpus, tmp_path / "c", k=8, init_from=tmp_path / "a"))


def test_a_reader_only_run_trains_the_reader_and_keeps_the_compressor_as_it_was(
    corpus: Path, qa_cache: Path, tiny_model_dir: Path, tiny_base: object, tmp_path: Path
) -> None:
    settings = Settings(model={"base_model": str(tiny_model_dir), "cache_dir": str(tmp_path / "cache")})
    pretrain(settings, _options(corpus, tmp_path / "a", max_steps=3))  # a compressor with a frozen decoder
    options = _options(
        corpus, tmp_path / "b", max_steps=3, init_from=tmp_path / "a", reader_only=True, reader_rank=4,
        qa_cache=qa_cache, qa_fraction=0.5,
    )  # fmt: skip
    record = pretrain(settings, options)
    before, after = Compressor.load(tmp_path / "a", tiny_base), Compressor.load(tmp_path / "b", tiny_base)
    assert torch.equal(before.summary_embeds, after.summary_embeds)
    assert torch.equal(before.output_scale, after.output_scale)
    a_files, b_files = before.adapter_files, after.adapter_files
    assert a_files is not None and b_files is not None and a_files.keys() == b_files.keys()
    assert all(a_files[name] == b_files[name] for name in a_files)  # the encoder's PEFT files, byte for byte
    reader = after.reader_files
    assert reader is not None and peft_geometry(reader)[1] == 4
    reader_weights = safetensors.torch.load(reader["adapter_model.safetensors"])
    # the reader started with B = 0 (the base decoder exactly) and trained; it is all the run trained
    assert any(w.abs().sum() > 0 for name, w in reader_weights.items() if "lora_B" in name)
    assert record["trainable_params"] == sum(w.numel() for w in reader_weights.values())
    assert "reader only" in record["objective"] and record["options"]["reader_only"]
    assert record["held_out"]["qa_probe"]["decoder"] == "base + reader"
    # the checkpoint keeps optimizer moments for the reader's weights alone
    moments = load_sharded(tmp_path / "b" / CHECKPOINT_DIR, "optimizer", "cpu")
    assert moments and all(name.startswith("reader.") for name in moments)

    # stopped and resumed, it follows the uninterrupted run; its checkpoint refuses to resume as a full run
    split = dict(options.model_dump(), output=tmp_path / "split")
    pretrain(settings, PretrainOptions(**(split | {"stop_after_steps": 2})))
    resumed = pretrain(settings, PretrainOptions(**split))
    assert [p["step"] for p in resumed["loss_curve"]] == [p["step"] for p in record["loss_curve"]]
    for a, b in zip(record["loss_curve"], resumed["loss_curve"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3)
    with pytest.raises(InvalidArgument, match="reader_only"):
        pretrain(settings, PretrainOptions(**(split | {"reader_only": False, "max_steps": 4})))

    with pytest.raises(ValueError, match="init_from"):
        _options(corpus, tmp_path / "c", reader_only=True, reader_rank=4)
    with pytest.raises(InvalidArgument, match="no reader"):
        pretrain(
            settings,
            _options(corpus, tmp_path / "d", max_steps=1, init_from=tmp_path / "a", reader_only=True),
        )
    with pytest.raises(InvalidArgument, match="reader of rank 4"):  # b's reader continues, or none is made
        pretrain(
            settings,
            _options(corpus, tmp_path / "e", init_from=tmp_path / "b", reader_only=True, reader_rank=8),
        )
