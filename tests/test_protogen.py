import shutil
import subprocess
import sys

from click.testing import CliRunner

from server import protogen


def test_committed_stubs_match_the_proto():
    result = subprocess.run([sys.executable, "-m", "server.protogen", "--check"], capture_output=True, text=True,
                            cwd=protogen.SERVER.parent)
    assert result.returncode == 0, result.stderr


def test_check_fails_on_a_stale_stub(tmp_path, monkeypatch):
    copy = tmp_path / "generated"
    shutil.copytree(protogen.GENERATED, copy, ignore=shutil.ignore_patterns("__pycache__"))
    stub = copy / "safeguard" / "v1" / "safeguard_pb2.py"
    stub.write_text(stub.read_text() + "\n# edited by hand\n")
    monkeypatch.setattr(protogen, "GENERATED", copy)
    result = CliRunner().invoke(protogen.main, ["--check"])
    assert result.exit_code == 1
    assert "safeguard/v1/safeguard_pb2.py: stale" in result.output
    assert "run `python -m server.protogen`" in result.output


def test_generated_service_has_every_rpc():
    from server.generated.safeguard.v1 import safeguard_pb2

    service = safeguard_pb2.DESCRIPTOR.services_by_name["Safeguard"]
    assert {m.name for m in service.methods} == {
        "Classify", "ClassifyStream", "ClassifyBatch", "PutPolicy", "GetPolicy", "ListPolicies", "ActivatePolicy",
        "RollbackPolicy"}
