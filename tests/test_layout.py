"""Arrows point one way: which module of textgen may import which, read from the source itself."""
import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "textgen")


def imports_of(module: str) -> dict[str, set[str]]:
    """{our module imported: the functions it is imported in ("" for the top level)}."""
    tree = ast.parse(open(os.path.join(PACKAGE, module + ".py"), encoding="utf-8").read())
    found: dict[str, set[str]] = {}

    def visit(node, function=""):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                names = [child.module] if child.module else [alias.name for alias in child.names]
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(function)
            elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith("textgen"):
                found.setdefault((child.module.split(".") + [""])[1] or "__init__", set()).add(function)
            visit(child, inner)
    visit(tree)
    return found


MODULES = sorted(name[:-3] for name in os.listdir(PACKAGE) if name.endswith(".py"))


def test_the_model_and_its_fast_path_import_nothing_else_of_ours():
    assert set(imports_of("model")) == {"fused_lstm", "settings"}      # settings: how a field is declared
    assert set(imports_of("fused_lstm")) == {"native_kernel"}
    assert set(imports_of("native_kernel")) == {"machine"}
    assert set(imports_of("tokenizer")) == set() and set(imports_of("machine")) == set()
    assert set(imports_of("settings")) == {"errors"} and set(imports_of("errors")) == set()
    assert set(imports_of("files")) == {"errors"}                       # the one writer: a leaf
    assert [m for m in MODULES if "fused_lstm" in imports_of(m)] == ["model"]          # only the model
    assert [m for m in MODULES if "native_kernel" in imports_of(m)] == ["fused_lstm"]


def test_nothing_in_the_package_imports_cli_but_the_entry_point():
    assert [m for m in MODULES if "cli" in imports_of(m)] == ["__main__"]


def test_inference_never_imports_training():
    for module in ("sampling", "evaluate", "checkpoint", "devices", "plot", "run_folder", "data", "corpus",
                   "schedule", "rng", "errors", "model", "batching", "server", "sizing"):
        assert "training" not in imports_of(module), module
    assert imports_of("api").get("training") == {"train"}     # only textgen.train() needs it
    assert "model" not in imports_of("data") and "training" not in imports_of("checkpoint")


def test_cli_chooses_a_device_without_the_training_module_for_generation_and_evaluation():
    uses = imports_of("cli")
    assert uses["training"] <= {"train_parser", "_train", "_train_here"} and "devices" in uses


def test_sizing_knows_only_the_model():
    assert set(imports_of("sizing")) == {"model"}
    assert [m for m in MODULES if "sizing" in imports_of(m)] == ["training"]


def test_serving_knows_the_model_and_sampling_and_never_the_server_below_it():
    assert set(imports_of("batching")) == {"errors", "model", "sampling", "tokenizer"}
    server = imports_of("server")
    assert set(server) == {"batching", "checkpoint", "errors", "evaluate", "run_folder", "sampling", "settings",
                           "http_server"}
    assert server["http_server"] == {"serve"}        # the [serve] extra is needed only to serve
    assert set(imports_of("http_app")) == {"batching", "errors", "openai_api", "server"}
    assert set(imports_of("openai_api")) == {"batching", "errors", "sampling", "server", "tokenizer"}
    assert [m for m in MODULES if "openai_api" in imports_of(m)] == ["http_app"]     # the protocol, not the app
    assert set(imports_of("http_server")) == {"http_app", "server"}
    assert [m for m in MODULES if "http_server" in imports_of(m)] == ["server"]
    assert [m for m in MODULES if "http_app" in imports_of(m)] == ["http_server"]
    assert imports_of("cli")["server"] == {"serve_parser", "_serve"}


def test_one_module_owns_the_run_folders_layout():
    """run_folder knows the names, the root and how to find a run; checkpoint asks it and it never asks back."""
    uses = imports_of("run_folder")
    assert set(uses) == {"errors", "files", "plot"} and uses["plot"] == {"plot"}    # a run draws its own loss.png
    assert "run_folder" in imports_of("checkpoint") and "run_folder" in imports_of("server")
    for module in MODULES:
        source = open(os.path.join(PACKAGE, module + ".py"), encoding="utf-8").read()
        if module != "run_folder":
            assert '"latest.pt"' not in source and '"checkpoints"' not in source, module


def test_only_the_command_line_starts_ranks():
    """launch.py (train.py --workers) needs nothing of ours but errors, and only cli uses it."""
    assert set(imports_of("launch")) == {"errors"}
    assert [m for m in MODULES if "launch" in imports_of(m)] == ["cli"]


def test_the_match_model_serves_evaluation_only():
    """match.py needs nothing of ours, and only evaluation mixes it in: sampling draws from the LSTM alone."""
    assert set(imports_of("match")) == set()
    assert [m for m in MODULES if "match" in imports_of(m)] == ["evaluate"]


def test_the_version_and_the_top_level_help_do_not_import_torch():
    """`textgen --version` and `textgen --help` answer at once: the package's names load on first use."""
    import subprocess
    import sys
    code = ("import sys, textgen.cli\n"
            "for argv in (['--version'], ['--help']):\n"
            "    textgen.cli.textgen_main(argv)\n"
            "import textgen\n"
            "assert textgen.__version__\n"
            "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "False", (done.stdout, done.stderr)
