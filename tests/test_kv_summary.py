"""Key/value summaries: the prefix pass equals attention over the text it stands for, the compressor's
key/value form (batched, saved, refused by the serving path) and pretraining in that form, tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from lloco.config import Settings
from lloco.errors import InvalidArgument
from lloco.finetune.data import Example, collate
from lloco.finetune.pretrain import pretrain
from lloco.finetune.pretrain_eval import FACT_PREFIXES
from lloco.finetune.pretrain_options import PretrainOptions
from lloco.finetune.steps import answer_loss
from lloco.model import (
    Compressor,
    CompressorConfig,
    Generator,
    SamplingParams,
    TrainableLora,
    load_compressor,
    load_model,
)
from lloco.model.kv_summary import kv_width, prefix_hidden
from lloco.model.salient import CONTENT_WEIGHT, SINK_TOKENS, salient_positions


@pytest.fixture(scope="module")
def tiny_base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> object:
    base = load_model(str(tiny_model_dir), tmp_path_factory.mktemp("cache"))
    base.model.requires_grad_(False)
    return base


def _lora(config: object) -> TrainableLora:
    lora = TrainableLora(config, 4, 8.0, ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"), seed=1)
    with torch.no_grad():
        for b in lora.b.values():
            b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    return lora


@torch.no_grad()
def test_a_text_s_own_keys_and_values_as_prefix_give_the_whole_text_s_states(tiny_base: object) -> None:
    """Keeping every position of a first part and reading the rest after it must equal one causal pass over
    both: keys are kept before RoPE and rotated where they are read, layer by layer, GQA included."""
    model = tiny_base.model
    ids = torch.randint(0, tiny_base.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    embeds = model.embed(ids)
    lora = _lora(tiny_base.config).bind(model.dtype)
    whole = prefix_hidden(model, embeds, None, lora)[0]
    assert torch.allclose(whole, model.hidden(embeds, lora), atol=1e-5)
    keep = torch.arange(12)[None].expand(2, 12)
    _, kept = prefix_hidden(model, embeds[:, :12], None, lora, keep)
    assert kept.shape == (2, 12, kv_width(tiny_base.config))
    rest, _ = prefix_hidden(model, embeds[:, 12:], kept, lora)
    assert torch.allclose(rest, whole[:, 12:], atol=1e-5)
    # kept positions need not be contiguous: every second one, read after nothing else, still attends only
    # to what it was given (a different result from the whole text)
    sparse = prefix_hidden(model, embeds[:, :12], None, lora, torch.arange(0, 12, 2)[None].expand(2, 6))[1]
    assert not torch.allclose(prefix_hidden(model, embeds[:, 12:], sparse, lora)[0], whole[:, 12:], atol=1e-3)


def test_the_key_value_compressor_batches_saves_and_loads(tiny_base: object, tmp_path: Path) -> None:
    compressor = Compressor.from_base(tiny_base, 10, 3, True, seed=0, summary_form="kv")
    assert compressor.output_scale is None and compressor.compressor_id.split("-")[-2] == "kv"
    gen = torch.Generator().manual_seed(1)
    docs = [
        torch.randint(0, tiny_base.config.vocab_size, (n,), generator=gen).tolist() for n in (23, 7, 0, 31)
    ]
    together = compressor.compress(docs, batch_size=3)
    width = kv_width(tiny_base.config)  # 2 layers x (key + value) x 2 kv heads x 16
    assert width == 128
    assert [tuple(v.shape) for v in together] == [(9, width), (3, width), (0, width), (12, width)]
    for doc, batched in zip(docs, together, strict=True):  # padding and batching change nothing
        assert torch.allclose(compressor.compress([doc])[0], batched, atol=1e-5)
    compressor.save(tmp_path / "kv")
    loaded = Compressor.load(tmp_path / "kv", tiny_base)
    assert loaded.summary_form == "kv" and loaded.compressor_id == compressor.compressor_id
    assert torch.allclose(loaded.compress(docs[:1])[0], together[0], atol=1e-5)
    assert load_compressor(str(tmp_path / "kv"), tiny_base).summary_form == "kv"
    with pytest.raises(InvalidArgument, match="output scale"):
        Compressor(
            tiny_base, compressor.summary_embeds, 10, True, output_scale=torch.ones(64), summary_form="kv"
        )


def test_pretraining_key_value_summaries_lowers_the_loss_and_scores_them(
    corpus: Path,
    qa_cache: Path,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    settings = Settings(model={"base_model": str(tiny_model_dir), "cache_dir": str(tmp_path / "cache")})
    common = dict(
        corpus=corpus,
        segment_len=16,
        k=4,
        segments=4,
        batch_size=4,
        learning_rate=1e-2,
        warmup_steps=2,
        eval_windows=4,
        eval_qa=6,
        log_every=4,
        qa_cache=qa_cache,
        qa_fraction=0.5,
        summary_form="kv",
    )
    record = pretrain(settings, PretrainOptions(output=tmp_path / "kv", max_steps=12, **common), command="t")
    curve = record["loss_curve"]
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert {"next_loss", "reconstruct_loss", "qa_loss"} <= set().union(*curve)
    assert (
        record["trainable_params"]
        == sum(  # summary embeddings + encoder LoRA: no output scale
            p.numel()
            for p in TrainableLora(
                load_model(str(tiny_model_dir), tmp_path / "c").config,
                16,
                32.0,
                PretrainOptions.model_fields["lora_targets"].default,
            ).parameters()
        )
        + 4 * 64
    )
    assert record["objective"].startswith("key/value summaries")
    held = record["held_out"]
    perplexity = held["next_segment"]["perplexity"]
    assert perplexity["compressed"] < perplexity["compressed_untrained"]
    probe = held["qa_probe"]
    assert set(probe["answer_exact"]) == {"no_context", "compressed", "compressed_other", "full_text"}
    assert all(0 <= value <= 1 for value in probe["answer_exact"].values())
    facts = held["fact_recall"]  # planted facts of 8 passkey validation documents, 4 each, read back
    assert facts["documents"] == 8 and facts["facts"] == 32 and facts["answer_tokens"] >= 32
    assert set(facts["exact"]) == set(facts["answer_nll"]) == set(FACT_PREFIXES)
    assert set(facts["exact_by_kind"]) <= {"code", "birthday", "city", "leader"}
    assert all(0 <= v <= 1 for kind in facts["exact_by_kind"].values() for v in kind.values())
    saved = Compressor.load(tmp_path / "kv", load_model(str(tiny_model_dir), tmp_path / "c"))
    assert saved.summary_form == "kv" and saved.compressor_id == record["compressor_id"]
    # a run continues only a compressor of its own form
    with pytest.raises(InvalidArgument, match="summaries"):
        pretrain(
            settings,
            PretrainOptions(
                **{**common, "summary_form": "embeddings"},
                output=tmp_path / "e",
                init_from=tmp_path / "kv",
                max_steps=1,
            ),
        )


def _text_kv(model: object, ids: list[int]) -> torch.Tensor:
    """The exact key/value summaries of a text: every position of it kept."""
    embeds = model.embed(torch.tensor([ids]))
    return prefix_hidden(model, embeds, None, None, torch.arange(len(ids))[None])[1][0]


@torch.no_grad()
@pytest.mark.parametrize("chunk", [None, 3])
def test_the_generator_reads_key_value_summaries_as_the_text_they_hold(
    tiny_base: object, chunk: int | None
) -> None:
    """A text's own keys and values as ``prefix_kv`` must give the tokens the text itself gives: written into
    the cache with keys rotated to their positions, the prompt prefilled after them (whole or in chunks while
    another row decodes, whose padding writes must not land inside the summaries)."""
    model = tiny_base.model
    gen = torch.Generator().manual_seed(3)
    vocab = tiny_base.config.vocab_size
    document, other = (torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (37, 21))
    prompt = torch.randint(3, vocab, (6,), generator=gen).tolist()
    params = SamplingParams(max_new_tokens=10)

    def run(requests: list[tuple[str, dict]]) -> dict[str, list[int]]:
        generator = Generator(model, None, 4, 80, eos_token_ids=(), prefill_chunk_tokens=chunk)
        tokens: dict[str, list[int]] = {name: [] for name, _ in requests}
        for step, (name, kwargs) in enumerate(requests):
            generator.add(name, kwargs.get("embeds"), kwargs["prompt"], -1, params, kwargs.get("kv"))
            if step == 0:  # the first row decodes while the others join
                for out in generator.step() + generator.step():
                    tokens[out.request_id].append(out.token_id)
        while generator.active():
            for out in generator.step():
                tokens[out.request_id].append(out.token_id)
        return tokens

    text = run([("busy", {"prompt": other}), ("doc", {"prompt": document + prompt})])
    summaries = run(
        [("busy", {"prompt": other}), ("doc", {"prompt": prompt, "kv": _text_kv(model, document)})]
    )
    assert summaries == text and len(text["doc"]) == 10
    generator = Generator(model, None, 2, 80)
    with pytest.raises(InvalidArgument, match="key/value summaries"):
        generator.add("x", None, [], -1, params, _text_kv(model, document))  # nothing to sample after
    with pytest.raises(InvalidArgument, match="key/value summaries"):
        generator.add("x", None, prompt, -1, params, torch.zeros(4, 64))  # an embedding's width


def test_finetuning_after_key_value_summaries_scores_the_answer_as_after_the_text(tiny_base: object) -> None:
    """Tenant LoRA training with key/value-summary contexts: without an adapter the answer loss equals the text
    inline's (positions, masks); rows of different prefix lengths, right-padded together, give the loss and
    gradients they give alone."""
    model = tiny_base.model
    gen = torch.Generator().manual_seed(4)
    vocab = tiny_base.config.vocab_size
    rows = [
        (
            torch.randint(3, vocab, (n,), generator=gen).tolist(),
            torch.randint(3, vocab, (m,), generator=gen).tolist(),
        )
        for n, m in ((25, 9), (11, 14))
    ]
    with torch.no_grad():
        kv = [_text_kv(model, document) for document, _ in rows]
    inline = [Example(i, None, document + tail, 4) for i, (document, tail) in enumerate(rows)]
    summarized = [Example(i, kv[i], tail, 4, kv_prefix=True) for i, (_, tail) in enumerate(rows)]
    with torch.no_grad():
        plain = answer_loss(model, None, collate(summarized, model.embed, "cpu"))
        assert torch.allclose(plain, answer_loss(model, None, collate(inline, model.embed, "cpu")), rtol=1e-5)
    lora = _lora(tiny_base.config)

    def loss_and_grads(batches: list[list[Example]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        lora.zero_grad()
        loss = sum(answer_loss(model, lora, collate(examples, model.embed, "cpu")) for examples in batches)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in lora.parameters()]

    (together, grads_together) = loss_and_grads([summarized])
    (alone, grads_alone) = loss_and_grads([[example] for example in summarized])
    assert torch.allclose(together, alone, rtol=1e-5)
    for a, b in zip(grads_together, grads_alone, strict=True):
        # rounding, not masking: the batched forward sums in another order (BLAS blocking follows the shapes
        # and the CPU), so elements near zero differ by ~1e-6 of the largest; a masking error moves them by far more
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    with pytest.raises(InvalidArgument, match="mixes"):
        collate(
            [summarized[0], Example(9, model.embed(torch.tensor(rows[0][0])), rows[0][1], 4)],
            model.embed,
            "cpu",
        )


def test_salient_positions_keep_the_most_surprising_sentences_whole(tiny_base: object) -> None:
    """The sentence the model predicted worst is kept whole (its end token included) before any token of a
    duller sentence; a document's first segment keeps its sink tokens first; padding is never kept."""
    tokenizer = tiny_base.tokenizer
    sentences = ["the cat sat on the mat.", " zq xv jk wp.", " the dog sat on the log."]
    parts = [tokenizer.encode(s, add_special_tokens=False) for s in sentences]
    ids = torch.tensor([sum(parts, []) + [0, 0]])  # two padding positions
    length = torch.tensor([ids.shape[1] - 2])
    surprisal = torch.full(ids.shape, 1.0)
    odd = range(len(parts[0]), len(parts[0]) + len(parts[1]))
    surprisal[0, list(odd)] = 5.0
    surprisal[0, 0] = float("nan")
    (kept,) = salient_positions(ids, surprisal, length, len(parts[1]), tokenizer, document_start=False)
    assert kept.tolist() == list(odd)
    (kept,) = salient_positions(ids, surprisal, length, len(parts[1]) + 4, tokenizer, document_start=True)
    assert kept.tolist() == [*range(SINK_TOKENS), *odd]
    (kept,) = salient_positions(ids, surprisal, length, 100, tokenizer, document_start=False)
    assert kept.tolist() == list(range(int(length)))


