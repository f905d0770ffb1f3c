"""Generate the Python stubs of `safeguard.v1` from its proto, or check that the committed ones are current.

    python -m server.protogen          # regenerate server/generated/
    python -m server.protogen --check  # exit 1 when server/generated/ differs from what the proto gives

grpcio-tools 1.81 is pinned because it emits protobuf-6 code, which tritonclient's protobuf<7 requires. protoc
writes absolute imports (`from safeguard.v1 import ...`); they are rewritten to package imports so the stubs load
as `server.generated.safeguard.v1`.
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import click

SERVER = Path(__file__).resolve().parent
PROTO_ROOT = SERVER / "proto"
GENERATED = SERVER / "generated"
PROTOS = ("safeguard/v1/safeguard.proto",)


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    for proto in PROTOS:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                f"--grpc_python_out={out}", str(PROTO_ROOT / proto)]
        if protoc.main(args) != 0:
            raise click.ClickException(f"protoc failed on {proto}")
    for path in out.rglob("*.py*"):
        text = path.read_text()
        path.write_text(text.replace("from safeguard.v1 import", "from server.generated.safeguard.v1 import"))
    for directory in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    return sorted(p for p in out.rglob("*") if p.is_file())


def _differences(expected: Path, actual: Path) -> list[str]:
    ours = {p.relative_to(expected) for p in expected.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    theirs = {p.relative_to(actual) for p in actual.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    problems = [f"missing: {p}" for p in sorted(ours - theirs)] + [f"extra: {p}" for p in sorted(theirs - ours)]
    problems += [f"stale: {p}" for p in sorted(ours & theirs) if not filecmp.cmp(expected / p, actual / p, False)]
    return problems


@click.command()
@click.option("--check", is_flag=True, help="Only compare; exit 1 when the committed stubs are stale.")
def main(check: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "generated"
        generate(fresh)
        problems = _differences(fresh, GENERATED)
        if check:
            for problem in problems:
                click.echo(f"server/generated/{problem[problem.index(' ') + 1:]}: {problem.split(':')[0]}", err=True)
            if problems:
                click.echo("stubs are stale: run `python -m server.protogen`", err=True)
                sys.exit(1)
            click.echo("stubs are current")
            return
        shutil.rmtree(GENERATED, ignore_errors=True)
        shutil.copytree(fresh, GENERATED)
        click.echo(f"wrote {len(list(GENERATED.rglob('*.py*')))} files to {GENERATED}")


if __name__ == "__main__":
    main()
