"""Arrows point one way: which layer of textgen may import which, read from the source itself.

A unit is a flat module (textgen/errors.py) or a layer's folder (textgen/lstm/, training/, generation/,
serving/, cli/, export/), whose files' imports count together; imports between the files of one folder
are its own business, and within_imports reads those."""
import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "textgen")


def _files_of(unit: str) -> list[tuple[list[str], str]]:
    """(the package path of each file, its path) of one of our modules, or of every file of a subpackage."""
    folder = os.path.join(PACKAGE, unit)
    if os.path.isdir(folder):
        return [(["textgen", unit], os.path.join(folder, name)) for name in sorted(os.listdir(folder))
                if name.endswith(".py")]
    return [(["textgen"], os.path.join(PACKAGE, unit + ".py"))]


def imports_of(unit: str) -> dict[str, set[str]]:
    """{our module or subpackage imported: the functions it is imported in ("" for the top level)}, for a
    module or a whole subpackage (imports between a subpackage's own files are its own business)."""
    found: dict[str, set[str]] = {}
    for package, path in _files_of(unit):
        tree = ast.parse(open(path, encoding="utf-8").read())

        def visit(node, function=""):
            for child in ast.iter_child_nodes(node):
                inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
                if isinstance(child, ast.ImportFrom):
                    if child.level:
                        base = package[:len(package) - child.level + 1]
                    elif (child.module or "").startswith("textgen"):
                        base = []
                    else:
                        base = None
                    if base is not None:
                        target = base + (child.module.split(".") if child.module else [])
                        names = [target[1]] if len(target) > 1 else [alias.name for alias in child.names]
                        for name in names:
                            if name != unit and name in UNITS:
                                found.setdefault(name, set()).add(function)
                visit(child, inner)
        visit(tree)
    return found


UNITS = MODULES = sorted(name[:-3] if name.endswith(".py") else name for name in os.listdir(PACKAGE)
                 if name.endswith(".py") or os.path.isfile(os.path.join(PACKAGE, name, "__init__.py")))


