"""One error root: every project error is an SGLoRAError, and the CLI turns it into one line and exit 2."""

import importlib
import inspect
import pkgutil

from typer.testing import CliRunner

import export
import runtime
import sglora_edge
from runtime.errors import SGLoRAError
from sglora_edge.cli import app


def project_modules():
    for package in (sglora_edge, export, runtime):
        yield package
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            yield importlib.import_module(info.name)


def test_every_project_error_subclasses_the_root():
    errors = {obj for module in project_modules() for _, obj in inspect.getmembers(module, inspect.isclass)
              if issubclass(obj, BaseException) and obj.__module__.split(".")[0] in ("sglora_edge", "export", "runtime")}
    assert {e.__name__ for e in errors} >= {"ArtifactError", "BackboneError", "DatasetError", "ConvertError",
                                            "BundleError", "BundleExportError", "ExportError", "EngineUnavailable"}
    assert [e.__name__ for e in errors if not issubclass(e, SGLoRAError)] == []
    assert importlib.import_module("sglora_edge.errors").SGLoRAError is SGLoRAError  # one class, not two


def test_cli_prints_one_line_and_exits_2(tmp_path):
    r = CliRunner().invoke(app, ["eval", "zeroshot", "--data", str(tmp_path), "--backbone",
                                 "open_clip:sglora-micro@random"])  # a sub-command: caught by the root group too
    assert r.exit_code == 2 and r.output.startswith("error: ") and "manifest.jsonl: not found" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(app, ["world", "--out", str(tmp_path / "w"), "--preset", "nope"])
    assert r.exit_code == 2 and r.output.strip().splitlines() == ["error: unknown preset 'nope'; choose one of "
                                                                  "['default', 'micro']"]
