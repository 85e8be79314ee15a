"""Compressor pretraining: the corpus (sources, exclusions, size cap) and the recipe on a tiny random Llama."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from lloco.config import Settings
from lloco.errors import FailedPrecondition
from lloco.finetune.corpus import (
    Corpus,
    Document,
    build_corpus,
    evaluation_titles,
    hotpot_documents,
    html_to_text,
    pod_to_text,
)
from lloco.finetune.pretrain import RECORD_FILE, pretrain
from lloco.finetune.pretrain_job import run_pretrain_job
from lloco.finetune.pretrain_options import PretrainOptions
from lloco.model import load_compressor, load_model
from typer.testing import CliRunner

DATA = Path(__file__).resolve().parent / "data" / "qa"  # small subsets of the QA sets (tests/data/README.md)

SPHINX_PAGE = """<html><head><title>json</title><script>var x = 1;</script></head><body>
<div class="related" role="navigation"><ul><li><a href="index.html">index</a></li></ul></div>
<div class="body" role="main"><h1>json — JSON encoder<a class="headerlink" href="#">¶</a></h1>
<p>JSON is a   lightweight <em>data</em> interchange format &amp; more.</p>
<pre>import json
json.dumps([1, 2])</pre><p>Unclosed paragraph<p>next one</div>
<div class="sphinxsidebar"><h3>Previous topic</h3></div><div class="footer">© Copyright</div></body></html>"""

POD_PAGE = """=head1 NAME

perlfoo - B<bold> and C<< $a <=> $b >> and L<the manual|perlfunc/open>

=over 4

=item X<index>sort E<lt>listE<gt>

Sorts I<LIST> with E<0x41> and Z<>nothing.

=back

=begin html

<p>raw html is dropped</p>

=end html

=cut

