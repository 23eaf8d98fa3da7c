"""OS: shell tasks run for real in agentrl's sandbox over a generated file tree; reward 0, 0.5 or 1.

Each episode gets its own :class:`~agentrl.sandbox.Sandbox` (own uid, namespaces, limits), whose workspace is
filled with a file tree generated from the task seed. The model explores and changes it with ``bash`` and ends
with ``answer``. Questions are scored by the answer; changes ("make run.sh executable") by the workspace as it
is when the episode ends, read from the real files (never from the commands the model typed).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import stat
from collections import Counter
from pathlib import Path
from typing import Any

from agentrl.envs.base import ToolEnvironment, tool, truncate
from agentrl.envs.tools import ToolError
from agentrl.sandbox import Sandbox, SandboxLimits
from agentrl.types import Message, Task, ToolCall

# File stems and content words are lookup's key words, which the tiny model's tokenizer corpus always holds
# (agentrl.model.generic_corpus), so each is one token. Content words are not substrings of one another, so
# `grep` counts exactly what the generator counted. Stems, content words and directory names are disjoint.
WORDS = tuple("ant bat bee cat cow dog elk emu fox hen owl pig yak fig kiwi lime pear plum corn rice kale leek".split())
STEMS = tuple("""red tan blue gold pink gray jade ruby rose mint sky sun moon star rain snow wind fog oak elm fir ash
    yew ivy""".split())
DIRS = tuple("docs src data logs work misc music photos backup share".split())
EXTS = ("txt", "log", "md", "sh")

QUESTION_KINDS = ("count_files", "count_lines", "line", "count_word", "most_common", "run_script", "find_word")
CHANGE_KINDS = ("chmod", "create", "delete", "rename", "copy")
KINDS = QUESTION_KINDS + CHANGE_KINDS
DEFAULTS = {"depth": 2, "files": (1, 3), "lines": (3, 10), "kinds": KINDS}
EASY = {"depth": 0, "files": (4, 6), "lines": (2, 6),
        "kinds": ("count_files", "count_lines", "line", "chmod", "create", "delete")}

FULL_REWARD, COLLATERAL_REWARD = 1.0, 0.5  # a change made, but other files touched too: half
DIR_MODE, FILE_MODE = 0o755, 0o644
MAX_COMMAND_CHARS = 2000  # a command travels to the sandbox as one datagram (about 200 KB at most)
MAX_ENTRIES, MAX_DEPTH, MAX_READ = 1000, 16, 1 << 16  # bounds on reading the final workspace
MAX_DRAWS = 1000


def in_test_split(content: str) -> bool:
    """Stable split membership of a task's content (sha256: Python's hash() is salted per process)."""
    return int(hashlib.sha256(content.encode()).hexdigest(), 16) % 10 == 0


def normalize(value: str) -> str:
    """The answer as compared: no quotes or case, integers canonical, a path reduced to its file name."""
    value = value.strip().strip(".\"'` \t\n").lower().rsplit("/", 1)[-1]
    number = re.fullmatch(r"\+?([0-9]+)", value)  # not int(): it refuses 5000 digits and accepts "²"
    return number[1].lstrip("0") or "0" if number else value


def initial_state(tree: dict[str, Any]) -> dict[str, list]:
    """The state :func:`read_state` reports for a freshly populated tree."""
    state: dict[str, list] = {d: ["dir", DIR_MODE] for d in tree["dirs"]}
    state.update({path: ["file", FILE_MODE, text] for path, text in tree["files"].items()})
    return state


def populate(workspace: Path, tree: dict[str, Any], uid: int) -> None:
    """Write ``tree`` into an empty workspace, owned by the sandbox uid, with fixed modes (no umask)."""
    for directory in tree["dirs"]:  # parents come first
        path = workspace / directory
        path.mkdir()
        os.chown(path, uid, uid)
        path.chmod(DIR_MODE)
    for name, text in tree["files"].items():
        path = workspace / name
        path.write_text(text)
        os.chown(path, uid, uid)
        path.chmod(FILE_MODE)


def read_state(workspace: Path) -> dict[str, list] | None:
    """``{relative path: entry}`` of everything in ``workspace``; None past MAX_ENTRIES or MAX_DEPTH.

    Entries: ``["dir", mode]``, ``["file", mode, text]`` (text None past MAX_READ bytes), ``["link", target]`` or
    ``["other", mode]``. We run as
    root and the tree is the model's, so nothing is followed: every open is relative to a directory descriptor
    and refuses symlinks (O_NOFOLLOW), and a link is reported, not read through.
    """
    state: dict[str, list] = {}

    def walk(dir_fd: int, prefix: str, depth: int) -> bool:
        with os.scandir(dir_fd) as entries:
            names = sorted(entry.name for entry in entries)
        for name in names:
            if len(state) >= MAX_ENTRIES:
                return False
            path, info = prefix + name, os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISDIR(info.st_mode):
                state[path] = ["dir", mode]
                if depth >= MAX_DEPTH:
                    return False
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
                try:
                    if not walk(fd, path + "/", depth + 1):
                        return False
                finally:
                    os.close(fd)
            elif stat.S_ISREG(info.st_mode):
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
                try:
                    content = os.read(fd, MAX_READ + 1)
                finally:
                    os.close(fd)
                # a file too long to read whole is none of the contents a task expects
                state[path] = ["file", mode, content.decode(errors="replace") if len(content) <= MAX_READ else None]
            elif stat.S_ISLNK(info.st_mode):
                state[path] = ["link", os.readlink(name, dir_fd=dir_fd)]
            else:
                state[path] = ["other", mode]
        return True

    root = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        return state if walk(root, "", 0) else None
    finally:
        os.close(root)


def make_tree(rng: random.Random, depth: int, files: tuple[int, int],
              lines: tuple[int, int]) -> tuple[dict[str, Any], list[str]]:
    """Directories (``depth`` levels) and files: text files of one word per line, .sh scripts that echo one word.

    Returns the tree and the stems no file uses (for names a task asks the model to create).
    """
    names = rng.sample(DIRS, len(DIRS))
    places = [""]
    if depth >= 1:
        for _ in range(rng.randint(2, 3)):
            top = names.pop()
            places.append(top)
            if depth >= 2:
                places.append(f"{top}/{names.pop()}")
    stems = rng.sample(STEMS, len(STEMS))
    tree: dict[str, Any] = {"dirs": places[1:], "files": {}}
    for place in places:
        for _ in range(rng.randint(*files)):
            ext = rng.choice(EXTS)
            path = f"{place}/{stems.pop()}.{ext}".lstrip("/")
            if ext == "sh":
                tree["files"][path] = f"echo {rng.choice(WORDS)}\n"
            else:
                vocabulary = rng.sample(WORDS, rng.randint(2, 4))
                tree["files"][path] = "".join(f"{rng.choice(vocabulary)}\n" for _ in range(rng.randint(*lines)))
    return tree, stems


def make_question(kind: str, files: dict[str, str], dirs: list[str], rng: random.Random,
                  flat: bool) -> dict[str, Any] | None:
    """Prompt, command and answer of a question about the files; None if these files cannot pose it."""
    texts = sorted(p for p in files if not p.endswith(".sh"))
    scripts = sorted(p for p in files if p.endswith(".sh"))
    if kind == "count_files":
        top = "" if flat else rng.choice([d for d in dirs if "/" not in d])
        inside = [p for p in files if p.startswith(f"{top}/") or not top]
        ext = rng.choice(sorted({p.rsplit(".", 1)[1] for p in inside}))
        answer = sum(p.endswith(f".{ext}") for p in inside)
        if flat:
            return {"prompt": f"How many .{ext} files are there?", "command": f"ls *.{ext} | wc -l", "answer": answer}
        return {"prompt": f"How many .{ext} files are under {top}?",
                "command": f"find {top} -name '*.{ext}' | wc -l", "answer": answer}
    if kind == "run_script":
        path = rng.choice(scripts) if scripts else None
        return path and {"prompt": f"What does {path} print?", "command": f"sh {path}",
                         "answer": files[path].split()[1]}
    if kind == "find_word":
        holders = {w: [p for p in files if w in files[p].split()] for w in WORDS}
        unique = sorted(w for w, found in holders.items() if len(found) == 1)
        word = rng.choice(unique) if unique else None
        return word and {"prompt": f"Which file contains the word {word}?", "command": f"grep -rl {word} .",
                         "answer": holders[word][0].rsplit("/", 1)[-1]}
    if not texts:
        return None
    path = rng.choice(texts)
    words = files[path].split()
    if kind == "count_lines":
        return {"prompt": f"How many lines are in {path}?", "command": f"wc -l {path}", "answer": len(words)}
    if kind == "line":
        n = rng.randint(1, len(words))
        return {"prompt": f"What is on line {n} of {path}?", "command": f"sed -n {n}p {path}", "answer": words[n - 1]}
    if kind == "count_word":
        word = rng.choice(sorted(set(words)))
        return {"prompt": f"How many times does {word} appear in {path}?", "command": f"grep -cx {word} {path}",
                "answer": words.count(word)}
    (top_word, n), *rest = Counter(words).most_common()
    if rest and rest[0][1] == n:
        return None  # a tie has no single answer
    return {"prompt": f"Which word appears most often in {path}?",
            "command": f"sort {path} | uniq -c | sort -rn | head -n 1", "answer": top_word}


def make_change(kind: str, files: dict[str, str], new_stem: str, rng: random.Random) -> dict[str, Any] | None:
    """Prompt, command and target of a change to the files; None if these files cannot pose it."""
    done = ", then answer done."
    if kind == "chmod":
        scripts = sorted(p for p in files if p.endswith(".sh"))
        path = rng.choice(scripts) if scripts else None
        return path and {"prompt": f"Make {path} executable{done}", "command": f"chmod +x {path}", "path": path}
    path = rng.choice(sorted(files))
    if kind == "create":
        new, word = _sibling(path, new_stem, "txt"), rng.choice(WORDS)
        return {"prompt": f"Create a file {new} containing the word {word}{done}", "command": f"echo {word} > {new}",
                "path": new, "word": word}
    if kind == "delete":
        return {"prompt": f"Delete {path}{done}", "command": f"rm {path}", "path": path}
    new = _sibling(path, new_stem, path.rsplit(".", 1)[1])
    verb, program = ("Rename", "mv") if kind == "rename" else ("Copy", "cp")
    return {"prompt": f"{verb} {path} to {new}{done}", "command": f"{program} {path} {new}", "path": path, "new": new}


def _sibling(path: str, stem: str, ext: str) -> str:
    return f"{path.rpartition('/')[0]}/{stem}.{ext}".lstrip("/")


class OSEnv(ToolEnvironment):
    """Answer questions about, or make changes to, a generated file tree with a real shell.

    Args:
        depth: directory levels: 0 (all files in the workspace), 1 (2-3 directories) or 2 (each with a subdirectory).
        files: (fewest, most) files per directory.
        lines: (fewest, most) lines per text file (one word each).
        kinds: the task kinds to draw from, a subset of ``KINDS``.
        max_output_chars: characters of command output shown to the model.
        timeout: wall-clock seconds per command; past it every process of the episode is killed.
    """

    name = "os"
    version = "os-v1"
    system_prompt = "You have a Linux shell in a folder of files. Use bash, then call answer."
    blocking = True  # calls wait on sandboxed subprocesses: the rollout engine runs them in worker threads
    split_sizes = {"train": 100_000, "test": 100}  # an episode starts a sandbox (~0.1 s): keeps the test split ~15 s

    def __init__(self, depth: int = 2, files: tuple[int, int] = (1, 3), lines: tuple[int, int] = (3, 10),
                 kinds: tuple[str, ...] = KINDS, max_output_chars: int = 1000, timeout: float = 5.0) -> None:
        files, lines, kinds = tuple(files), tuple(lines), tuple(kinds)  # configs may pass lists
        if depth not in (0, 1, 2):
            raise ValueError(f"depth must be 0, 1 or 2, got {depth!r}")
        most_files = (len(STEMS) - 1) // (1 + 3 * depth)  # distinct stems for every file, and one new name
        for label, (low, high), top in (("files", files, most_files), ("lines", lines, 50)):
            if not 1 <= low <= high <= top:
                raise ValueError(f"{label} must be (fewest, most) with 1 <= fewest <= most <= {top}, got {(low, high)}")
        if not kinds or not set(kinds) <= set(KINDS):
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
        if not 0 < timeout <= 20:
            raise ValueError(f"timeout must be in (0, 20] seconds (the env server's call timeout is 30), got {timeout}")
        if max_output_chars < 1:
            raise ValueError(f"max_output_chars must be positive, got {max_output_chars}")
        super().__init__()
        self.depth, self.files, self.lines, self.kinds = depth, files, lines, kinds
        self.max_output_chars, self.timeout = max_output_chars, timeout
        self.limits = SandboxLimits(cpu_seconds=max(1, round(timeout)), wall_seconds=timeout,
                                    memory_bytes=256 << 20, max_processes=32,
                                    max_output_bytes=max(4096, 4 * max_output_chars), max_file_bytes=1 << 20,
                                    tmp_bytes=8 << 20)
        settings = {"depth": depth, "files": files, "lines": lines, "kinds": kinds}
        # Results record the distribution, not just the generator, when the defaults are changed.
        shown = ",".join(f"{k}={'+'.join(v) if k == 'kinds' else v}" for k, v in settings.items())
        self.task_version = self.version if settings == DEFAULTS else f"{self.version}({shown})"
        self.sandbox: Sandbox | None = None

    def reset(self, task: Task) -> list[Message]:
        self.close()  # one instance may serve several episodes
        return super().reset(task)

    def _box(self) -> Sandbox:
        """The episode's sandbox, started and populated at its first command (an episode that answers
        straight away costs no sandbox)."""
        if self.sandbox is None:
            self.sandbox = Sandbox(self.limits)
            populate(self.sandbox.workspace, self.task.data["tree"], self.sandbox.uid)
        return self.sandbox

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()
            self.sandbox = None

    @tool
    def bash(self, command: str) -> str:
        """Run a shell command in the folder.

        Args:
            command: the command line.
        """
        if not command.strip():
            raise ToolError("the command is empty")
        if len(command) > MAX_COMMAND_CHARS:
            raise ToolError(f"the command is longer than {MAX_COMMAND_CHARS} characters")
        result = self._box().run(command)
        status = ""
        if result.timed_out:
            status = f"[timed out after {self.timeout:g} s]"
        elif result.killed_reason:
            status = f"[killed: {result.killed_reason}]"
        elif result.exit_code:
            status = f"[exit code {result.exit_code}]"
        output = truncate(result.stdout + result.stderr, self.max_output_chars)
        if status and output and not output.endswith("\n"):
            output += "\n"
        return output + status or "(no output)"

    @tool
    def answer(self, value: str) -> str:
        """Give the final answer; ends the episode.

        Args:
            value: a number or a word; done after a change.
        """
        data = self.task.data
        if data["kind"] in QUESTION_KINDS:
            correct = normalize(value) == str(data["answer"])
            reward = FULL_REWARD if correct else 0.0
        elif self.sandbox is None:  # no command ran: the workspace is as populated
            reward = score_change(data, initial_state(data["tree"]))
        else:
            # A timeout kills every process of the session: nothing left in the background changes the state
            # between here and the read.
            self.sandbox.run(["true"], timeout=0)
            reward = score_change(data, read_state(self.sandbox.workspace))
        self.finish(reward=reward, success=reward == FULL_REWARD)
        self.close()  # the processes and the workspace go now, not when the caller gets round to close()
        return "Answer recorded."

    def make_task(self, rng: random.Random, split: str, index: int) -> Task:
        # Kinds take turns by index, outside the retry loop: both splits have exactly the same mix of kinds.
        kind = self.kinds[index % len(self.kinds)]
        for _ in range(MAX_DRAWS):
            tree, spare = make_tree(rng, self.depth, self.files, self.lines)
            if kind in QUESTION_KINDS:
                problem = make_question(kind, tree["files"], tree["dirs"], rng, flat=self.depth == 0)
            else:
                problem = make_change(kind, tree["files"], spare[0], rng)
            # A problem is its question and its tree: the same question over another tree is another problem.
            if problem and in_test_split(problem["prompt"] + json.dumps(tree, sort_keys=True)) == (split == "test"):
                break
        else:  # pragma: no cover - the space of trees is far too large to exhaust
            raise ValueError(f"{self.task_version}: cannot fill the {split!r} split")
        data = {"kind": kind, "tree": tree, **{k: v for k, v in problem.items() if k != "prompt"}}
        return Task(env=self.name, split=split, index=index, prompt=problem["prompt"], data=data,
                    version=self.task_version)

    def oracle(self, task: Task) -> list[ToolCall]:
        data = task.data
        final = str(data["answer"]) if data["kind"] in QUESTION_KINDS else "done"
        return [ToolCall("bash", {"command": data["command"]}), ToolCall("answer", {"value": final})]


def score_change(data: dict[str, Any], state: dict[str, list] | None) -> float:
    """1.0 if the change asked for is made and nothing else changed, 0.5 if it is made but other entries
    changed too (files deleted, added, edited or re-moded), else 0.0. A workspace too large to read scores 0."""
    if state is None:
        return 0.0
    kind, path, before = data["kind"], data["path"], initial_state(data["tree"])
    entry = state.get(path)
    is_file = entry is not None and entry[0] == "file"
    if kind == "chmod":
        made = is_file and entry[2] == before[path][2] and bool(entry[1] & stat.S_IXUSR)
    elif kind == "create":
        made = is_file and entry[2] is not None and entry[2].strip() == data["word"]
    elif kind == "delete":
        made = entry is None
    else:  # rename, copy: the new name holds the original content
        moved = state.get(data["new"])
        made = moved is not None and moved[0] == "file" and moved[2] == before[path][2]
        made = made and (entry is None if kind == "rename" else True)
    # the entries the task defines; every other entry must be as it was
    targets = {data["new"]} if kind == "copy" else {path, data["new"]} if kind == "rename" else {path}
    others_kept = ({p: e for p, e in state.items() if p not in targets}
                   == {p: e for p, e in before.items() if p not in targets})
    return (FULL_REWARD if others_kept else COLLATERAL_REWARD) if made else 0.0
