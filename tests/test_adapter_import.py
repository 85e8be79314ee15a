"""Bring-your-own adapters: PEFT LoRA adapters made with `peft` on the tiny model, imported over gRPC
(ImportAdapter) into the real stack (Ray Serve, SeaweedFS), then served, listed and rolled back like any
other version. Each served adapter is compared with peft on the same base: logits (the stored version in
the engine's slots) and greedy answers (gRPC queries against HF + peft `generate`).
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from lloco.api import lloco_pb2
from lloco.cli import app
from lloco.client import LlocoClient
from lloco.config import EngineSettings, LimitSettings, LoraSettings, ServeSettings, Settings
from lloco.errors import InvalidArgument
from lloco.ports import free_port
from lloco.registry import Registry
from lloco.serve.local import EmbeddedStack
from lloco.storage import keys
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from typer.testing import CliRunner

pytestmark = pytest.mark.timeout(300)

ADMIN_KEY = "admin-key-for-import-tests"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
QUESTION = "What is the capital of France?"
NEW_TOKENS = 12
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(
    tiny_settings: Callable[..., Settings], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStack]:
    """The whole platform on the tiny model: adapter slots of rank 8 on q/k/v/o (the finetune targets)."""
    settings = tiny_settings(
        tmp_path_factory.mktemp("lloco-data"),
        ADMIN_KEY,
        limits=LimitSettings(max_document_bytes=16 * 1024, max_new_tokens=64),
        lora=LoraSettings(max_rank=8, gpu_slots=2, cpu_adapters=4),
        engine=EngineSettings(max_batch_size=2, max_seq_len=256),
        serve=ServeSettings(grpc_port=free_port(), http_port=None, max_ongoing_requests=16),
    )
    with EmbeddedStack(settings, num_cpus=4, jobs=False) as running:
        yield running


@pytest.fixture(scope="module")
def tenant_keys(stack: EmbeddedStack) -> dict[str, str]:
    with LlocoClient(stack.address, ADMIN_KEY, tenant="acme") as admin:
        return {tenant: admin.create_tenant(tenant).api_key for tenant in ("acme", "globex")}


@pytest.fixture
def acme(stack: EmbeddedStack, tenant_keys: dict[str, str]) -> Iterator[LlocoClient]:
    with LlocoClient(stack.address, tenant_keys["acme"]) as client:
        yield client


@pytest.fixture
def globex(stack: EmbeddedStack, tenant_keys: dict[str, str]) -> Iterator[LlocoClient]:
    with LlocoClient(stack.address, tenant_keys["globex"]) as client:
        yield client


PeftFactory = Callable[..., tuple[object, Path]]


@pytest.fixture(scope="module")
def make_peft(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PeftFactory:
    """``make_peft(seed, base=tiny_model_dir, r=8, targets=ATTENTION, safe=True, **LoraConfig fields)`` ->
    (HF + peft model in eval mode, the folder save_pretrained wrote). A and B are random and nonzero, as in
    conftest's ``peft_adapter``; these tests also need the peft model (the reference) and other shapes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def make(
        seed: int,
        base: Path = tiny_model_dir,
        r: int = 8,
        targets: tuple[str, ...] = ATTENTION,
        safe: bool = True,
        **config: object,
    ) -> tuple[object, Path]:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        lora = LoraConfig(r=r, lora_alpha=16, target_modules=list(targets), init_lora_weights=False, **config)
        peft_model = get_peft_model(model, lora)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    parameter.normal_(0.0, 0.3)
        folder = tmp_path_factory.mktemp(f"peft-{seed}")
        peft_model.save_pretrained(folder, safe_serialization=safe)
        return peft_model.eval(), folder

    return make


def read_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (CONFIG, WEIGHTS)}


def inline(files: dict[str, bytes]) -> lloco_pb2.PeftAdapterFiles:
    return lloco_pb2.PeftAdapterFiles(adapter_config=files[CONFIG], adapter_model=files[WEIGHTS])


def import_request(client: LlocoClient, adapter: str, files: dict[str, bytes]) -> lloco_pb2.AdapterVersion:
    """ImportAdapter with the files inline, as any gRPC client sends them."""
    request = lloco_pb2.ImportAdapterRequest(parent=client.names.adapter(adapter), files=inline(files))
    return client._call(client._stub.ImportAdapter, request).version


def prompt_ids(tokenizer: object) -> list[int]:
    from lloco.model import chat_prompt

    return chat_prompt(tokenizer, QUESTION)