def within_imports(folder: str, module: str) -> set[str]:
    """The files of the same folder that folder/module.py imports."""
    tree = ast.parse(open(os.path.join(PACKAGE, folder, module + ".py"), encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
    return found


# Each unit imports only units of lower layers: arrows point one way, and there are no cycles.
LAYERS = [
    {"errors", "machine", "tokenizer", "rng"},                   # leaves: nothing of ours
    {"settings", "files"},                                       # how a setting is declared; the one writer
    {"lstm", "run_folder", "data", "devices", "match"},          # the model; the run folder's layout; ...
    {"checkpoint", "corpus", "plot"},
    {"styles", "copy_index"},                                    # a style per file; the training text's index
    {"evaluate"},                                                # reading a text through a model
    {"generation"},                                              # sampling (priming adapts as evaluation does)
    {"training", "serving", "export"},
    {"api"},
    {"cli"},
    {"__main__"},
]


def test_every_unit_has_a_layer_and_imports_only_lower_layers():
    assert sorted(set().union(*LAYERS) | {"__init__"}) == MODULES
    rank = {unit: k for k, layer in enumerate(LAYERS) for unit in layer}
    for unit in MODULES:
        for used in imports_of(unit):
            assert used == "__init__" or rank[used] < rank[unit], f"{unit} imports {used}"


def test_the_model_and_its_fast_path_import_nothing_else_of_ours():
    assert set(imports_of("lstm")) == {"settings", "files", "machine"}   # files: the kernel's private cache
    assert within_imports("lstm", "config") == set()                            # ModelConfig: settings alone
    assert within_imports("lstm", "model") == {"config", "fused_lstm", "heads"}   # the reference cell, the fast layer
    assert within_imports("lstm", "heads") == {"products"}                     # its low-precision product
    assert within_imports("lstm", "stepper") == {"products", "steps", "heads", "model", "rows_step"}
    assert within_imports("lstm", "fused_lstm") == {"buffers", "native_kernel", "products", "steps"}
    assert within_imports("lstm", "buffers") == set()
    assert within_imports("lstm", "products") == {"native_kernel"}
    assert within_imports("lstm", "steps") == {"native_kernel"}
    assert within_imports("lstm", "rows_step") == {"native_kernel"}
    assert within_imports("lstm", "native_kernel") == {"kernel_build"}
    assert within_imports("lstm", "kernel_build") == set()
    assert within_imports("lstm", "__init__") == {"config", "model", "native_kernel", "steps", "heads", "stepper",
                                                  "rows_step", "buffers"}
    for unit in MODULES:                         # the rest see the LSTM's face (lstm/__init__), not its fast path
        if unit != "lstm":
            for package, path in _files_of(unit):
                for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                    if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("textgen")):
                        base = package[:len(package) - node.level + 1] if node.level else []
                        target = ".".join(base + (node.module.split(".") if node.module else []))
                        names = {target + "." + alias.name for alias in node.names} | {target}
                        assert not {"textgen.lstm.fused_lstm", "textgen.lstm.native_kernel", "textgen.lstm.products",
                                    "textgen.lstm.steps", "textgen.lstm.rows_step", "textgen.lstm.kernel_build",
                                    "textgen.lstm.buffers"} & names, path


def test_nothing_in_the_package_imports_cli_but_the_entry_point():
    assert [m for m in MODULES if "cli" in imports_of(m)] == ["__main__"]


def test_inference_never_imports_training():
    for unit in ("generation", "evaluate", "checkpoint", "devices", "plot", "run_folder", "data", "corpus",
                 "rng", "errors", "lstm", "serving", "export"):
        assert "training" not in imports_of(unit), unit
    assert imports_of("api").get("training") == {"train"}     # only textgen.train() needs it


def test_cli_chooses_a_device_without_the_training_package_for_generation_and_evaluation():
    assert within_imports("cli", "generate").isdisjoint({"train"}) and within_imports("cli", "tools") == {"common"}
    uses = imports_of("cli")
    assert uses["training"] <= {"train_parser", "_train", "_train_here", "_workers", "say_error"}
    assert "devices" in uses


def test_inside_training_sizing_knows_only_the_model_and_launch_only_errors():
    for module, allowed in (("sizing", set()), ("launch", set()), ("schedule", set()), ("distributed", set())):
        assert within_imports("training", module) == allowed, module
    assert within_imports("training", "loop") == {"reporter", "state", "step", "schedule"}


def test_serving_knows_generation_and_never_the_http_stack_below_it_except_to_serve():
    assert set(imports_of("serving")) == {"generation", "checkpoint", "errors", "evaluate", "run_folder",
                                          "settings", "copy_index", "tokenizer"}
    assert within_imports("serving", "server") >= {"http_server"}
    assert within_imports("serving", "http_app") == {"openai_api", "server"}
    assert within_imports("serving", "openai_api") == {"server"}        # the protocol: parsing and shapes, no app
    assert within_imports("serving", "http_server") == {"http_app", "server"}
    assert set(imports_of("generation")) == {"copy_index", "errors", "evaluate", "lstm", "settings", "styles", "tokenizer"}


def test_one_module_owns_the_run_folders_layout():
    """run_folder knows the names, the root and how to find a run; checkpoint asks it and it never asks back."""
    assert set(imports_of("run_folder")) == {"errors", "files"}
    assert set(imports_of("plot")) == {"errors", "files", "run_folder"}        # it reads metrics through run_folder
    assert "run_folder" in imports_of("checkpoint") and "run_folder" in imports_of("serving")
    for module in MODULES:
        for _, path in _files_of(module):
            source = open(path, encoding="utf-8").read()
            if module != "run_folder":
                assert '"latest.pt"' not in source and '"checkpoints"' not in source, path


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


def test_the_copy_index_reads_the_corpus_and_knows_no_model():
    """copy_index.py: the training text's suffix array, from the token cache; sampling's loop asks it
    (inside Decoding, for --max-copy), and priming reuses evaluation's adapting."""
    assert set(imports_of("copy_index")) == {"corpus", "errors", "files", "tokenizer"}
    assert within_imports("generation", "priming") == {"generator", "sampling"}
    assert within_imports("generation", "generator") == {"sampling"}         # one prompt over the one loop
    assert within_imports("generation", "sampling") == set()
