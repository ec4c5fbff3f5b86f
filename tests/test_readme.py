"""The documentation is executable: the python blocks of README.md, docs/objectives.md and checkpoints/README.md run, their API and CLI claims hold, and every documented command parses."""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import l2l
from l2l.cli import build_parser
from l2l.config import TrainConfig
from l2l.tasks import get_task, list_tasks

ROOT = Path(__file__).resolve().parents[1]
PYTHON_DOCS = ("README.md", "docs/objectives.md")  # their prose names the API with signatures
BLOCK_DOCS = (*PYTHON_DOCS, "checkpoints/README.md")  # whose ```python blocks run
COMMAND_DOCS = ("README.md", "docs/objectives.md", "checkpoints/README.md")


@dataclass(frozen=True)
class Fence:
    """A fenced code block: its file, the heading it sits under, its language and text."""

    doc: str
    heading: str
    language: str
    code: str
    line: int

    @property
    def id(self) -> str:
        return f"{self.doc}: {self.heading}"


def headings(doc: str) -> list[str]:
    """The heading each line of ``doc`` (a path relative to the repository) sits under, line 1 first."""
    current, in_fence, found = "(top)", False, []
    for line in (ROOT / doc).read_text().splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif line.startswith("#") and not in_fence:
            current = line.lstrip("#").strip()
        found.append(current)
    assert not in_fence, f"{doc}: a code fence is never closed"
    return found


def fences(doc: str) -> list[Fence]:
    """Every fenced block of ``doc``, with its section heading."""
    found, block, language, start = [], None, "", 0
    under = headings(doc)
    for number, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
        if line.startswith("```"):
            if block is None:
                block, language, start = [], line[3:].strip(), number
            else:
                found.append(Fence(doc, under[start - 1], language, "\n".join(block) + "\n", start))
                block = None
        elif block is not None:
            block.append(line)
    return found


def section(doc: str, heading: str) -> str:
    """The text of ``doc`` from the heading ``heading`` to the next heading of the same or a higher level."""
    lines = (ROOT / doc).read_text().splitlines()
    for index, line in enumerate(lines):
        if line.startswith("#") and line.lstrip("#").strip() == heading:
            level = len(line) - len(line.lstrip("#"))
            end = next(
                (j for j in range(index + 1, len(lines))
                 if lines[j].startswith("#") and len(lines[j]) - len(lines[j].lstrip("#")) <= level and not _in_fence(lines, j)),
                len(lines),
            )
            return "\n".join(lines[index + 1 : end])
    raise AssertionError(f"{doc} has no section {heading!r}")


def _in_fence(lines: list[str], index: int) -> bool:
    return sum(line.startswith("```") for line in lines[:index]) % 2 == 1


# ------------------------------------------------------------------------------------------------
# The ```python blocks run.

# What a block takes from the prose around it (a model, data), defined here; keyed by block id.
PRELUDES = {
    "README.md: Tasks and datasets": """
import torch
x_train, y_train = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
x_test, y_test = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
""",
    "README.md: Training any model with a learned optimizer": """
import torch
from torch import nn
import l2l
model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 3))
loader = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(3)]
loss_fn = nn.functional.cross_entropy
initial = [p.detach().clone() for p in model.parameters()]
""",
    "docs/objectives.md: Design": """
import torch
from torch import nn
from l2l.tasks import SupervisedData
x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
def factory():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.Tanh(), nn.Linear(16, 10))
data = lambda device: SupervisedData(x.to(device), y.to(device), x.to(device), y.to(device))
""",
}

# Slow calls made fast by textual substitutions, each of which must still find its text in the block
# (so a changed README fails here rather than running something else); OUT_DIR is a tmp_path.
SHRINK = {
    "README.md: Python API": [
        ("epochs=200", "epochs=1, instances=2, optimizee_steps=4, unroll=2, val_problems=2"),
        ('out_dir="runs/q"', "out_dir=OUT_DIR"),
    ],
}