def test_names_and_numbers_are_worth_content_weight_nats_of_surprisal(tiny_base: object) -> None:
    """A sentence made of names and numbers outranks a plain one up to CONTENT_WEIGHT nats more surprising,
    and no further: the bonus is the sentence's share of such tokens times the weight."""
    tokenizer = tiny_base.tokenizer
    sentences = [" the cat sat on the mat.", " Apollo 4821 Zeus 1999 Rome."]
    parts = [tokenizer.encode(s, add_special_tokens=False) for s in sentences]
    pieces = tokenizer.batch_decode([[t] for t in parts[1]])
    share = sum(bool(re.search(r"\d|^\s?[A-Z]", p)) for p in pieces) / len(pieces)
    assert share > 0.3  # digits and capitalised pieces, whatever the tokenizer's split
    ids = torch.tensor([parts[0] + parts[1]])
    length = torch.tensor([ids.shape[1]])
    plain, named = range(len(parts[0])), range(len(parts[0]), ids.shape[1])
    for gap, winner in ((CONTENT_WEIGHT * share - 0.1, named), (CONTENT_WEIGHT * share + 0.1, plain)):
        surprisal = torch.full(ids.shape, 2.0)
        surprisal[0, list(plain)] = 2.0 + gap
        (kept,) = salient_positions(ids, surprisal, length, len(winner), tokenizer, document_start=False)
        assert kept.tolist() == list(winner), gap


