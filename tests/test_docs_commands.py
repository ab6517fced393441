"""The documentation's commands and links stay true to the code.

Every command line that begins with `lawder ` inside a fenced code block of README.md or docs/*.md is checked
against the CLI's parser, without running it: the command (and, for `export`, its sub-command) exists, a
positional choice such as `prepare kvasir` or `tune law-clamp` is one the command accepts, and every `--flag` is an
option of that command. Every relative markdown link in those files points to a file that exists (and, for
an anchor into a markdown file, to one of its headings).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from lawder_cli.main import app
from lawder_core.data.sources import SOURCES

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "&", "2>", "2>&1"}
# Positional choices that the parser itself does not know (a plain string argument checked in the core).
POSITIONAL_CHOICES = {("prepare",): tuple(SOURCES)}


def _root_command():
    """The Click command behind the Typer app (Typer ships its own copy of Click, so this file checks shapes by
    duck typing: a group has `.commands`, a parameter says whether it is an option or an argument)."""
    return typer.main.get_command(app)


def _is_option(param) -> bool:
    return param.param_type_name == "option"


def _is_argument(param) -> bool:
    return param.param_type_name == "argument"


def doc_commands(path: Path) -> list[tuple[int, str]]:
    """(line number, command) for every `lawder ...` line in a fenced code block, continuation lines joined."""
    found: list[tuple[int, str]] = []
    in_fence = False
    pending: tuple[int, str] | None = None
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if line.startswith("```"):
            in_fence = not in_fence
            pending = None
            continue
        if not in_fence:
            continue
        if pending is not None:  # the previous line ended with a backslash
            start, text = pending
            text = text + " " + line
        elif line.startswith("lawder "):
            start, text = number, line
        else:
            continue
        if text.endswith("\\"):
            pending = (start, text[:-1].rstrip())
            continue
        pending = None
        found.append((start, text))
    return found


def _tokens(command: str) -> list[str]:
    """Shell words of one command, trailing `# comment` removed, cut at the first pipe, redirect or `&&`."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words: list[str] = []
    for word in lexer:
        if word in SHELL_OPERATORS:
            break
        words.append(word)
    return words


def _choices(param) -> tuple[str, ...] | None:
    """The values a Choice or Enum parameter accepts (Click keeps them on `.type`, Typer on `.type_descriptor`)."""
    for holder in (getattr(param, "type", None), getattr(param, "type_descriptor", None)):
        choices = getattr(holder, "choices", None)
        if choices:
            return tuple(str(getattr(c, "value", c)) for c in choices)
    return None


def _option_table(command) -> dict:
    table = {}
    for param in command.params:
        if _is_option(param):
            for opt in [*param.opts, *param.secondary_opts]:
                table[opt] = param
    return table


def _takes_value(param) -> bool:
    return _is_option(param) and not param.is_flag and not param.count


def check_command(command: str, root=None) -> list[str]:
    """The problems of one documented `lawder ...` line; empty when the parser would accept its shape."""
    root = root or _root_command()
    words = _tokens(command)
    if not words or words[0] != "lawder":
        return [f"not a lawder command: {command!r}"]
    words = words[1:]
    problems: list[str] = []
    global_options = _option_table(root)
    while words and words[0] in global_options:
        words = words[1:]
    if not words:
        return ["no sub-command"]
    path: list[str] = []
    current = root
    while getattr(current, "commands", None) is not None:
        if not words:
            return [f"`lawder {' '.join(path)}` needs a sub-command"]
        name, words = words[0], words[1:]
        sub = current.commands.get(name)
        if sub is None:
            return [f"unknown command `lawder {' '.join([*path, name])}`"]
        path.append(name)
        current = sub
    options = _option_table(current)
    positionals: list[str] = []
    skip_value = False
    for word in words:
        if skip_value:
            skip_value = False
            continue
        if word == "--":
            break
        if word.startswith("--") or re.fullmatch(r"-[A-Za-z]", word):
            name, has_value = word.split("=", 1)[0], "=" in word
            param = options.get(name)
            if param is None:
                problems.append(f"`lawder {' '.join(path)}` has no option {name}")
            elif _takes_value(param) and not has_value:
                skip_value = True
            continue
        positionals.append(word)
    arguments = [p for p in current.params if _is_argument(p)]
    if positionals and arguments:
        first = arguments[0]
        choices = POSITIONAL_CHOICES.get(tuple(path))
        if choices is None:
            choices = _choices(first)
        if choices is not None and positionals[0] not in choices:
            problems.append(f"`lawder {' '.join(path)}` does not accept {positionals[0]!r} (one of {choices})")
    elif positionals and not arguments:
        problems.append(f"`lawder {' '.join(path)}` takes no positional arguments, got {positionals}")
    return problems


