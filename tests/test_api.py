"""The public API: generated code is fresh, the proto passes `buf lint`, every RPC documents its errors."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[1]
PROTO = "lloco/v1/lloco.proto"
GENERATED = ("lloco_pb2.py", "lloco_pb2.pyi", "lloco_pb2_grpc.py")
# The first published v1 API; later changes must be backward compatible (`buf breaking`).
V1_BASELINE_COMMIT = "34ce756977c3372e1d1086552f6ead49611d5f2f"
SERVICE_PATH = 6  # FileDescriptorProto.service
METHOD_PATH = 2  # ServiceDescriptorProto.method


@pytest.fixture(scope="module")
def proto_file(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorProto:
    """The compiled proto with its comments (source info)."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("descriptor") / "lloco.pb"
    argv = [
        "protoc",
        f"-I{ROOT / 'protos'}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        "--include_source_info",
        f"--descriptor_set_out={out}",
        PROTO,
    ]
    assert protoc.main(argv) == 0
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (proto,) = files.file
    return proto


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "gen-api"), str(tmp_path)],
        check=True,
        env={"PATH": "/usr/bin:/bin", "LLOCO_PYTHON": sys.executable},
    )
    for name in GENERATED:
        committed = (ROOT / "platform" / "lloco" / "api" / name).read_bytes()
        assert (tmp_path / name).read_bytes() == committed, f"{name} is stale: run scripts/gen-api"


def test_buf_lint_is_clean() -> None:
    buf = Path(sys.executable).parent / "buf"
    result = subprocess.run([str(buf), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_no_breaking_change_since_v1() -> None:
    if subprocess.run(["git", "cat-file", "-e", V1_BASELINE_COMMIT], cwd=ROOT).returncode != 0:
        pytest.skip(f"baseline commit {V1_BASELINE_COMMIT[:8]} is not in this clone (shallow?)")
    buf = Path(sys.executable).parent / "buf"
    against = f".git#ref={V1_BASELINE_COMMIT}"
    result = subprocess.run(
        [str(buf), "breaking", "--against", against], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_reports_a_violation(tmp_path: Path) -> None:
    """The lint config really checks: an unprefixed enum value and an undocumented RPC are reported."""
    text = (ROOT / "protos" / PROTO).read_text()
    text = text.replace("CONTEXT_STATE_PENDING", "PENDING")
    text = text.replace("  // Returns one document's metadata (not its text).\n", "")
    text = text.replace(
        "  // Errors: NOT_FOUND (no such document), INVALID_ARGUMENT (malformed name),\n"
        "  // PERMISSION_DENIED, UNAUTHENTICATED, UNAVAILABLE.\n"
        "  rpc GetDocument",
        "  rpc GetDocument",
    )
    (tmp_path / "protos" / "lloco" / "v1").mkdir(parents=True)
    (tmp_path / "protos" / PROTO).write_text(text)
    (tmp_path / "buf.yaml").write_bytes((ROOT / "buf.yaml").read_bytes())
    buf = Path(sys.executable).parent / "buf"
    result = subprocess.run([str(buf), "lint"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert 'prefixed with "CONTEXT_STATE_"' in result.stdout
    assert 'RPC "GetDocument" should have a non-empty comment' in result.stdout


def test_every_rpc_documents_its_errors(proto_file: descriptor_pb2.FileDescriptorProto) -> None:
    comments = {tuple(loc.path): loc.leading_comments for loc in proto_file.source_code_info.location}
    (service,) = proto_file.service
    assert len(service.method) >= 17
    for index, method in enumerate(service.method):
        comment = comments.get((SERVICE_PATH, 0, METHOD_PATH, index), "")
        assert comment.strip(), f"{method.name} has no comment"
        assert "Errors:" in comment, f"{method.name} does not document its error codes"


def test_every_list_paginates(proto_file: descriptor_pb2.FileDescriptorProto) -> None:
    messages = {message.name: message for message in proto_file.message_type}
    (service,) = proto_file.service
    lists = [method for method in service.method if method.name.startswith("List")]
    assert {m.name for m in lists} >= {"ListDocuments", "ListAdapters", "ListAdapterVersions", "ListDatasets"}
    for method in lists:
        request = {f.name for f in messages[method.input_type.rsplit(".", 1)[1]].field}
        response = {f.name for f in messages[method.output_type.rsplit(".", 1)[1]].field}
        assert {"parent", "page_size", "page_token"} <= request, method.name
        assert "next_page_token" in response, method.name


def test_generated_modules_import_from_the_package() -> None:
    from lloco.api import lloco_pb2, lloco_pb2_grpc

    assert callable(lloco_pb2_grpc.add_LlocoServiceServicer_to_server)
    request = lloco_pb2.QueryRequest(
        tenant="tenants/acme", question="why?", documents=["tenants/acme/documents/a"]
    )
    # Ray pickles requests between processes: the class must be found again under lloco.api.
    assert type(request).__module__ == "lloco.api.lloco_pb2"
    assert pickle.loads(pickle.dumps(request)) == request
