"""Every code identifier the docs cite exists: README.md, docs/*.md and benchmarks/README.md.

Each inline code span (and each command line of a fenced block) is read as what it looks like:

- ``lightning_dhp.x.y`` (or ``torch.x``, ``lightning.x``, ...): imported and resolved attribute by attribute (strict);
- a file path (``path/to/file.py``, ``folder/``) or file name (``media.py``): a file of the repository;
- a command (``python script.py --flag``, ``python -m module``, ``dhp-simulate``): the script or module exists,
  each ``--flag`` is declared in it (or in a repository module it imports), each Hydra ``group=option`` exists;
- ``tests/test_x.py::test_name`` or ``test_name[id]``: a test function of the suite;
- ``ClassName`` / ``CONSTANT`` / ``ClassName.attr``: defined in the repository's Python (an attribute of a class
  found by importing it, or assigned on ``self`` in its source), or a name of torch / Lightning / transformers;
- ``snake_case_name`` / ``object.attr``: a name the repository's Python defines or uses (a parameter, a keyword,
  an attribute, a dict key, a config key).

Plain lowercase words (``dhp``, ``run``), expressions and literals are prose, not checked. A failure lists every
unresolved span with its file and line.
"""

from __future__ import annotations

import ast
import builtins
import configparser
import fnmatch
import importlib
import importlib.util
import inspect
import re
import shlex
from functools import cache
from pathlib import Path
from typing import NamedTuple

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "benchmarks/README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
PYTHON_ROOTS = ("lightning_dhp", "tests", "benchmarks", "examples")
# modules a dotted span may start with, resolved strictly by import (``F`` as the docs write torch's functional)
IMPORTABLE_ROOTS = {"lightning_dhp": "lightning_dhp", "torch": "torch", "lightning": "lightning",
                    "transformers": "transformers", "os": "os", "sys": "sys", "math": "math",
                    "F": "torch.nn.functional"}
# where a capitalised name from outside the repository may come from
EXTERNAL_NAMESPACES = ("torch", "torch.nn", "torch.utils.data", "torch.distributed", "lightning.pytorch",
                       "lightning.pytorch.callbacks", "lightning.pytorch.strategies", "lightning.pytorch.loggers",
                       "transformers", "torchmetrics")
# cited names that exist outside anything importable here, each with where it lives
KNOWN_EXTERNAL = {
    "PyOS_AfterFork_Child": "CPython's C API (fork handlers)",
    "PYTHONPATH": "Python's module search path (an environment variable)",
    "QueueFeederThread": "multiprocessing.queues' feeder thread name",
    "gloo_tcp_loop": "a thread name of gloo",
    "pt_gloo_runloop": "a thread name of torch's gloo backend",
    "npu_fusion_attention": "torch_npu",
    "flash_attn": "the flash-attn package",
    "activitynet_v13_videos.csv": "a length metadata file of ../shared/data",
    "libnvrtc.so.13": "CUDA's runtime compiler library",
    "DHPStrategy.plan_history": "documented as removed: the strategy names its replacement",
    "Metric": "torchmetrics.Metric",
    "BalancedCPScheduler": "Megatron-Core's hybrid CP scheduler, re-implemented by the simulator",
    "cu_seqlens": "transformers' vision encoders",
    "image_newline": "transformers' LLaVA-OneVision",
    "visual_pos_masks": "transformers' Qwen3-VL",
    "sample_frames": "transformers' video processors",
    "outputs/": "Hydra's output folder, written by a run",
    "--help": "argparse's and Hydra's own option",
}
# classes whose members the docs cite by a variable's name (``self.device_mesh``, ``optimizer.toggle_model``)
EXTERNAL_CLASSES = ("lightning.pytorch.LightningModule", "lightning.pytorch.Trainer", "lightning.pytorch.Callback",
                    "lightning.pytorch.strategies.Strategy", "lightning.pytorch.core.optimizer.LightningOptimizer",
                    "torch.nn.Module", "torch.Tensor")
