"""The device half must work where PyTorch is not installed."""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER_MODULES = {"torch", "torchvision", "open_clip", "sglora_edge", "export"}

BLOCK = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ModuleNotFoundError('No module named %r' % name, name=name)  # as if not installed
sys.meta_path.insert(0, Block())
"""


def run_blocked(code: str, blocked=("torch", "torchvision", "open_clip")) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK.format(blocked=set(blocked)) + code],
                          capture_output=True, text=True, cwd=ROOT)


def test_cli_help_without_torch():
    for args in (["--help"], ["build-engines", "--help"], ["bench", "--help"], ["serve", "--help"],
                 ["run", "--help"]):
        r = run_blocked(f"import sys; sys.argv=['sglora-edge', *{args!r}]\nfrom sglora_edge.cli import app\napp()")
        assert r.returncode == 0, r.stderr
        assert "Usage" in r.stdout
    assert "--desc" in r.stdout and "--bundle" in r.stdout


TORCH_FREE_COMMANDS = {"world", "data check", "data convert", "run", "serve", "build-engines", "bench",
                       "quantize"}
LIBRARY_FIRST = {"explain"}  # reads the library (numpy + safetensors) before it needs the train extra
DRIVE_EVERY_COMMAND = """
import json, sys
import typer
from typer.testing import CliRunner
from sglora_edge.cli import app
dummy = sys.argv[1]  # an existing file: passes every "is a file" check, so the command reaches its imports


def leaves(cmd, path):
    if hasattr(cmd, 'commands'):  # a group
        for name, sub in cmd.commands.items():
            yield from leaves(sub, path + [name])
    else:
        yield path, cmd


results = {}
for path, cmd in leaves(typer.main.get_command(app), []):
    args = list(path)
    for p in cmd.params:
        if p.required:
            args += ([p.opts[0]] if p.param_type_name == 'option' else []) + [dummy]
    r = CliRunner().invoke(app, args)
    results[" ".join(path)] = [r.exit_code, r.output, type(r.exception).__name__]
print(json.dumps(results))
"""


def test_server_commands_without_torch_name_the_extra(tmp_path):
    dummy = tmp_path / "f"
    dummy.write_text("x")
    r = subprocess.run([sys.executable, "-c", BLOCK.format(blocked={"torch", "torchvision", "open_clip"})
                        + DRIVE_EVERY_COMMAND, str(dummy)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert {"train-experts", "eval zeroshot", "export", "reproduce", "generate"} <= set(results)
    for command, (code, output, exception) in results.items():
        assert exception == "SystemExit" and "Traceback" not in output, (command, output)
        if command in TORCH_FREE_COMMANDS:
            assert "sglora-edge[train]" not in output, (command, output)
        elif command in LIBRARY_FIRST:  # the dummy is no library: that is said first, in one line
            assert code == 2 and len(output.splitlines()) == 1, (command, output)
            assert output.startswith(f"error: {dummy}: not a safetensors file"), (command, output)
        else:
            assert code == 2 and len(output.splitlines()) == 1, (command, output)
            assert output.startswith("error: No module named '") and output.rstrip().endswith(
                "this command needs the server side's train extra; install it with pip install 'sglora-edge[train]'")


def test_runtime_never_imports_server_modules():
    for path in (ROOT / "runtime").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                assert name.split(".")[0] not in SERVER_MODULES, f"{path}: imports {name}"


def test_runtime_imports_with_server_modules_blocked():
    modules = sorted(p.stem for p in (ROOT / "runtime").glob("*.py") if p.stem != "__init__")
    code = "import importlib\n" + "".join(f"importlib.import_module('runtime.{m}')\n" for m in modules)
    r = run_blocked(code, blocked=SERVER_MODULES)
    assert r.returncode == 0, r.stderr


def test_missing_engine_names_the_extra():
    r = run_blocked("from runtime.engine import require\nrequire('onnxruntime')", blocked={"onnxruntime"})
    assert r.returncode != 0
    assert "sglora-edge[cpu]" in r.stderr and "sglora-edge[gpu]" in r.stderr


def test_device_commands_run_without_torch(tmp_path):
    """build-engines, run and serve import and fail cleanly (one line, exit 2) with torch, open_clip and export
    blocked."""
    missing = tmp_path / "nowhere"
    for args in (["build-engines", "--bundle", str(missing)],
                 ["run", "--bundle", str(missing), "--desc", "a cat", "--gallery", str(tmp_path)],
                 ["serve", "--bundle", str(missing), "--gallery", str(tmp_path), "--port", "0"]):
        r = run_blocked(f"import sys; sys.argv=['sglora-edge', *{args!r}]\nfrom sglora_edge.cli import app\napp()",
                        blocked=("torch", "torchvision", "open_clip", "export"))
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and "no bundle there" in r.stderr and "Traceback" not in r.stderr
    r = run_blocked("import runtime.tensorrt, runtime.commands, runtime.serve\nprint('ok')", blocked=SERVER_MODULES)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_serve_without_its_extra_names_it(tmp_path):
    args = ["serve", "--bundle", str(tmp_path), "--gallery", str(tmp_path), "--port", "0"]
    r = run_blocked(f"import sys; sys.argv=['sglora-edge', *{args!r}]\nfrom sglora_edge.cli import app\napp()",
                    blocked=("torch", "torchvision", "open_clip", "export", "fastapi"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "serve needs fastapi" in r.stderr and "pip install 'sglora-edge[serve]'" in r.stderr