def _check_python_api(ns: dict) -> None:
    # The shapes and types the block's comments promise.
    assert isinstance(ns["family"], l2l.TaskFamily)
    assert ns["task"].init_params().shape == (128, 10)
    assert ns["losses"].shape == (101, 128) and torch.isfinite(ns["losses"]).all()
    assert ns["update"].shape == (10,)
    assert isinstance(ns["result"], l2l.meta.TrainResult) and ns["result"].use_checkpoint.is_file()


def _check_module_family(ns: dict) -> None:
    task = ns["family"].sample(2, torch.Generator().manual_seed(0))
    batch = task.sample_batch(torch.Generator().manual_seed(1))
    assert batch.inputs.shape == (2, 64, 1, 28, 28) and task.loss(task.init_params(), batch).shape == (2,)


def _check_learned_optimizer(ns: dict) -> None:
    parameters = list(ns["model"].parameters())
    assert all(torch.isfinite(p).all() and not torch.equal(p, p0) for p, p0 in zip(parameters, ns["initial"]))


def _check_objectives(ns: dict) -> None:
    assert ns["loss"].dim() == 0 and all(p.grad is not None for p in ns["model"].parameters())
    task = ns["family"].sample(2, torch.Generator().manual_seed(0))
    losses = task.loss(task.init_params(), task.sample_batch(torch.Generator().manual_seed(1)))
    assert losses.shape == (2,) and torch.isfinite(losses).all()


def _check_shipped_metadata(ns: dict) -> None:
    # "Each file's metadata records the task, optimizee steps, validation score, best epoch, the whole
    # training config and the l2l and torch versions".
    for name in l2l.shipped_checkpoints():
        metadata = l2l.load_use_checkpoint(name).metadata
        assert {"task", "optimizee_steps", "validation_score", "best_epoch", "train_config", "versions"} <= set(metadata), name
        assert set(metadata["versions"]) >= {"l2l", "torch"} and metadata["train_config"]["task"] == metadata["task"], name


CHECKS = {
    "checkpoints/README.md: Shipped learned optimizers": _check_shipped_metadata,
    "README.md: Python API": _check_python_api,
    "README.md: Tasks and datasets": _check_module_family,
    "README.md: Training any model with a learned optimizer": _check_learned_optimizer,
    "docs/objectives.md: Design": _check_objectives,
}

PYTHON_BLOCKS = [fence for doc in BLOCK_DOCS for fence in fences(doc) if fence.language == "python"]


def test_the_documented_python_blocks_are_found():
    # One block per section: the preludes and checks above are keyed by section.
    ids = [fence.id for fence in PYTHON_BLOCKS]
    assert len(ids) == len(set(ids)), f"two python blocks under one heading: {ids}"
    assert set(PRELUDES) | set(SHRINK) | set(CHECKS) <= set(ids), "a prelude, substitution or check names a block that is gone"