def peft_greedy(peft_model: object, tokenizer: object, eos: tuple[int, ...]) -> list[int]:
    """peft's greedy continuation of the query's prompt, without the end-of-sequence token."""
    ids = torch.tensor([prompt_ids(tokenizer)])
    with torch.no_grad():
        out = peft_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=list(eos),
            pad_token_id=tokenizer.pad_token_id,
        )
    tokens = out[0, ids.shape[1] :].tolist()
    return tokens[: next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]


def served_greedy(client: LlocoClient, adapter: str) -> tuple[list[int], str]:
    """The token ids of a greedy QueryStream with the adapter and no documents, and Query's answer."""
    tokens = [
        t
        for message in client.query_stream(QUESTION, [], adapter=adapter, max_new_tokens=NEW_TOKENS)
        for t in message.token_ids
    ]
    return tokens, client.query(QUESTION, [], adapter=adapter, max_new_tokens=NEW_TOKENS).answer


@pytest.fixture(scope="module")
def served(stack: EmbeddedStack):
    """The served base model in this process, as the engine loads it (fp32), with its tokenizer."""
    from lloco.model import load_model

    return load_model(stack.settings.model.base_model, stack.settings.model.cache_dir, dtype="float32")


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


# -- tests ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_imported_adapter_gives_peft_logits_and_greedy_answers(
    stack: EmbeddedStack, acme: LlocoClient, make_peft: PeftFactory, served: object
) -> None:
    from lloco.model import LoraSlots

    peft_model, folder = make_peft(seed=4)  # a seed whose greedy answer runs past a few tokens
    version = acme.import_adapter("imported", folder)
    assert version.name == "tenants/acme/adapters/imported/versions/v000001" and version.current
    assert version.rank == 8 and version.train_info["source"] == "import"
    assert version.train_info["origin"] == "inline" and version.train_info["targets"] == ",".join(
        sorted(ATTENTION)
    )

    # (a) logits: the stored version in slots of the engine's geometry vs peft on the same base, every position
    stored = Registry(stack.store, "acme").read_adapter_files("imported", "v000001")
    assert stored == read_files(folder)  # stored byte for byte
    model = served.model
    slots = LoraSlots(
        served.config,
        2,
        stack.settings.lora.max_rank,
        stack.settings.finetune.target_modules,
        dtype=model.dtype,
    )
    slots.load(1, stored)
    ids = torch.tensor([prompt_ids(served.tokenizer)])
    ours = model.lm_head(model.hidden(model.embed(ids), slots.batch(torch.tensor([1]))))[0]
    reference = peft_model(input_ids=ids).logits[0]
    assert torch.allclose(ours, reference, atol=1e-4, rtol=0), (ours - reference).abs().max()
    with peft_model.disable_adapter():
        base = peft_model(input_ids=ids).logits[0]
    assert (reference - base).abs().max() > 1e-2  # the adapter changes the logits: the check can fail

    # (b) a greedy gRPC query with the adapter answers what peft's greedy decode does
    expected = peft_greedy(peft_model, served.tokenizer, served.config.eos_token_ids)
    tokens, answer = served_greedy(acme, "imported")
    assert tokens == expected and len(tokens) == NEW_TOKENS
    assert answer == served.tokenizer.decode(expected, skip_special_tokens=True)
    assert served_greedy(acme, "")[0] != tokens  # the base model answers otherwise


def test_imported_versions_are_listed_and_rolled_back(
    stack: EmbeddedStack, acme: LlocoClient, make_peft: PeftFactory, served: object
) -> None:
    eos = served.config.eos_token_ids
    first_model, first = make_peft(seed=2)
    second_model, second = make_peft(seed=3, r=4, targets=("q_proj", "v_proj"), use_rslora=True)
    assert acme.import_adapter("rolled", first).name.endswith("/versions/v000001")
    # the second version comes from the tenant's uploads folder, as IngestDocument's source_uri does
    folder = keys.uploads_prefix("acme", stack.store.settings.uploads_template) + "adapters/rolled-2/"
    for name, data in read_files(second).items():
        stack.store.put_bytes(folder + name, data)
    version = acme.import_adapter_uri("rolled", stack.store.uri(folder))
    assert version.name.endswith("/versions/v000002") and version.rank == 4
    assert version.train_info["origin"] == stack.store.uri(folder)

    first_tokens = peft_greedy(first_model, served.tokenizer, eos)
    second_tokens = peft_greedy(second_model, served.tokenizer, eos)
    assert first_tokens != second_tokens
    assert served_greedy(acme, "rolled")[0] == second_tokens
    assert served_greedy(acme, "rolled@v000001")[0] == first_tokens
    listed = {a.name: a for a in acme.list_adapters()}
    assert listed["tenants/acme/adapters/rolled"].version_count == 2
    assert [v.name.rsplit("/", 1)[1] for v in acme.list_adapter_versions("rolled")] == ["v000002", "v000001"]

    acme.set_current_adapter("rolled", "v000001")  # rollback, as for a finetuned version
    assert served_greedy(acme, "rolled")[0] == first_tokens


