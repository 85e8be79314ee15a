"""`lloco model push` against a real SeaweedFS store: what a pod that may reach no package index loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from lloco.cli import app
from lloco.errors import InvalidArgument, NotFound, Unavailable
from lloco.model.loading import COMPLETE_MARKER, DEFAULT_MODEL, convert_default_model, load_model
from lloco.model.staging import push_model
from lloco.storage import keys
from typer.testing import CliRunner


def _config_file(tmp_path: Path, store: object, cache_dir: Path) -> Path:
    """A settings YAML pointing at the test's bucket (what `--config` reads)."""
    settings = store.settings
    path = tmp_path / "lloco.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "store": {
                    "endpoint_url": settings.endpoint_url,
                    "bucket": settings.bucket,
                    "access_key_id": settings.access_key_id.get_secret_value(),
                    "secret_access_key": settings.secret_access_key.get_secret_value(),
                },
                "model": {"cache_dir": str(cache_dir)},
            }
        )
    )
    return path


def _logits(loaded: object) -> torch.Tensor:
    model = loaded.model
    tokens = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        return model(model.embed(tokens))


def test_pushed_model_loads_from_the_store_by_the_printed_spec(
    tmp_path: Path, store: object, tiny_model_dir: Path
) -> None:
    config = _config_file(tmp_path, store, tmp_path / "operator-cache")
    result = CliRunner().invoke(
        app, ["model", "push", str(tiny_model_dir), "--id", "tiny", "--config", str(config)]
    )
    assert result.exit_code == 0, result.output
    spec = store.uri(keys.model_prefix("tiny"))
    assert f"serve it with model.base: {spec}" in result.output
    assert store.exists("models/tiny/" + COMPLETE_MARKER)

    # a pod: an empty cache, the spec from the values
    served = load_model(spec, tmp_path / "pod-cache", store)
    local = load_model(str(tiny_model_dir), tmp_path / "unused")
    assert served.config == local.config
    torch.testing.assert_close(_logits(served), _logits(local))


def test_default_model_id_makes_the_default_spec_load_from_the_store_without_pip(
    tmp_path: Path, store: object, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the chart relies on: with the model staged under the default id, a pod whose pip may reach no
    index (PIP_NO_INDEX=1, as the chart sets it) loads `smollm2-135m-instruct` from the store."""
    push_model(store, tiny_model_dir, DEFAULT_MODEL)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    loaded = load_model(DEFAULT_MODEL, tmp_path / "pod-cache", store)
    assert loaded.model_id == DEFAULT_MODEL
    assert loaded.config == load_model(str(tiny_model_dir), tmp_path / "unused").config


def test_without_a_staged_model_the_pod_fails_fast_and_says_how_to_stage_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    target = tmp_path / "cache" / DEFAULT_MODEL
    target.parent.mkdir()
    with pytest.raises(Unavailable, match=f"lloco model push {DEFAULT_MODEL}"):
        convert_default_model(target)
    assert not target.exists()


def test_push_replaces_an_earlier_upload_and_refuses_what_a_pod_could_not_load(
    tmp_path: Path, store: object, tiny_model_dir: Path
) -> None:
    store.put_bytes("models/tiny/model-00002-of-00002.safetensors", b"left over from a bigger model")
    pushed = push_model(store, tiny_model_dir, "tiny")
    names = {key.removeprefix("models/tiny/") for key in store.list_keys("models/tiny/")}
    assert names == {p.name for p in tiny_model_dir.iterdir()} | {COMPLETE_MARKER}
    assert pushed.files == len(names) - 1 and pushed.bytes > 0

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model_dir, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(InvalidArgument, match="no tokenizer"):
        push_model(store, no_tokenizer, "broken")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(NotFound, match="weights"):
        push_model(store, no_weights, "broken")
    with pytest.raises(NotFound, match="config.json"):
        push_model(store, tmp_path, "broken")
    assert not list(store.list_keys("models/broken/"))  # refused before anything was uploaded
    with pytest.raises(InvalidArgument):
        push_model(store, tiny_model_dir, "../escape")


def test_push_command_reports_errors_without_a_traceback(tmp_path: Path, store: object) -> None:
    config = _config_file(tmp_path, store, tmp_path / "cache")
    result = CliRunner().invoke(app, ["model", "push", str(tmp_path / "missing"), "--config", str(config)])
    assert result.exit_code == 1
    assert "error:" in result.output and "is not a directory" in result.output
