"""Calculator: one-operation arithmetic word problems solved with a calculator tool; reward 0 or 1."""

from __future__ import annotations

import ast
import math
import operator
import random
from fractions import Fraction

from agentrl.envs.base import ToolEnvironment, in_test_split, tool
from agentrl.envs.tools import ToolError
from agentrl.types import Task, ToolCall

TOLERANCE = 1e-6
MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 10**100  # keeps results printable (Python refuses str() of ints beyond 4300 digits)
MAX_DRAWS = 1000  # re-draws to land in the requested split; only tiny task spaces exhaust it
DEFAULT_OPS = ("+", "-", "*")

_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana")
_ITEMS = ("apples", "pens", "stamps", "marbles", "books", "cards")
_TEMPLATES = {
    "+": ("{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
          "A shop sold {a} {item} on Monday and {b} on Tuesday. How many {item} did it sell in total?"),
    "-": ("{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?",
          "A store had {a} {item} and sold {b} of them. How many {item} are left?"),
    "*": ("{name} buys {a} boxes with {b} {item} in each. How many {item} is that?",
          "There are {a} shelves with {b} {item} on each. How many {item} are there in total?"),
}
_PLAIN_TEMPLATE = "What is {a} {op} {b}?"
PHRASINGS = ("words", "plain")


def evaluate(expression: str) -> Fraction:
    """Evaluate ``+ - * /`` and parentheses over integers and decimals, exactly.

    Raises ValueError with a reason the model can read; never calls ``eval``.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r}") from None
    value = _eval(tree.body)
    if abs(value) >= MAX_MAGNITUDE:
        raise ValueError("result too large")
    return value


def _eval(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if not math.isfinite(node.value):
            raise ValueError("number too large")
        # repr() gives back the decimal as written, so 0.1 + 0.2 is exactly 0.3
        return Fraction(node.value) if type(node.value) is int else Fraction(repr(node.value))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    raise ValueError(f"unsupported {ast.unparse(node)!r}; use numbers, + - * / and parentheses")


def format_number(value: Fraction) -> str:
    """Integers without a decimal point, other values to 12 significant digits."""
    return str(value.numerator) if value.denominator == 1 else format(float(value), ".12g")



def calculate(expression: str) -> str:
    """Evaluate arithmetic with + - * / and parentheses.

    Args:
        expression: for example "12 * (3 + 4)".
    """
    try:
        return format_number(evaluate(expression))
    except ValueError as exc:  # the model gets "Error: ..." back and the call counts as a tool error
        raise ToolError(str(exc)) from None


class CalculatorEnv(ToolEnvironment):
    """Word problems with one operation; the model should compute with ``calculate`` and then ``answer``.

    Args:
        max_operand: operands are drawn from min_operand..max_operand.
        min_operand: smallest operand (at least 2, so no "1 boxes").
        ops: the operations tasks may use, a subset of ``("+", "-", "*")``.
        phrasing: "words" for word problems (the operation is implied by the story), "plain" for
            "What is 46 + 46?" (the expression is in the question; for models that are still learning to copy).
    """

    name = "calculator"
    version = "calculator-v1"
    system_prompt = "Solve the problem: use calculate for arithmetic, then call answer with the number."

    def __init__(self, max_operand: int = 999, ops: tuple[str, ...] = DEFAULT_OPS, min_operand: int = 2,
                 phrasing: str = "words") -> None:
        ops = tuple(ops)  # configs may pass a list
        if not 2 <= min_operand <= max_operand:
            raise ValueError(f"need 2 <= min_operand <= max_operand, got {min_operand}, {max_operand}")
        if not ops or not set(ops) <= set(_APPLY):
            raise ValueError(f"ops must be a non-empty subset of {DEFAULT_OPS}, got {ops}")
        if phrasing not in PHRASINGS:
            raise ValueError(f"phrasing must be one of {PHRASINGS}, got {phrasing!r}")
        super().__init__()
        self.min_operand, self.max_operand, self.ops, self.phrasing = min_operand, max_operand, ops, phrasing
        # Results record the distribution, not just the generator, when the defaults are changed.
        defaults = (min_operand, max_operand, ops, phrasing) == (2, 999, DEFAULT_OPS, "words")
        shown = f"min_operand={min_operand},max_operand={max_operand},ops={''.join(ops)}"
        if phrasing != "words":
            shown += f",phrasing={phrasing}"
        self.task_version = self.version if defaults else f"{self.version}({shown})"

    calculate = staticmethod(tool(calculate))  # the module's function, shared with reasoning_gym

    @tool
    def answer(self, value: float) -> str:
        """Submit the final number; ends the episode.

        Args:
            value: your answer.
        """
        correct = abs(value - self.task.data["answer"]) < TOLERANCE
        self.finish(reward=1.0 if correct else 0.0, success=correct)
        return "Answer recorded."

    def make_task(self, rng: random.Random, split: str, index: int) -> Task:
        for _ in range(MAX_DRAWS):
            op = rng.choice(self.ops)
            a, b = (rng.randint(self.min_operand, self.max_operand) for _ in range(2))
            if op == "-" and a < b:
                a, b = b, a  # a word problem never goes negative
            # The split is decided by the arithmetic itself (commutative order ignored), so a test
            # problem never reaches training under a different wording.
            key = f"{a}-{b}" if op == "-" else f"{min(a, b)}{op}{max(a, b)}"
            if in_test_split(key) == (split == "test"):
                break
        else:
            raise ValueError(f"{self.task_version}: too few distinct problems to fill the {split!r} split")
        template = rng.choice(_TEMPLATES[op]) if self.phrasing == "words" else _PLAIN_TEMPLATE
        prompt = template.format(name=rng.choice(_NAMES), item=rng.choice(_ITEMS), a=a, b=b, op=op)
        data = {"expression": f"{a} {op} {b}", "answer": _APPLY[op](a, b)}
        return Task(env=self.name, split=split, index=index, prompt=prompt, data=data, version=self.task_version)

    def oracle(self, task: Task) -> list[ToolCall]:
        return [ToolCall("calculate", {"expression": task.data["expression"]}),
                ToolCall("answer", {"value": task.data["answer"]})]