def test_adapters_that_cannot_be_served_are_refused_with_their_reason(
    stack: EmbeddedStack,
    acme: LlocoClient,
    make_peft: PeftFactory,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from lloco.model import tiny_llama_dir

    _, good_folder = make_peft(seed=1)
    good = read_files(good_folder)
    config = json.loads(good[CONFIG])
    tensors = load_safetensors(good[WEIGHTS])
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    v_b = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def with_config(**fields: object) -> dict[str, bytes]:
        return {**good, CONFIG: json.dumps({**config, **fields}).encode()}

    def with_tensor(key: str, tensor: torch.Tensor) -> dict[str, bytes]:
        return {**good, WEIGHTS: save_safetensors({**tensors, key: tensor})}

    def refused(files: dict[str, bytes]) -> tuple[grpc.StatusCode, str]:
        return code_of(lambda: import_request(acme, "refused", files))

    invalid, unfit = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
    too_wide = read_files(make_peft(seed=5, r=16)[1])
    mlp = read_files(make_peft(seed=6, targets=("gate_proj", "up_proj"))[1])
    head = read_files(make_peft(seed=7, targets=("lm_head",))[1])
    pickled_folder = make_peft(seed=8, safe=False)[1]
    other_base = tiny_llama_dir(
        tmp_path_factory.mktemp("other-base"), seed=1, hidden_size=32, intermediate_size=64
    )
    other = read_files(make_peft(seed=9, base=other_base)[1])
    other_geometry = {**other, CONFIG: with_config()[CONFIG]}  # names the served model, shapes of another

    cases = {
        "rank too large": (too_wide, unfit, "rank 16 exceeds the slots' max_rank 8"),
        "unserved target": (mlp, unfit, "slots serve ['q_proj', 'k_proj', 'v_proj', 'o_proj']"),
        "not a projection": (
            head,
            invalid,
            "adapter tensor 'base_model.model.lm_head.base_layer.weight' is not a LoRA weight",  # peft saves it
        ),
        "pickle": (
            {**good, WEIGHTS: (pickled_folder / "adapter_model.bin").read_bytes()},
            invalid,
            "is a pickle",
        ),
        "bare pickle": ({**good, WEIGHTS: pickle.dumps({"x": 1})}, invalid, "is a pickle"),
        "shape mismatch": (with_tensor(q_a, torch.randn(8, 48)), unfit, "do not fit"),
        "ranks differ": (with_tensor(q_a, torch.randn(4, 64)), invalid, "do not share a rank"),
        "rank not the config's": (
            with_config(r=4),
            invalid,
            "has rank 8 but adapter_config.json gives it rank 4",
        ),
        "wrong base by name": (other, unfit, "this server runs"),
        "wrong base by shapes": (other_geometry, unfit, "trained on another base model"),
        "bad JSON": ({**good, CONFIG: b'{"r": 8,'}, invalid, "not valid JSON"),
        "JSON not an object": ({**good, CONFIG: b"[8]"}, invalid, "must be a JSON object"),
        "no rank": (with_config(r="8"), invalid, "positive integer r"),
        "DoRA": (with_config(use_dora=True), invalid, "DoRA"),
        "bias": (with_config(bias="all"), invalid, "bias 'all'"),
        "not LoRA": (with_config(peft_type="IA3"), invalid, "not a LoRA adapter"),
        "pattern": (with_config(rank_pattern={"(.+)+x": 8}), invalid, "module names"),
        "integers": (with_tensor(q_a, torch.ones(8, 64, dtype=torch.int32)), invalid, "torch.int32"),
        "NaN": (with_tensor(q_a, torch.full((8, 64), float("nan"))), invalid, "NaN"),
        "infinity in a tensor of another dtype": (
            with_tensor(
                v_b, torch.zeros(64, 8, dtype=torch.float16).index_fill_(0, torch.tensor([63]), -math.inf)
            ),
            invalid,
            f"adapter tensor {v_b!r} holds NaN or infinite values",
        ),
        "empty tensor": (with_tensor(q_a, torch.zeros(0, 64)), invalid, "do not share a rank"),
        "not safetensors": ({**good, WEIGHTS: b"junk" * 8}, invalid, "not a readable safetensors"),
        "too many tensors": (
            {**good, WEIGHTS: save_safetensors({**tensors, **{f"x{i}": torch.zeros(1) for i in range(60)}})},
            unfit,
            "holds 76 tensors; a LoRA of the served model has at most 28",
        ),
        "no weights": ({**good, WEIGHTS: b""}, invalid, "files.adapter_model is required"),
    }
    for case, (files, code, message) in cases.items():
        got_code, details = refused(files)
        assert (got_code, message in details) == (code, True), (case, got_code, details)
    assert code_of(lambda: acme.get_adapter("refused"))[0] == grpc.StatusCode.NOT_FOUND  # nothing published

    # from the uploads folder: a folder holding only the pickle, a missing folder, one over the size bound
    uploads = keys.uploads_prefix("acme", stack.store.settings.uploads_template)
    stack.store.put_bytes(uploads + "pickled/adapter_config.json", good[CONFIG])
    stack.store.put_bytes(
        uploads + "pickled/adapter_model.bin", (pickled_folder / "adapter_model.bin").read_bytes()
    )
    stack.store.put_bytes(uploads + "huge/adapter_config.json", good[CONFIG])
    stack.store.put_bytes(uploads + "huge/adapter_model.safetensors", b"\0" * (2 * 2**20))
    by_uri = {
        "pickled/": (invalid, "holds adapter_model.bin, a pickle"),
        "absent/": (grpc.StatusCode.NOT_FOUND, "has no adapter_config.json"),
        "huge": (invalid, "adapter_model.safetensors at source_uri is over the limit"),
    }
    for folder, (code, message) in by_uri.items():
        got_code, details = code_of(
            lambda folder=folder: acme.import_adapter_uri("refused", stack.store.uri(uploads + folder))
        )
        assert (got_code, message in details) == (code, True), (folder, got_code, details)
    got_code, details = code_of(lambda: acme.import_adapter_uri("refused", stack.store.uri("elsewhere/")))
    assert got_code == grpc.StatusCode.PERMISSION_DENIED and "uploads folder" in details
    no_source = lloco_pb2.ImportAdapterRequest(parent=acme.names.adapter("refused"))
    assert code_of(lambda: acme._call(acme._stub.ImportAdapter, no_source)) == (
        invalid,
        "one of files or source_uri is required",
    )
    # the client never sends a pickle
    with pytest.raises(InvalidArgument, match="adapter_model.bin, a pickle"):
        acme.import_adapter("refused", pickled_folder)


def test_another_tenant_cannot_import_into_or_read_an_adapter(
    stack: EmbeddedStack, acme: LlocoClient, globex: LlocoClient, make_peft: PeftFactory
) -> None:
    files = read_files(make_peft(seed=10)[1])
    import_request(acme, "private", files)
    uploads = keys.uploads_prefix("acme", stack.store.settings.uploads_template) + "private/"
    for name, data in files.items():
        stack.store.put_bytes(uploads + name, data)
    denied = grpc.StatusCode.PERMISSION_DENIED
    into_acme = lloco_pb2.ImportAdapterRequest(parent="tenants/acme/adapters/private", files=inline(files))
    calls = {
        "import into": lambda: globex._call(globex._stub.ImportAdapter, into_acme),
        "import from its uploads": lambda: globex.import_adapter_uri("mine", stack.store.uri(uploads)),
        "get": lambda: globex._call(
            globex._stub.GetAdapter, lloco_pb2.GetAdapterRequest(name="tenants/acme/adapters/private")
        ),
        "versions": lambda: list(globex.list_adapter_versions("tenants/acme/adapters/private")),
        "query with": lambda: globex.query(QUESTION, [], adapter="tenants/acme/adapters/private"),
    }
    for call, run in calls.items():
        assert code_of(run)[0] == denied, call
    assert code_of(lambda: globex.get_adapter("private"))[0] == grpc.StatusCode.NOT_FOUND
    assert [a.name for a in globex.list_adapters()] == []
    assert acme.get_adapter("private").version_count == 1  # globex's attempts changed nothing


def test_cli_imports_a_peft_folder(
    stack: EmbeddedStack, tenant_keys: dict[str, str], make_peft: PeftFactory
) -> None:
    _, folder = make_peft(seed=11)
    options = ["--target", stack.address, "--tenant-key", tenant_keys["acme"]]
    result = CliRunner().invoke(app, ["adapters", "import", str(folder), "--adapter", "cli", *options])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("* tenants/acme/adapters/cli/versions/v000001\trank 8\t")
    result = CliRunner().invoke(app, ["adapters", "import", str(folder), *options])
    assert result.exit_code == 2 and "name the adapter to import into" in result.stderr
    result = CliRunner().invoke(app, ["adapters", "import", str(folder.parent), "--adapter", "cli", *options])
    assert result.exit_code == 1 and result.stderr.startswith("error: NOT_FOUND: ")
    assert "is not a PEFT adapter folder: no adapter_config.json" in result.stderr
