"""Lookup: follow a chain of random keys through a hidden table; reward 0-10 with partial credit per hop."""

from __future__ import annotations

import random
import string

from agentrl.envs.base import ToolEnvironment, in_test_split, tool
from agentrl.envs.tools import ToolError
from agentrl.types import Message, Task, ToolCall

# "words" keys are whole common words, one token each for most tokenizers: the easiest keys to copy.
KEY_WORDS = tuple("""ant bat bee cat cow dog elk emu fox gnu hen jay koi owl pig ram rat yak ape eel
    oak elm fir ash yew ivy fig kiwi lime pear plum date bean corn rice kale leek pea yam
    red tan blue gold pink gray jade ruby rose mint sky sun moon star rain snow wind fog""".split())
# alphabet name -> (symbols, separator between the symbols of one key)
ALPHABETS = {"alnum": (tuple(string.ascii_lowercase + string.digits), ""), "digits": (tuple(string.digits), ""),
             "words": (KEY_WORDS, "-")}
FULL_REWARD = 10.0
HOP_CREDIT = 2.0
PARTIAL_CAP = 8.0  # partial credit never reaches the reward of a correct answer
MAX_DRAWS = 1000
DEFAULTS = {"min_hops": 1, "max_hops": 3, "distractors": 3, "alphabet": "alnum", "key_length": (3, 4)}



def normalize_key(key: str) -> str:
    # Small models often quote or capitalise keys; that is not the skill being measured.
    return key.strip().strip("'\"").lower()


def _new_key(rng: random.Random, taken: set[str], alphabet: tuple[tuple[str, ...], str],
             lengths: tuple[int, int]) -> str:
    symbols, separator = alphabet
    while True:
        key = separator.join(rng.choices(symbols, k=rng.randint(*lengths)))
        if key not in taken:
            taken.add(key)
            return key


class LookupEnv(ToolEnvironment):
    """Multi-hop lookup: from a start key, ``get`` the next key ``hops`` times, then ``answer``.

    Args:
        min_hops: fewest hops in a task.
        max_hops: most hops in a task.
        distractors: extra keys past the end of the chain, so overshooting still returns plausible keys.
        alphabet: "alnum" (lowercase letters and digits), "digits", or "words" (keys are common words
            joined by "-"; one word each is the easiest key for a small model to copy).
        key_length: (shortest, longest) key length, in characters (in words for "words").
    """

    name = "lookup"
    version = "lookup-v2"
    system_prompt = "Each key stores the next key: follow the chain with get, then answer with the key you reach."

    def __init__(self, min_hops: int = 1, max_hops: int = 3, distractors: int = 3, alphabet: str = "alnum",
                 key_length: tuple[int, int] = (3, 4)) -> None:
        key_length = tuple(key_length)  # configs may pass a list
        if alphabet not in ALPHABETS:
            raise ValueError(f"alphabet must be one of {sorted(ALPHABETS)}, got {alphabet!r}")
        if len(key_length) != 2 or not 1 <= key_length[0] <= key_length[1]:
            raise ValueError(f"key_length must be (shortest, longest) with 1 <= shortest <= longest, got {key_length}")
        # the chain and distractors need distinct keys
        if len(ALPHABETS[alphabet][0]) ** key_length[1] < 4 * (max_hops + 1 + distractors):
            raise ValueError(f"{alphabet} keys of length {key_length} are too few for {max_hops} hops")
        if not 1 <= min_hops <= max_hops:
            raise ValueError(f"need 1 <= min_hops <= max_hops, got {min_hops}, {max_hops}")
        if distractors < 0:
            raise ValueError(f"distractors must be >= 0, got {distractors}")
        super().__init__()
        self.min_hops, self.max_hops, self.distractors = min_hops, max_hops, distractors
        self.alphabet, self.key_length = ALPHABETS[alphabet], key_length
        kwargs = {"min_hops": min_hops, "max_hops": max_hops, "distractors": distractors, "alphabet": alphabet,
                  "key_length": key_length}
        # Results record the distribution, not just the generator, when the defaults are changed.
        shown = ",".join(f"{k}={v}" for k, v in kwargs.items())
        self.task_version = self.version if kwargs == DEFAULTS else f"{self.version}({shown})"
        self.fetched: list[str] = []

    def reset(self, task: Task) -> list[Message]:
        self.fetched = []
        return super().reset(task)

    @tool
    def get(self, key: str) -> str:
        """Read the value stored at a key.

        Args:
            key: the key, e.g. "k7q".
        """
        key = normalize_key(key)
        table = self.task.data["table"]
        if key not in table:
            raise ToolError(f"no key '{key}'")
        self.fetched.append(key)
        return table[key]

    @tool
    def answer(self, key: str) -> str:
        """Submit the key you reached; ends the episode.

        Args:
            key: the final key.
        """
        correct = normalize_key(key) == self.task.data["answer"]
        partial = min(HOP_CREDIT * self.hops_followed(), PARTIAL_CAP)
        self.finish(reward=FULL_REWARD if correct else partial, success=correct)
        return "Answer recorded."

    def hops_followed(self) -> int:
        """How many hops of the chain were fetched in order (other fetches in between are ignored)."""
        data, done = self.task.data, 0
        for key in self.fetched:
            if done < data["hops"] and key == data["chain"][done]:
                done += 1
        return done

    def make_task(self, rng: random.Random, split: str, index: int) -> Task:
        # Hops are drawn once, outside the retry loop, so both splits have the same hop distribution. Drawn
        # inside it, a split's hop mix followed how many of its prompts each hop count happened to get; with
        # word keys (about 180 prompts) the test split was 38% 2-hop and 31% 3-hop, so a policy that could not
        # read the hop count scored by which count it guessed.
        hops = rng.randint(self.min_hops, self.max_hops)
        for _ in range(MAX_DRAWS):
            start = _new_key(rng, set(), self.alphabet, self.key_length)
            # (start, hops) is all the prompt says, so splitting on it keeps prompts disjoint.
            if in_test_split(f"{start}/{hops}") == (split == "test"):
                break
        else:  # pragma: no cover - the key space is far too large to exhaust
            raise ValueError(f"{self.task_version}: cannot fill the {split!r} split")
        keys, taken = [start], {start}
        while len(keys) < hops + 1 + self.distractors:
            keys.append(_new_key(rng, taken, self.alphabet, self.key_length))
        # Every key has a value, the chain runs on into the distractors and the last one loops back.
        table = dict(zip(keys, keys[1:]))
        table[keys[-1]] = rng.choice(keys[:-1])
        s = "" if hops == 1 else "s"
        prompt = f'Start at key "{start}" and follow the chain for {hops} hop{s}. Answer with the key you reach.'
        data = {"start": start, "hops": hops, "chain": keys[: hops + 1], "answer": keys[hops], "table": table}
        return Task(env=self.name, split=split, index=index, prompt=prompt, data=data, version=self.task_version)

    def oracle(self, task: Task) -> list[ToolCall]:
        chain = task.data["chain"]
        return [ToolCall("get", {"key": key}) for key in chain[:-1]] + [ToolCall("answer", {"key": chain[-1]})]