CALL = re.compile(r"^(?P<name>[A-Za-z_][\w.]*)\(.*\)$")
DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
PATH = re.compile(r"^[\w.\-]*[\w\-]+(/[\w.\-]+)*/?$")
FILE_SUFFIXES = (".py", ".md", ".yaml", ".json", ".csv", ".png", ".txt", ".cfg", ".toml", ".jsonl")
TEST_REFERENCE = re.compile(r"^(?:(?P<file>tests/[\w/]+\.py)::)?(?P<test>test_[\w*]+)(?:\[(?P<id>[^\]]+)\])?$")


def _cited_spans() -> list[tuple[str, int, str]]:
    """(doc, line, text) of every inline code span, and of every ``python``/``dhp-`` line of a fenced block."""
    spans = []
    for doc in DOCS:
        fenced = False
        for number, line in enumerate((REPO / doc).read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
            elif fenced:
                for command in re.split(r"&&|;", line.split("  #")[0]):
                    if re.match(r"\s*(\w+=\S+\s+)*(python3?\s|dhp-)", command):
                        spans.append((doc, number, command.strip()))
            else:
                spans += [(doc, number, match.group(1).strip()) for match in re.finditer(r"`([^`]+)`", line)]
    return spans


@cache
def _python_files() -> list[Path]:
    """The repository's Python files, but this one (whose strings name things that do not exist)."""
    return sorted(path for root in PYTHON_ROOTS for path in (REPO / root).rglob("*.py")
                  if path != Path(__file__).resolve())


@cache
def _repo_files() -> set[str]:
    ignored = {".git", "__pycache__", ".venv", ".ci-venv", "outputs"}
    return {str(path.relative_to(REPO)) for path in REPO.rglob("*")
            if not ignored & set(path.relative_to(REPO).parts)}


class RepoNames(NamedTuple):
    defined: set[str]  # names the repository's Python defines or imports
    used: set[str]  # names it defines or uses anywhere (parameters, keywords, attributes, identifier strings)
    instance_attributes: dict[str, set[str]]  # class name: the attributes its methods assign on self
    strings: set[str]  # its string constants


@cache
def _names() -> RepoNames:
    """What the repository's Python (and its Hydra configs' keys and option names) defines and uses."""
    defined, used, instance_attributes, strings = set(), set(), {}, set()
    for path in _python_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, (ast.arg, ast.keyword)) and node.arg:
                used.add(node.arg)
            elif isinstance(node, ast.Attribute):
                used.add(node.attr)
            elif isinstance(node, ast.Name):
                used.add(node.id)
            elif isinstance(node, ast.alias):
                defined.add((node.asname or node.name).split(".")[0])
                defined.add(node.name.rsplit(".", 1)[-1])
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.add(node.value)
                if node.value.isidentifier():
                    used.add(node.value)
            if isinstance(node, ast.ClassDef):
                attributes = instance_attributes.setdefault(node.name, set())
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Attribute) and isinstance(inner.ctx, ast.Store) and \
                            isinstance(inner.value, ast.Name) and inner.value.id == "self":
                        attributes.add(inner.attr)
                    elif isinstance(inner, ast.AnnAssign) and isinstance(inner.target, ast.Name):
                        attributes.add(inner.target.id)
    for path in (REPO / "lightning_dhp" / "conf").rglob("*.yaml"):
        used |= _yaml_keys(yaml.safe_load(path.read_text())) | {path.stem}
    return RepoNames(defined, used | defined, instance_attributes, strings)


def _yaml_keys(node) -> set[str]:
    if isinstance(node, dict):
        return {str(key) for key in node} | {key for value in node.values() for key in _yaml_keys(value)}
    if isinstance(node, list):
        return {key for value in node for key in _yaml_keys(value)}
    return set()