sub code_outside_pod { 1 }
"""


def test_html_and_pod_become_readable_text_without_page_furniture() -> None:
    text = html_to_text(SPHINX_PAGE)
    assert text.splitlines()[0] == "json — JSON encoder"
    assert "JSON is a lightweight data interchange format & more." in text
    assert "import json\njson.dumps([1, 2])" in text  # code keeps its lines
    assert "Unclosed paragraph\n" in text and "next one" in text
    for furniture in ("index", "¶", "Previous topic", "Copyright", "var x"):
        assert furniture not in text
    pod = pod_to_text(POD_PAGE)
    assert "perlfoo - bold and $a <=> $b and the manual" in pod
    assert "sort <list>" in pod and "Sorts LIST with A and nothing." in pod
    assert "raw html" not in pod and "code_outside_pod" not in pod and "=over" not in pod


@pytest.fixture(scope="module")
def tiny_base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> object:
    return load_model(str(tiny_model_dir), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def corpus_file(tiny_base: object, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    """A small real corpus: HotpotQA train paragraphs (eval titles excluded) and two manual pages."""
    excluded = evaluation_titles(DATA)
    documents = [
        *itertools.islice(hotpot_documents(DATA, excluded), 120),
        Document("python-doc", "json.html", html_to_text(SPHINX_PAGE) * 20),
        Document("perl-doc", "perlfoo.pod", pod_to_text(POD_PAGE) * 20),
    ]
    path = tmp_path_factory.mktemp("corpus") / "corpus.npz"
    build_corpus(path, tiny_base.tokenizer, tiny_base.model_id, documents, 10**7, held_out_fraction=0.1)
    return path, excluded


def test_corpus_leaves_out_evaluation_titles_and_keeps_under_its_cap(
    corpus_file: tuple[Path, set[str]], tiny_base: object, tmp_path: Path
) -> None:
    path, excluded = corpus_file
    assert {"Immune system", "Rhine", "Prime number"} <= excluded  # SQuAD test articles 25, 28, 27
    corpus = Corpus.load(path)
    meta = corpus.meta
    assert meta["model_id"] == tiny_base.model_id and meta["vocab_size"] == len(tiny_base.tokenizer)
    assert set(meta["sources"]) == {"hotpotqa", "python-doc", "perl-doc"}
    assert meta["train_documents"] > 0 and meta["held_out_documents"] > 0
    assert corpus.train_offsets[-1] == len(corpus.train_tokens) == meta["train_tokens"]
    ends = corpus.train_tokens[corpus.train_offsets[1:] - 1]
    assert (ends == tiny_base.tokenizer.eos_token_id).all()  # every document ends with EOS
    text = tiny_base.tokenizer.decode(corpus.train_tokens[:20000].tolist())
    for paragraph in text.split("\n\n"):
        assert paragraph.split("\n", 1)[0] not in excluded
    corpus.check_tokenizer(tiny_base.tokenizer)
    # a cap below the whole set drops training documents (never held-out ones) until the file fits
    documents = list(itertools.islice(hotpot_documents(DATA, excluded), 120))
    capped = tmp_path / "capped.npz"
    cap = path.stat().st_size // 2
    small = build_corpus(capped, tiny_base.tokenizer, "tiny", documents, cap, held_out_fraction=0.1)
    assert capped.stat().st_size <= cap
    assert 0 < small["train_documents"] < meta["train_documents"] - 2


def test_pretraining_lowers_the_loss_and_saves_a_compressor_that_loads(
    corpus_file: tuple[Path, set[str]], tiny_base: object, tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = Settings(model={"base_model": str(tiny_model_dir), "cache_dir": str(tmp_path / "cache")})
    options = PretrainOptions(
        corpus=corpus_file[0],
        output=tmp_path / "compressor",
        segment_len=16,
        k=4,
        segments=4,
        batch_size=4,
        learning_rate=1e-2,
        warmup_steps=2,
        max_steps=16,
        eval_windows=8,
        log_every=4,
    )
    record = pretrain(settings, options, command="test")
    curve = [point["loss"] for point in record["loss_curve"]]
    assert len(curve) == 4 and curve[-1] < curve[0]
    assert all({"next_loss", "reconstruct_loss"} <= set(point) for point in record["loss_curve"])
    perplexity = record["held_out"]["next_segment"]["perplexity"]
    assert set(perplexity) == {
        "no_context",
        "compressed",
        "compressed_untrained",
        "full_text",
        "reconstruction",
    }
    assert perplexity["compressed"] < perplexity["compressed_untrained"]
    assert perplexity["compressed"] < perplexity["no_context"]
    assert record["steps"] == 16 and record["command"] == "test"
    assert record["corpus"]["sources"]["hotpotqa"]["documents"] > 0
    saved = json.loads((tmp_path / "compressor" / RECORD_FILE).read_text())
    assert saved["compressor_id"] == record["compressor_id"]
    compressor = load_compressor(str(tmp_path / "compressor"), tiny_base)
    assert compressor.compressor_id == record["compressor_id"]
    assert (compressor.segment_len, compressor.k, compressor.accumulate) == (16, 4, True)
    assert compressor.lora is not None  # the encoder LoRA travels with the compressor
    assert compressor.output_scale is not None and compressor.output_scale.shape == (64,)
    vectors = compressor.compress([list(range(3, 40)), list(range(5, 20))])
    assert [tuple(v.shape) for v in vectors] == [(12, 64), (4, 64)]
    assert torch.isfinite(vectors[0]).all()


def test_decodes_batched_in_one_forward_give_the_losses_and_gradients_of_one_forward_each(
    corpus_file: tuple[Path, set[str]], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """An LM step runs the decodes between two stop-gradients as one right-padded forward; prefixes and
    segments of different lengths must score exactly as they do alone, gradients included."""
    from lloco.finetune.pretrain import CompressorPretrain, _Decode

    settings = Settings(model={"base_model": str(tiny_model_dir), "cache_dir": str(tmp_path / "cache")})
    options = PretrainOptions(
        corpus=corpus_file[0],
        output=tmp_path / "out",
        segment_len=16,
        k=4,
        reader_rank=4,
        eval_windows=2,
        max_steps=1,
    )
    run = CompressorPretrain(settings, options)
    run.setup()
    ids = torch.as_tensor(run.corpus.train_tokens[:200].astype("int64")).view(2, 100)
    embeds = run.model.embed(ids)

    def decodes() -> list[_Decode]:
        first = run._encode(None, list(embeds[:, :16]))  # [2, 4, D], through the encoder LoRA
        second = run._encode(first, list(embeds[:, 16:40]))
        both = torch.cat([first, second], dim=1)
        return [
            _Decode(first, embeds[:, 16:40], ids[:, 16:40]),  # P 4, L 24
            _Decode(both, embeds[:, 40:51], ids[:, 40:51]),  # P 8, L 11
            _Decode(second, embeds[:, 16:40], ids[:, 16:40]),  # reconstruction-like: its own segment
        ]

    def grads(losses: list[torch.Tensor]) -> list[torch.Tensor]:
        run.trainables.zero_grad()
        torch.stack(losses).sum().backward()
        return [p.grad.clone() for p in run.trainables.parameters() if p.grad is not None]

    together = run._decode_losses(decodes())
    alone = [run._decode_losses([decode])[0] for decode in decodes()]
    assert torch.allclose(torch.stack(together), torch.stack(alone), rtol=1e-5)
    batched, separate = (
        grads(run._decode_losses(decodes())),
        grads([run._decode_losses([decode])[0] for decode in decodes()]),
    )
    assert len(batched) == len(separate) > 2  # summaries, scale, encoder and reader LoRAs
    for a, b in zip(batched, separate, strict=True):
        # rounding, not masking: the batched forward sums in another order (BLAS blocking follows the shapes
        # and the CPU), so elements near zero differ by ~1e-6 of the largest; a masking error moves them by far more
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_pretraining_needs_held_out_documents_long_enough_to_score(
    corpus_file: tuple[Path, set[str]], tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = Settings(model={"base_model": str(tiny_model_dir), "cache_dir": str(tmp_path / "cache")})
    options = PretrainOptions(
        corpus=corpus_file[0], output=tmp_path / "out", segment_len=4096, max_steps=1, eval_segments=8
    )
    with pytest.raises(FailedPrecondition, match="held-out"):
        pretrain(settings, options)


def test_pretrain_command_runs_on_ray_train_and_in_process(
    ray_local: None,
    corpus_file: tuple[Path, set[str]],
    tiny_model_dir: Path,
    tmp_path: Path,
    tiny_base: object,
) -> None:
    settings = Settings(model={"base_model": str(tiny_model_dir), "cache_dir": str(tmp_path / "cache")})
    options = PretrainOptions(
        corpus=corpus_file[0], output=tmp_path / "ray", segment_len=16, k=2, segments=3, batch_size=2,
        max_steps=2, eval_windows=2,
    )  # fmt: skip
    record = run_pretrain_job(settings, options, command="ray", cpus_per_worker=0.5)
    assert record["steps"] == 2
    assert load_compressor(str(tmp_path / "ray"), tiny_base).compressor_id == record["compressor_id"]

    from lloco.cli import app

    args = [
        "pretrain-compressor", "--corpus", str(corpus_file[0]), "--output", str(tmp_path / "cli"),
        "--base-model", str(tiny_model_dir), "--segment-len", "16", "--k", "2", "--segments", "3",
        "--batch-size", "2", "--max-steps", "2", "--eval-windows", "2", "--reconstruction", "0", "--no-ray",
        "--lora-targets", "q_proj,v_proj",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"LLOCO_MODEL__CACHE_DIR": str(tmp_path / "cache")})
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "cli" / RECORD_FILE).read_text())
    assert saved["command"].startswith("lloco ") and saved["options"]["max_steps"] == 2
    assert saved["options"]["lora_targets"] == ["q_proj", "v_proj"]
    bad = CliRunner().invoke(app, [*args[:-1], "q_proj,lm_head"])
    assert bad.exit_code == 1 and bad.stderr.startswith("error: ") and "unknown LoRA targets" in bad.stderr
    zero = CliRunner().invoke(app, [*args, "--k", "0"])
    assert zero.stderr == "error: bad pretraining options: k: Input should be greater than or equal to 1\n"
    assert all("reconstruct_loss" not in point for point in saved["loss_curve"])  # next-segment steps only
    assert json.loads(result.output.strip().splitlines()[-1])["compressor_id"] == saved["compressor_id"]