@pytest.mark.parametrize("fence", PYTHON_BLOCKS, ids=[fence.id for fence in PYTHON_BLOCKS])
def test_python_block_runs(fence, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a block writes stays out of the repository
    code = fence.code
    for old, new in SHRINK.get(fence.id, ()):
        assert code.count(old) == 1, f"{fence.id}: the block no longer holds {old!r}; update SHRINK in this test"
        code = code.replace(old, new)
    namespace = {"__name__": "readme_block", "OUT_DIR": str(tmp_path / "out")}
    exec(compile(PRELUDES.get(fence.id, ""), f"<prelude of {fence.id}>", "exec"), namespace)
    # Compiled under the document's name and line, so a traceback points at the README line.
    exec(compile("\n" * fence.line + code, str(ROOT / fence.doc), "exec"), namespace)
    if fence.id in CHECKS:
        CHECKS[fence.id](namespace)


# ------------------------------------------------------------------------------------------------
# API names and signatures named in the prose exist as written.

API_MODULES = ("l2l", "l2l.optimizers", "l2l.tasks", "l2l.meta", "l2l.data", "l2l.kernels", "l2l.objectives")
# Code spans in those passages that are not names of the library's API.
NOT_API = {"nn.Module", "preprocess_p", "exp(p)"}
_CODE_SPAN = re.compile(r"`([A-Za-z_][\w.]*)(?:\(([^`]*)\))?`")


def _resolve(name: str):
    """The object ``name`` names: a dotted ``l2l.`` path, or a name exported by one of API_MODULES; None if none."""
    if name.startswith("l2l.") or name == "l2l":
        parts = name.split(".")
        for split in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            for attribute in parts[split:]:
                obj = getattr(obj, attribute, None)
            return obj
        return None
    for module in map(importlib.import_module, API_MODULES):
        head, *rest = name.split(".")
        obj = getattr(module, head) if head in module.__all__ else None  # exported names, not imports
        for attribute in rest:
            obj = getattr(obj, attribute, None)
        if obj is not None:
            return obj
    return None


NO_DEFAULT = object()


def _documented_parameters(args: str) -> list[tuple[str, object]]:
    """``"a, b=2, *, c=x"`` -> ``[("a", NO_DEFAULT), ("b", 2), ("c", "x")]``; ``seed=`` has an unstated default."""
    text = re.sub(r"=(\s*(,|$))", r"=...\1", args)
    definition = ast.parse(f"def f({text}): pass").body[0].args
    positional = definition.posonlyargs + definition.args
    defaults = [NO_DEFAULT] * (len(positional) - len(definition.defaults)) + list(definition.defaults)
    pairs = list(zip(positional, defaults)) + list(zip(definition.kwonlyargs, definition.kw_defaults))
    return [(arg.arg, NO_DEFAULT if default is None else default) for arg, default in pairs]


def _check_signature(name: str, obj, args: str) -> list[str]:
    """What differs between the documented call ``name(args)`` and ``obj``'s signature."""
    if args.strip() in ("", "..."):
        return []
    signature = inspect.signature(obj)
    parameters = signature.parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    problems = []
    documented = _documented_parameters(args)
    for arg, default in documented:
        if arg not in parameters:
            if not takes_any:
                problems.append(f"`{name}({args})`: no parameter {arg!r} (it has {', '.join(parameters)})")
            continue
        actual = parameters[arg].default
        if default is NO_DEFAULT or (isinstance(default, ast.Constant) and default.value is Ellipsis):
            continue
        if isinstance(default, ast.Name):  # a function named as the default
            if getattr(actual, "__name__", None) != default.id:
                problems.append(f"`{name}({args})`: {arg} defaults to {actual!r}, not {default.id}")
        elif actual != ast.literal_eval(default):
            problems.append(f"`{name}({args})`: {arg} defaults to {actual!r}, not {ast.unparse(default)}")
    required = [p.name for p in parameters.values() if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    missing = [arg for arg in required if arg not in {arg for arg, _ in documented} and arg != "self"]
    if missing:
        problems.append(f"`{name}({args})`: leaves out the required {', '.join(missing)}")
    return problems


def _api_problems(text: str, *, all_names: bool) -> list[str]:
    """Unknown names and wrong signatures among ``text``'s code spans (only ``l2l.`` ones unless ``all_names``)."""
    problems = []
    for match in _CODE_SPAN.finditer(text):
        name, args = match.group(1), match.group(2)
        if match.group(0).strip("`") in NOT_API or name in NOT_API or not (all_names or name.startswith("l2l.")):
            continue
        obj = _resolve(name)
        if obj is None:
            problems.append(f"`{name}` is not in {', '.join(API_MODULES)}")
        elif args is not None and callable(obj):
            problems.extend(_check_signature(name, obj, args))
    return problems


def test_the_python_api_section_names_only_what_exists_with_its_signatures():
    assert _api_problems(section("README.md", "Python API"), all_names=True) == []


def test_the_objectives_table_gives_the_functions_signatures():
    text = section("docs/objectives.md", "Gradient-level objectives: `l2l.objectives` (issue 6)").split("\n## ")[0]
    functions = [line.split("|")[2] for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(functions) == 5 and _api_problems("\n".join(functions), all_names=True) == []


@pytest.mark.parametrize("doc", PYTHON_DOCS)
def test_every_l2l_call_in_the_prose_matches_its_signature(doc):
    assert _api_problems((ROOT / doc).read_text(), all_names=False) == []


def test_the_six_objectives_are_re_exported_from_l2l():
    for name in ("grad_reverse", "GradReverse", "input_gradient_penalty", "parameter_gradient_penalty", "tangent_penalty",
                 "gradient_supervision_loss"):
        assert getattr(l2l, name) is getattr(l2l.objectives, name)


# ------------------------------------------------------------------------------------------------
# The task table gives each family's defaults.


def test_the_task_table_lists_every_family_with_its_defaults():
    rows = [line for line in section("README.md", "Tasks and datasets").splitlines() if line.startswith("| `")]
    families = {name: family for name, family in list_tasks().items() if type(family).__module__.startswith("l2l.")}
    documented = set()
    for row in rows:
        names_cell, _, defaults_cell = (cell.strip() for cell in row.strip("|").split("|"))
        steps, unroll, instances = (int(part) for part in defaults_cell.split("/"))
        for name in re.findall(r"`([^`]+)`", names_cell):
            family = families.get(name)
            assert family is not None, f"the README's task table lists {name!r}, which is not registered"
            assert (family.default_steps, family.default_unroll, family.default_instances) == (steps, unroll, instances), name
            documented.add(name)
    assert documented == set(families), f"families missing from the README's table: {sorted(set(families) - documented)}"


# ------------------------------------------------------------------------------------------------
# The documented commands parse, with flags that exist exactly as written.


def _subparsers():
    """The ``l2l`` parser and its subcommands' parsers by name (argparse keeps them in private fields)."""
    parser = build_parser()
    choices = next(action.choices for action in parser._actions if hasattr(action, "choices") and action.choices)
    return parser, choices


def _commands(doc: str) -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of every ``l2l ...`` command in ``doc``'s bash blocks and inline code."""
    blocks, under = fences(doc), headings(doc)
    lines = [(fence.line + 1 + offset, line) for fence in blocks if fence.language == "bash"
             for offset, line in enumerate(fence.code.splitlines())]
    prose = (ROOT / doc).read_text().splitlines()
    for fence in blocks:  # blanked, keeping the line numbers: inline spans are found in the prose only
        prose[fence.line - 1 : fence.line + fence.code.count("\n")] = [""] * (fence.code.count("\n") + 1)
    text = "\n".join(prose)
    lines += [(text.count("\n", 0, span.start()) + 1, span.group(1).replace("\n", " "))
              for span in re.finditer(r"`([^`]*\bl2l\s+(?:train|bench|tasks)\b[^`]*)`", text)]
    commands, pending = [], ""
    for line_number, line in lines:
        if line.endswith("\\"):  # continued on the next line
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        for segment in re.split(r"&&|;", line):
            tokens = shlex.split(segment, comments=True)
            for index, token in enumerate(tokens):
                if token == "l2l" or (token == "-m" and tokens[index + 1 : index + 2] == ["l2l"]):
                    argv = tokens[index + (1 if token == "l2l" else 2):]
                    if argv and argv[0] in ("train", "bench", "tasks"):
                        commands.append((f"{doc}: {under[line_number - 1]} (line {line_number})", argv))
                    break
    return commands


def _indented_commands(doc: str) -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of every command in ``doc``'s indented code blocks (benchmarks/RESULTS.md's style).

    ``argv`` starts with ``l2l`` or a script path; environment assignments, ``# ...`` comments and the
    brackets of optional flags (``[--train]``) are dropped.
    """
    commands, pending = [], ""
    for number, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
        if not line.startswith("    ") or (not pending and line.lstrip().startswith(("|", "#", "- ", "* "))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        tokens = shlex.split(re.sub(r"\[(--[^\]]*)\]", r"\1", line), comments=True)
        while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):
            tokens.pop(0)
        if tokens[:1] == ["l2l"] or (tokens[:1] == ["python"] and tokens[1:2] and tokens[1].endswith(".py")):
            commands.append((f"{doc} (line {number})", tokens[1:]))
    return commands


RESULTS_COMMANDS = _indented_commands("benchmarks/RESULTS.md")
COMMANDS = [(where, argv) for doc in COMMAND_DOCS for where, argv in _commands(doc)]
COMMANDS += [(where, argv) for where, argv in RESULTS_COMMANDS if not argv[0].endswith(".py")]
SCRIPT_COMMANDS = [(where, argv) for where, argv in RESULTS_COMMANDS if argv[0].endswith(".py")]


class _Parsed(Exception):
    """Raised in place of running a script once its command line has parsed."""


@pytest.mark.parametrize("where, argv", SCRIPT_COMMANDS, ids=[f"{where}: {' '.join(argv)}"[:120] for where, argv in SCRIPT_COMMANDS])
def test_documented_script_command_parses_with_exact_flags(where, argv, monkeypatch):
    """Each ``python SCRIPT ...`` of benchmarks/RESULTS.md parses with the script's current flags, spelled out; nothing runs."""
    parsers = []
    parse_args = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        parsers.append(self)
        parse_args(self, args, namespace)  # a usage error exits with 2 here
        raise _Parsed

    script = ROOT / argv[0]
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [str(script), *argv[1:]])
    monkeypatch.syspath_prepend(str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except _Parsed:
        pass
    except SystemExit as stop:
        pytest.fail(f"{where}: `python {' '.join(argv)}` is refused by its parser (exit status {stop.code})")
    assert parsers, f"{where}: {argv[0]} parses no command line"
    options = set().union(*(parser._option_string_actions for parser in parsers))
    for action in parsers[0]._actions:  # subcommands (kernel_cache.py build ...)
        if isinstance(action, argparse._SubParsersAction):
            options = options.union(*(sub._option_string_actions for sub in action.choices.values()))
    unknown = [token for token in argv[1:] if token.startswith("--") and token.split("=")[0] not in options]
    assert not unknown, f"{where}: {argv[0]} has no flag {', '.join(unknown)}"


def test_ci_runs_the_quick_starts_install_and_test_command():
    """.ci/run installs the project and runs the suite exactly as the README's quick start says (``pip`` run as ``python -m pip``)."""
    blocks = fences("README.md")
    quick = blocks[0]
    assert (quick.heading, quick.language) == ("Quick start", "bash"), "the README's first code block is no longer the quick start"
    train, test = quick.code.splitlines()
    assert "l2l train" in train and "pytest" in test
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    expected = re.sub(r"^pip ", "python -m pip ", test)
    assert expected in ci, f".ci/run does not run the quick start's `{test}`"


def test_the_documented_commands_are_found():
    assert sum(where.startswith("README.md: Command line") for where, _ in COMMANDS) >= 5
    assert {argv[0] for _, argv in COMMANDS} == {"train", "bench", "tasks"}


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[f"{where}: l2l {' '.join(argv)}"[:120] for where, argv in COMMANDS])
def test_documented_command_parses_with_exact_flags(where, argv):
    parser, subparsers = _subparsers()
    options = set(subparsers[argv[0]]._option_string_actions)
    # argparse accepts prefixes of flags; the documentation must spell them out.
    unknown = [token for token in argv if token.startswith("--") and token.split("=")[0] not in options]
    assert not unknown, f"{where}: `l2l {argv[0]}` has no flag {', '.join(unknown)}"
    if "--help" not in argv:
        try:
            parser.parse_args(argv)
        except SystemExit:  # argparse printed why (a bad value, a missing argument)
            pytest.fail(f"{where}: `l2l {' '.join(argv)}` is refused by the parser")


def _command_line_text() -> str:
    # torchrun's own flags come before its "-m l2l".
    return re.sub(r"torchrun[^\n]*?-m l2l", "l2l", section("README.md", "Command line"))


def test_every_flag_the_command_line_section_names_exists():
    parser, subparsers = _subparsers()
    options = set(parser._option_string_actions).union(*(sub._option_string_actions for sub in subparsers.values()))
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", _command_line_text()))
    assert named - options == set()


def test_the_defaults_the_command_line_section_states_are_the_defaults():
    """``--flag` N`` and ``--flag` (N)`` in the prose: N is the flag's default (TrainConfig's for train flags)."""
    _, subparsers = _subparsers()
    stated = re.findall(r"`(--[a-z][a-z0-9-]*)` \(?(-?\d[\d.e+-]*)\)?", _command_line_text())
    assert len(stated) >= 8
    defaults = TrainConfig()
    for flag, value in stated:
        action = next(sub._option_string_actions[flag] for sub in subparsers.values() if flag in sub._option_string_actions)
        default = getattr(defaults, action.dest) if hasattr(defaults, action.dest) else action.default
        assert float(value) == default, f"README says {flag} defaults to {value}; it is {default}"


def test_the_readme_says_on_how_many_test_examples_the_families_report_their_metrics():
    text = " ".join(section("README.md", "Tasks and datasets").split())
    assert get_task("mnist").config()["eval_examples"] is None and "the whole MNIST test split" in text
    for name in ("cifar10", "cifar5", "cifar2"):
        assert f"the first {get_task(name).config()['eval_examples']:,} CIFAR test images" in text, name
    assert f"{get_task('mnist-grl').config()['eval_examples']:,} test composites" in text


# ------------------------------------------------------------------------------------------------
# The architecture tree names every module of the package.


def _tree_modules() -> set[str]:
    """The ``l2l/...py`` paths the README's architecture tree names.

    A line two spaces in names a top-level file or opens a folder (``tasks/``); a line four
    spaces in lists files of the folder last opened. A line's file names come first, before
    the words that describe them.
    """
    tree = next(fence for fence in fences("README.md") if fence.heading == "Architecture" and fence.code.startswith("l2l/"))
    named, folder = set(), ""
    for line in tree.code.splitlines()[1:]:
        depth, words = len(line) - len(line.lstrip()), line.split()
        if depth == 2:
            folder = words[0] if words[0].endswith("/") else ""
            words = words[1:] if folder else words
        elif depth != 4 or not folder:
            continue
        for word in words:
            if not word.rstrip(":").endswith(".py"):
                break
            named.add(f"l2l/{folder}{word.rstrip(':')}")
    return named


def test_the_architecture_tree_names_every_module():
    modules = {str(path.relative_to(ROOT)) for path in (ROOT / "l2l").rglob("*.py")
               if path.name != "__init__.py" or path.parent.name == "l2l"}
    named = _tree_modules()
    assert named - modules == set(), "the README's architecture tree names modules that do not exist"
    assert modules - named == set(), "modules missing from the README's architecture tree"


# ------------------------------------------------------------------------------------------------
# checkpoints/README.md gives the command that trained each shipped checkpoint.


def _checkpoint_rows() -> list[tuple[str, str, str]]:
    """``(stem, command cell, machine-and-time cell)`` of each row of checkpoints/README.md's table."""
    rows = []
    for line in (ROOT / "checkpoints" / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and cells[0].endswith('.pt`'):
            rows.append((cells[0].strip("`")[: -len(".pt")], cells[2], cells[3]))
    return rows


def test_checkpoints_readme_lists_every_shipped_checkpoint():
    assert sorted(stem for stem, _, _ in _checkpoint_rows()) == sorted(l2l.shipped_checkpoints())


@pytest.mark.parametrize("stem, command, outcome", _checkpoint_rows(), ids=[row[0] for row in _checkpoint_rows()])
def test_the_documented_command_is_the_one_that_trained_the_checkpoint(stem, command, outcome, monkeypatch):
    from l2l.cli import train_config

    line = re.search(r"`([^`]*\bl2l train [^`]*)`", command).group(1)
    train, copy = (shlex.split(part) for part in line.split("&&"))
    parser, _ = _subparsers()
    args = parser.parse_args(train[train.index("l2l") + 1:])
    config, out = train_config(args)
    assert copy == ["cp", str(out / "optimizer.pt"), f"checkpoints/{stem}.pt"], "the cp does not copy the run's optimizer.pt"
    metadata = l2l.load_use_checkpoint(stem).metadata
    recorded = json.loads(json.dumps(metadata["train_config"]))  # tuples as the JSON lists of to_json
    # Fields newer than a checkpoint are absent from its record; those it has must match the command.
    documented = {name: value for name, value in json.loads(config.to_json()).items() if name in recorded}
    assert documented == {name: recorded[name] for name in documented}
    assert metadata["task"] == config.task
    epoch = re.search(r"best [^;]*?at (?:the last epoch, |epoch )([\d,]+)", outcome).group(1)
    assert int(epoch.replace(",", "")) == metadata["best_epoch"], "the best epoch the table gives is not the checkpoint's"
    # "scripts/X.py --train runs the same recipe": its RECIPE is this command but for where it writes.
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    for script in re.findall(r"`scripts/(\w+)\.py --train` runs the same recipe", command):
        recipe = runpy.run_path(str(ROOT / "scripts" / f"{script}.py"), run_name="recipe")["RECIPE"]
        assert recipe == [token for token in _without_flags(train[train.index("train") + 1:], {"--out": 1, "--no-bench": 0})]


def _without_flags(argv: list[str], flags: dict[str, int]) -> list[str]:
    """``argv`` without the ``flags`` named, each with its number of values."""
    kept, skip = [], 0
    for token in argv:
        if skip:
            skip -= 1
        elif token in flags:
            skip = flags[token]
        else:
            kept.append(token)
    return kept


# ------------------------------------------------------------------------------------------------
# The repository files the documentation points to exist.

_REPO_DIRS = ("benchmarks/", "scripts/", "tests/", "examples/", "checkpoints/", "docs/", "l2l/")


def _repository_paths(doc: str) -> set[str]:
    """Paths into the repository that ``doc`` names (a code span's first word, a link), relative to the repository root.

    Placeholders (``NAME.png``, ``DIR``) and what a run writes (``runs/...``) are not repository files;
    a ``*`` is a pattern that must match something.
    """
    text = re.sub(r"^```.*?^```", "", (ROOT / doc).read_text(), flags=re.M | re.S)  # the prose: spans pair up
    spans = [span.split()[0] for span in re.findall(r"`([^`]+)`", text) if span.strip()]
    found = {span.removeprefix("../") for span in spans if re.fullmatch(r"[\w./*-]+", span)}
    found |= {str((ROOT / doc).parent.joinpath(link).resolve().relative_to(ROOT))
              for link in re.findall(r"\]\(([^)#:]+)\)", text)}
    return {path for path in found if path.startswith(_REPO_DIRS) and not re.search(r"\b(NAME|DIR|STEM|TASK|OUT|PATH)\b", path)}


@pytest.mark.parametrize("doc", COMMAND_DOCS)
def test_the_repository_files_the_docs_name_exist(doc):
    paths = _repository_paths(doc)
    assert paths, doc  # the patterns above still find the docs' paths
    missing = sorted(path for path in paths if not list(ROOT.glob(path.rstrip("/"))))
    assert missing == [], f"{doc} names files that are not in the repository: {missing}"