@cache
def _test_functions() -> dict[str, set[str]]:
    """{tests/file.py: its test function names}."""
    return {str(path.relative_to(REPO)): {node.name for node in ast.walk(ast.parse(path.read_text()))
                                          if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
            for path in (REPO / "tests").glob("test_*.py")}


def _resolve(dotted: str, module_name: str) -> bool:
    """Whether ``dotted`` (its first part standing for ``module_name``) imports and resolves attribute by
    attribute; a missing attribute may still be an instance attribute its class assigns on ``self``."""
    parts = dotted.split(".")
    target, rest = None, parts[1:]
    for cut in range(len(rest), -1, -1):  # the longest importable module path
        try:
            target = importlib.import_module(".".join([module_name, *rest[:cut]]))
        except ImportError:
            continue
        rest = rest[cut:]
        break
    if target is None:
        return False
    for attribute in rest:
        if not hasattr(target, attribute):
            return inspect.isclass(target) and attribute in _names().instance_attributes.get(target.__name__, set())
        target = getattr(target, attribute)
    return True


@cache
def _repo_object(name: str):
    """The class or function ``name`` as exported by lightning_dhp or one of its subpackages, or None."""
    for package in ("lightning_dhp", "lightning_dhp.lightning", "lightning_dhp.planner", "lightning_dhp.hf",
                    "lightning_dhp.attention", "lightning_dhp.distributed", "lightning_dhp.models",
                    "lightning_dhp.hf.families", "lightning_dhp.errors"):
        try:
            module = importlib.import_module(package)
        except ImportError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    return None


@cache
def _external(name: str) -> bool:
    for namespace in EXTERNAL_NAMESPACES:
        try:
            if hasattr(importlib.import_module(namespace), name):
                return True
        except ImportError:
            continue
    return False


@cache
def _external_member(name: str) -> bool:
    for qualified in EXTERNAL_CLASSES:
        module, _, cls = qualified.rpartition(".")
        if hasattr(getattr(importlib.import_module(module), cls), name):
            return True
    return False


def _check_file(path: str) -> str | None:
    if path.startswith(("../", "~", "$", "/")) or "<" in path or "*" in path:
        return None  # outside the repository, or a pattern
    files = _repo_files()
    stripped = path.rstrip("/")
    if "/" in stripped:
        candidates = [stripped, f"lightning_dhp/{stripped}", f"benchmarks/{stripped}", f"tests/{stripped}"]
        if any(candidate in files for candidate in candidates) or path in _names().strings:  # or a logged name
            return None
        return f"no file {path}"
    if any(name.rsplit("/", 1)[-1] == stripped for name in files):
        return None
    return f"no file named {path} in the repository"


def _script_sources(script: Path) -> str:
    """The text of ``script`` and of the repository modules it imports (where its options may be declared)."""
    texts = [script.read_text()]
    for node in ast.walk(ast.parse(texts[0])):
        modules = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
            [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        for module in modules:
            for candidate in (REPO / Path(*module.split(".")), script.parent / module):
                if candidate.is_dir():
                    texts += [path.read_text() for path in candidate.rglob("*.py")]
                elif candidate.with_suffix(".py").is_file():
                    texts.append(candidate.with_suffix(".py").read_text())
    return "\n".join(texts)


@cache
def _console_scripts() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return {name.strip(): target.strip() for name, target in (line.split("=") for line in lines)}


def _check_command(text: str) -> list[str]:
    words = shlex.split(text.replace("\\", ""))
    while words and re.match(r"^\w+=", words[0]):  # environment variables
        words.pop(0)
    program, arguments = words[0], words[1:]
    problems, sources = [], None
    if program.startswith("dhp-"):
        if program not in _console_scripts():
            return [f"no console script {program} in setup.cfg"]
        module = _console_scripts()[program].split(":")[0]
        sources = _module_sources(module)
    elif arguments[:1] == ["-m"]:
        module, arguments = arguments[1], arguments[2:]
        if module not in ("pytest", "venv"):
            if importlib.util.find_spec(module) is None:
                return [f"no module {module}"]
            sources = _module_sources(module)
    elif arguments and arguments[0].endswith(".py"):
        script, arguments = arguments[0], arguments[1:]
        if not (REPO / script).is_file():
            return [] if script == "train.py" else [f"no script {script}"]  # train.py: the README's own example
        sources = _script_sources(REPO / script)
    if sources is None:
        return problems
    for argument in arguments:
        flag = argument.split("=")[0]
        declared = f'"{flag}"' in sources or f"'{flag}'" in sources
        if flag.startswith("--") and flag not in KNOWN_EXTERNAL and not declared:
            problems.append(f"{flag} is not an option of {program} {text.split()[1]}")
        group_option = re.match(r"^(\w+)=([\w.,\-]+)$", argument)
        if group_option and (REPO / "lightning_dhp" / "conf" / group_option[1]).is_dir():
            for option in group_option[2].split(","):
                if not (REPO / "lightning_dhp" / "conf" / group_option[1] / f"{option}.yaml").is_file():
                    problems.append(f"no Hydra option {group_option[1]}={option} in lightning_dhp/conf")
    return problems


def _module_sources(module: str) -> str:
    origin = Path(importlib.util.find_spec(module).origin)
    return "\n".join(path.read_text() for path in origin.parent.rglob("*.py")) if origin.name in (
        "__init__.py", "__main__.py") else _script_sources(origin)


def _check_test(match: re.Match) -> str | None:
    tests = _test_functions()
    files = [match["file"]] if match["file"] else list(tests)
    if match["file"] and match["file"] not in tests:
        return f"no test file {match['file']}"
    if not any(fnmatch.fnmatch(name, match["test"]) for file in files for name in tests[file]):
        return f"no test {match['test']}" + (f" in {match['file']}" if match["file"] else "")
    if match["id"] and not any(fnmatch.fnmatch(string, match["id"]) for string in _names().strings):
        return f"no parameter id {match['id']} written in the tests"  # ids as the tables write them
    return None


def problem_of(text: str) -> str | None:
    """Why the cited ``text`` does not resolve, or None (it resolves, or it is prose or an expression)."""
    if text in KNOWN_EXTERNAL or text.split("(")[0] in KNOWN_EXTERNAL:
        return None
    program = re.match(r"^(\w+=\S+\s+)*(python3?|dhp-[\w-]+)(\s|$)", text)
    if program and not text.startswith("python3 -m venv"):
        if program[2].startswith("dhp-") and program[2] not in _console_scripts():  # a policy's name
            return None if text in _names().strings else f"{text} is no console script and no name in the repository"
        return "; ".join(_check_command(text)) or None
    if (test := TEST_REFERENCE.match(text)) and (test["file"] or text not in _names().used):  # not a hook's name
        return _check_test(test)
    if PATH.match(text) and ("/" in text or text.endswith(FILE_SUFFIXES)):
        return _check_file(text)
    call = CALL.match(text)
    name = call["name"] if call else text
    if not DOTTED.match(name):
        return None  # an expression, a literal, an option value: prose
    head, _, rest = name.partition(".")
    if (len(head) == 1 and not rest) or hasattr(builtins, name):
        return None  # a symbol of a formula, None, a builtin exception
    if head in IMPORTABLE_ROOTS:
        return None if _resolve(name, IMPORTABLE_ROOTS[head]) else f"{name} does not resolve"
    defined, used = _names().defined, _names().used
    if not rest and head.islower() and "_" not in head.strip("_"):
        return None  # a plain word
    if head[0].isupper():  # a class or constant: strict
        if name in KNOWN_EXTERNAL:
            return None
        obj = _repo_object(head)
        if obj is not None:
            if rest and not _has_path(obj, rest):
                return f"{head} has no {rest}"
            return _unknown_keywords(text, obj) if call and not rest else None
        if head in defined:
            return None if not rest or rest.split(".")[-1] in used else f"{name}: no {rest} in the repository"
        return None if _external(head) else f"{head} is defined nowhere in the repository nor in torch, " \
                                             f"Lightning or transformers"
    modules = [path for path in _python_files() if path.stem == head and "lightning_dhp" in path.parts]
    if rest and any(_resolve(f"x.{rest}", ".".join(path.relative_to(REPO).with_suffix("").parts))
                    for path in modules):  # module.attr, a module of the package named in prose
        return None
    last = name.rsplit(".", 1)[-1]
    if last in used or _external_member(last):
        return None
    return f"{last} is neither defined nor used anywhere in the repository's Python, nor a Lightning/torch member"


def _unknown_keywords(text: str, function) -> str | None:
    """Which keyword arguments of the cited call ``text`` ``function`` does not take (None: all, or it takes
    ``**kwargs``, or the call is not Python)."""
    try:
        keywords = [keyword.arg for keyword in ast.parse(text, mode="eval").body.keywords if keyword.arg]
        parameters = inspect.signature(function).parameters
    except (SyntaxError, ValueError, TypeError):
        return None
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return None
    unknown = [keyword for keyword in keywords if keyword not in parameters]
    return f"{text.split('(')[0]} takes no {unknown}" if unknown else None


def _has_path(obj, rest: str) -> bool:
    for attribute in rest.split("."):
        if hasattr(obj, attribute):
            obj = getattr(obj, attribute)
        else:
            return inspect.isclass(obj) and attribute in _instance_attributes(obj)
    return True


def _instance_attributes(cls: type) -> set[str]:
    attributes = set()
    for klass in cls.__mro__:
        attributes |= _names().instance_attributes.get(klass.__name__, set())
    return attributes


def test_every_code_identifier_the_docs_cite_exists():
    problems = [f"{doc}:{line}: `{text}`: {problem}" for doc, line, text in _cited_spans()
                if (problem := problem_of(text))]
    assert not problems, f"{len(problems)} cited identifiers do not exist:\n" + "\n".join(problems)


def test_the_check_finds_what_does_not_exist():
    """Each kind of citation, resolving and not (so the check above cannot pass by checking nothing)."""
    assert problem_of("lightning_dhp.testing.run_distributed") is None
    assert problem_of("lightning_dhp.testing.no_such_function") is not None
    assert problem_of("DHPStrategy") is None and problem_of("DHPPlanMismatchError") is not None
    assert problem_of("GradientSync.early_backward") is None and problem_of("GradientSync.kept_aside") is not None
    assert problem_of("DHPPacking.token_fields") is None
    assert problem_of("DHPPacking(item_transform=...)") is None and problem_of("DHPPacking(no_such=1)") is not None
    assert problem_of("EarlyStopping") is None
    assert problem_of("lightning_dhp/testing.py") is None and problem_of("lightning_dhp/no_such.py") is not None
    assert problem_of("media.py") is None and problem_of("no_such_module.py") is not None
    assert problem_of("python benchmarks/e2e.py --tokens-per-device 448") is None
    assert problem_of("python benchmarks/e2e.py --no-such-flag") is not None
    assert problem_of("python examples/vlm_finetune.py trainer=gpu") is None
    assert problem_of("python examples/vlm_finetune.py trainer=tpu") is not None
    assert problem_of("tests/test_strategy.py::test_dhp_training_equals_single_device_training") is None
    assert problem_of("test_no_such_test") is not None
    assert problem_of("test_dhp_training_equals_single_device_training[4-idle-rank]") is None
    assert problem_of("test_dhp_training_equals_single_device_training[no-such-id]") is not None
    assert problem_of("is_last_round") is None and problem_of("no_such_snake_name") is not None
    assert problem_of("strategy=\"dhp\"") is None and problem_of("dhp") is None  # prose and expressions


def test_the_code_cites_the_repositorys_own_design_notes():
    """The code's references point into the repository (docs/design.md), not to the design file beside it."""
    citing = [f"{path.relative_to(REPO)}:{number}" for path in _python_files()
              for number, line in enumerate(path.read_text().splitlines(), 1) if "DESIGN.md" in line]
    assert not citing, f"cite docs/design.md instead of the shared DESIGN.md: {citing}"