def _cases() -> list:
    cases = []
    for path in DOC_FILES:
        for number, command in doc_commands(path):
            cases.append(pytest.param(command, id=f"{path.relative_to(ROOT)}:{number}"))
    return cases


COMMAND_CASES = _cases()


def test_docs_show_commands() -> None:
    assert len(COMMAND_CASES) >= 20, "the README and docs/ should show lawder commands in code blocks"


@pytest.mark.parametrize("command", COMMAND_CASES)
def test_documented_command_parses(command: str) -> None:
    assert check_command(command) == []


@pytest.mark.parametrize("line", [
    "lawder train-order --no-such-flag",
    "lawder train-order --data d.h5 --out runs/x --no-such-flag 3",
    "lawder no-such-command --data d.h5",
    "lawder export pdf --run runs/order",
    "lawder prepare imagenet ~/data -o x.h5",
    "lawder tune law-everything --data d.h5",
    "lawder inspect --no-such-flag data/kvasir.h5",
])
def test_checker_rejects_made_up_commands(line: str) -> None:
    assert check_command(line) != []


def test_checker_accepts_known_shapes() -> None:
    assert check_command("lawder prepare kits ~/k -o k.h5 --window=-79,304 --jobs 8  # a comment") == []
    assert check_command("lawder --debug evaluate --dice --run r --data d.h5 -o e/ --json > result.json") == []
    assert check_command("lawder export onnx --run runs/order -o order.onnx") == []


def test_continuation_lines_are_joined(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("text\n```bash\nlawder train-law --data d.h5 \\\n    --steps 10 --out r  # note\necho hi\n```\n"
                   "lawder outside-a-fence --x\n", encoding="utf-8")
    assert doc_commands(doc) == [(3, "lawder train-law --data d.h5 --steps 10 --out r  # note")]


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _link_cases() -> list:
    cases = []
    for path in DOC_FILES:
        in_fence = False
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip().startswith("```"):
                in_fence = not in_fence
            if in_fence:
                continue
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                    continue  # a URL (http:, mailto:)
                if target.startswith("#"):
                    target = path.name + target  # an anchor in the same page
                cases.append(pytest.param(path, target, id=f"{path.relative_to(ROOT)}:{number}:{target}"))
    return cases


LINK_CASES = _link_cases()


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for a markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    anchors: set[str] = set()
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("```"):
            in_fence = not in_fence
        if in_fence or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize(("doc", "target"), LINK_CASES)
def test_relative_link_resolves(doc: Path, target: str) -> None:
    file_part, _, anchor = target.partition("#")
    linked = doc.parent / file_part
    assert linked.exists(), f"{doc.name} links to {target}, which does not exist"
    if anchor and linked.suffix == ".md":
        assert anchor in heading_anchors(linked), f"{doc.name} links to {target}: no such heading"


def test_heading_anchors_follow_github() -> None:
    doc = ROOT / "docs" / "models.md"
    assert "law-and-the-diffusion-recipe-revisions-2-and-3" in heading_anchors(doc)