@torch.no_grad()
def test_a_salient_compressor_keeps_its_tokens_own_keys_and_values(tiny_base: object, tmp_path: Path) -> None:
    """A salient_sentences compressor keeps k of each segment's own tokens' keys and values (all of a shorter
    last segment's up to k), computed after the kept ones of earlier segments: keeping every token is the
    whole text's cache. It has no weights; it saves as its config alone."""
    model, vocab = tiny_base.model, tiny_base.config.vocab_size
    gen = torch.Generator().manual_seed(4)
    docs = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (23, 7, 0, 31)]
    compressor = Compressor.salient(tiny_base, 10, 3)
    assert compressor.positions == "salient_sentences" and "-salient-" in compressor.compressor_id
    together = compressor.compress(docs, batch_size=3)
    width = kv_width(tiny_base.config)
    assert [tuple(v.shape) for v in together] == [(9, width), (3, width), (0, width), (10, width)]
    assert [compressor.summary_positions(len(d)) for d in docs] == [9, 3, 0, 10]
    first = torch.tensor([docs[0][:10]])
    own = prefix_hidden(model, model.embed(first), None, keep=torch.arange(10)[None])[1][0]
    assert all(torch.isclose(own, vector, atol=1e-5).all(dim=1).any() for vector in together[0][:3])

    keep_all = Compressor.salient(tiny_base, 10, 10)  # no choice left to a near tie of a random model
    batched = keep_all.compress(docs, batch_size=3)
    for doc, vectors in zip(docs, batched, strict=True):  # padding and batching change nothing
        assert torch.allclose(keep_all.compress([doc])[0], vectors, atol=1e-5)
    everything = batched[3]
    rest = model.embed(torch.tensor([docs[0]]))
    whole = prefix_hidden(model, torch.cat([model.embed(torch.tensor([docs[3]])), rest], dim=1), None)[0]
    assert torch.allclose(prefix_hidden(model, rest, everything[None])[0], whole[:, 31:], atol=1e-5)

    compressor.save(tmp_path / "salient")
    assert sorted(p.name for p in (tmp_path / "salient").iterdir()) == ["compressor.json"]
    loaded = Compressor.load(tmp_path / "salient", tiny_base)
    assert loaded.compressor_id == compressor.compressor_id and loaded.summary_embeds is None
    assert torch.equal(loaded.compress(docs[:1])[0], compressor.compress(docs[:1])[0])
    assert load_compressor(str(tmp_path / "salient"), tiny_base).compressor_id == compressor.compressor_id
    with pytest.raises(InvalidArgument, match="salient_sentences"):
        CompressorConfig("x", 10, 3, True, "m", 64, "embeddings", "salient_sentences")
