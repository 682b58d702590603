"""verifier.py on hostile text: every function that reads model output takes time linear in its length.

A looping model writes one fragment thousands of times; in the caller's process (eval.py's majority vote,
grade_batch after a worker timeout) one super-linear regex on such text stalls evaluation for good. Each case
below repeats a fragment to about 1k, 10k and 100k characters and asserts that the time per call grows at
most GROWTH-fold per 10-fold of text: ratios of CPU time (least of up to 3 rounds, each size called often
enough for 30k characters of work), never a wall-clock limit, so a slow or busy machine cannot fail it.
Linear code grows ~10x, n log n ~13x, quadratic ~100x; exponential never finishes, and a CPU-time alarm
(HANG) turns that into a failure instead of a hung test. Every compiled pattern of verifier.py must be
named by some case (test_every_pattern_has_a_fuzz_case), so a new pattern comes with its worst inputs.
"""
import ast
import gc
import math
import re
import signal
import time

import pytest

import verifier
from verifier import FALLBACKS, extract_answer, normalize

SIZES = (1_000, 10_000, 100_000)
GROWTH = 30   # the most a call may slow down when its text grows 10x
HANG = 60     # CPU seconds after which a test counts as hung (a linear case takes well under one)


def _extraction(s):
    """What reads a whole response in the caller's process: every mode's places to look and fallback."""
    return ([extract_answer(s, mode, tuple(FALLBACKS)) for mode in ("last_boxed", "first_boxed")]
            + [f(s) for f in FALLBACKS.values()] + [verifier.strip_wrappers(s), verifier.split_thinking(s)])


def _tokens(s):
    try:
        verifier.Parser(s)  # tokenises all of s, then refuses more than 2,000 tokens
    except verifier.ParseError:
        pass


def _matrix(s):
    try:
        verifier._matrix(s)
    except verifier.ParseError:
        pass


PROBES = {  # how verifier.py applies each pattern
    "extraction": _extraction,
    "normalize": normalize,
    "tokens": _tokens,
    "matrix": _matrix,
    "interval": verifier._as_interval,
    "scalar": lambda s: (verifier._BASE.fullmatch(s), verifier._has_decimal(s), verifier._DECIMAL.fullmatch(s)),
    "behaviours": lambda s: [rx.search(s) for rx in verifier.BEHAVIOURS.values()],
}

# (patterns aimed at, probe, prefix, fragment repeated, suffix)
CASES = [
    # boxes
    (("_BOX", "_BOX_WORD"), "extraction", "", "\\boxed 12 ", ""),
    (("_BOX", "_BRACE"), "extraction", "", "\\boxed{", "1"),
    (("_BOX", "_BRACE"), "extraction", "\\fbox{", "{}\\{\\}", "}"),
    (("_BOX",), "extraction", "\\boxed", " ", ""),
    (("_TEXT_WRAPPER", "_BRACE"), "extraction", "\\boxed{\\text{", "a}{", "}}"),
    (("_TEXT_WRAPPER",), "extraction", "", "\\text{", ""),
    # fallbacks
    (("_FINAL_ANSWER",), "extraction", "", "final answer is ", ""),
    (("_FINAL_ANSWER",), "extraction", "final answer is", ": \n", ""),
    (("_FINAL_ANSWER", "_THE_ANSWER_IS"), "extraction", "The final answer is 1", " ", "."),
    (("_ANSWER_COLON",), "extraction", "", "\n", ""),
    (("_ANSWER_COLON",), "extraction", "", "\n **answer", ""),
    (("_ANSWER_COLON",), "extraction", "Answer: a", " ", "b"),
    (("_ANSWER_COLON",), "extraction", "Answer:", " \n", ""),
    (("_ANSWER_COLON",), "extraction", "", "answer: 1\n", ""),
    (("_ANSWER_COLON",), "extraction", "", "answer:", ""),
    (("_THE_ANSWER_IS",), "extraction", "", "the answer is ", ""),
    (("_THE_ANSWER_IS",), "extraction", "the answer is", ":", "\n\n"),
    (("_GSM8K",), "extraction", "#### a", " ", "b"),
    (("_GSM8K",), "extraction", "####", " \n", ""),
    (("_GSM8K",), "extraction", "", "####", ""),
    (("_GSM8K",), "extraction", "", "#### 1\n", ""),
    (("_NUMBER",), "extraction", "", "1,", ""),
    (("_NUMBER",), "extraction", "", "-.1.", ""),
    # units: the exponential case of issue 24 ("sq ft" read two ways), and its relatives
    (("_UNIT_WORD",), "normalize", "12 sq ft", " sq ft", " x"),
    (("_UNIT_WORD",), "normalize", "12", " sq units", " x"),
    (("_UNIT_WORD",), "normalize", "12", " square units", " x"),
    (("_UNIT_WORD",), "normalize", "12", " sq in", "!"),
    (("_UNIT_WORD",), "normalize", "12", " sq. ft", "!"),
    (("_UNIT_WORD",), "normalize", "12", " inches per", " x"),
    (("_UNIT_WORD",), "normalize", "", "1 m", ""),
    (("_UNIT_WORD",), "normalize", "1", " ", "x"),
    (("_UNIT_TEXT",), "normalize", "12\\text{ sq ft", " sq ft", " x}"),
    (("_UNIT_TEXT",), "normalize", "12\\mbox{", " sq units", "^{2} x}"),
    (("_UNIT_TEXT",), "normalize", "", "\\text{ m", ""),
    (("_UNIT_TEXT",), "normalize", "\\textnormal{", " ", "x"),
    # normalize's rewrites
    (("_SIZING", "_SPACING"), "normalize", "", "\\left\\big\\quad\\displaystyle", ""),
    (("_FRAC_STYLE", "_FRAC_SPACED", "_FRAC_SPACE"), "normalize", "", "\\dfrac 1 ", ""),
    (("_FRAC_SPACED", "_FRAC_SPACE"), "normalize", "\\frac", " ", "x"),
    (("_DEGREE",), "normalize", "^", " ", "x"),
    (("_DEGREE",), "normalize", "", "^ { ", ""),
    (("_DEGREE",), "normalize", "", "^\\circ°\\degree", ""),
    (("_OR_AND",), "normalize", "\\text{", " ", "x"),
    (("_OR_AND",), "normalize", "", "1 or;and ", ""),
    (("_TEXT",), "normalize", "", "\\text{a", ""),
    (("_TEXT",), "normalize", "\\operatorname{", "a", ""),
    (("_FRAC_DIGITS", "_FRAC_DIGIT_BRACE", "_FRAC_BRACE_DIGIT"), "normalize", "", "\\frac{1", ""),
    (("_FRAC_BRACE_DIGIT",), "normalize", "\\frac{", "1", "}"),
    (("_FRAC_DIGITS", "_FRAC_DIGIT_BRACE"), "normalize", "", "\\frac12\\frac1{", ""),
    (("_SQRT_DIGITS",), "normalize", "\\sqrt", "1", ""),
    (("_LE", "_GE", "_NE", "_LT", "_GT"), "normalize", "", "\\le<=\\geq>=\\ne!=\\lt\\gt", ""),
    (("_SCRIPT_SPACE",), "normalize", "", "_1 ^a ", ""),
    (("_COMMAND_SPACE",), "normalize", "\\", "a", " 1"),
    (("_COMMAND_SPACE", "_BLANKS"), "normalize", "\\cdot", " \t", "1"),
    (("_LABEL", "_LONE_LETTER"), "normalize", "(", "x_1,", "x)=1"),
    (("_LABEL",), "normalize", "x_", "a", "=1"),
    (("_LONE_LETTER",), "normalize", "x=", "1xy", ""),
    (("_MEMBER",), "normalize", "x\\in", "a", ""),
    (("_THOUSANDS",), "normalize", "1", ",000", "x"),
    (("_LEADING_POINT", "_TRAILING_POINT"), "normalize", "", ".1.", ""),
    (("_TRAILING_ZEROS",), "normalize", "", "1", ""),
    (("_TRAILING_ZEROS",), "normalize", "1.", "0", "1"),
    (("_TRAILING_ZEROS",), "normalize", "1.", "1", "0"),
    (("_TRAILING_ZEROS", "_TRAILING_POINT"), "normalize", "", "1.0", ""),
    (("_CHOICE",), "normalize", "(", "A", ")"),
    (("_MIXED",), "normalize", "2\\frac{1}{", "2", "}"),
    (("_MIXED",), "normalize", "", "1", "\\frac{1}{2}"),
    # the workers' side (normalised answers, under MAX_BOXED_CHARS; still linear on any text)
    (("_TOKEN",), "tokens", "", "1.2\\frac x{\\}|", ""),
    (("_MATRIX",), "matrix", "\\begin{pmatrix}", "1&", "\\end{bmatrix}"),
    (("_MATRIX",), "matrix", "", "\\begin{array}{", ""),
    (("_CHAIN", "_ONE_SIDED"), "interval", "", "1<x<", "\n"),
    (("_CHAIN", "_ONE_SIDED"), "interval", "", "<x_a", ""),
    (("_ONE_SIDED",), "interval", "x<", "1", "\n"),
    (("_BASE", "_DECIMAL_POINT", "_DECIMAL"), "scalar", "", "1.", "_"),
    (("_BASE", "_DECIMAL"), "scalar", "-", "1", "_{2"),
    (("BEHAVIOURS['backtracking']",), "behaviours", "", "let me re", ""),
    (("BEHAVIOURS['verification']",), "behaviours", "", "check my plug ", ""),
    (("BEHAVIOURS['alternatives']",), "behaviours", "", "another let us try ", ""),
]
# Every fragment and prefix above and a few more, through both caller-side functions in one frame, so that
# each pattern there also meets the fragments no case aimed at it.
FRAGMENTS = sorted({c[3] for c in CASES} | {c[2] for c in CASES if c[2]} | {
    "sq ft ", " sq units", "square units ", "the answer is ", "Answer: ", ":", "\n\n", "{", "}", "\\frac", "\\text{",
    "\\boxed{", "#### ", "$", "$$", "12", "1,000", ",", "</think>", "<think>", "\\(", "\\)", "**", " 1 "})


def _text(prefix, fragment, suffix, n):
    return prefix + fragment * max(1, (n - len(prefix) - len(suffix)) // len(fragment)) + suffix


def _seconds(fn, text, calls):
    """CPU seconds per call of fn(text), over `calls` calls. This thread's: while the CPU alarm is armed,
    Linux counts the whole process's CPU time in 4 ms ticks."""
    gc.disable()
    try:
        t0 = time.thread_time()
        for _ in range(calls):
            fn(text)
        return (time.thread_time() - t0) / calls
    finally:
        gc.enable()


def _times(fn, texts, growth, work=30_000):
    """Least CPU seconds per call of fn on each of `texts` (shortest first), each text called often enough
    for `work` characters in all (so that constant costs are not compared against noise), over up to 3
    rounds: a further round only while some time is over `growth` times the one before."""
    fn(texts[0])  # first-call costs (sympy's import in Parser) belong to no size
    best = [math.inf] * len(texts)
    for _ in range(3):
        for i, text in enumerate(texts):
            best[i] = min(best[i], _seconds(fn, text, max(1, work // len(text))))
        if all(b <= growth * a for a, b in zip(best, best[1:])):
            break
    return best


@pytest.fixture
def cpu_alarm():
    """A CPU-time alarm (not wall clock: other work on the machine does not count) that fails a hung case."""
    def hung(signum, frame):
        raise TimeoutError(f"over {HANG} s of CPU time: super-linear on this input")
    previous = signal.signal(signal.SIGVTALRM, hung)
    signal.setitimer(signal.ITIMER_VIRTUAL, HANG)
    yield
    signal.setitimer(signal.ITIMER_VIRTUAL, 0)
    signal.signal(signal.SIGVTALRM, previous)


def _assert_linear(fn, make, label):
    t = _times(fn, [make(n) for n in SIZES], GROWTH)
    ratios = " then ".join(f"x{b / a:.0f}" if a else "from 0" for a, b in zip(t, t[1:]))
    assert all(b <= GROWTH * a for a, b in zip(t, t[1:])), f"{label}: time per call {ratios} per 10x text ({t})"


@pytest.mark.parametrize("patterns,probe,prefix,fragment,suffix", CASES,
                         ids=[f"{'+'.join(c[0])}:{c[3]!r}" for c in CASES])
def test_linear_time(patterns, probe, prefix, fragment, suffix, cpu_alarm):
    _assert_linear(PROBES[probe], lambda n: _text(prefix, fragment, suffix, n), probe)


@pytest.mark.parametrize("fragment", FRAGMENTS)
@pytest.mark.parametrize("probe", ["extraction", "normalize"])
def test_linear_time_on_every_fragment(probe, fragment, cpu_alarm):
    _assert_linear(PROBES[probe], lambda n: _text("1 ", fragment, " x", n), probe)


def test_issue_24_inputs_take_time_linear_in_their_repeats(cpu_alarm):
    """The degenerate answers of issue 24, finding 1: a box of "sq ft" repeats took 3.4 s in the caller's
    process at 21 repeats and doubled with each one (40 never finished); 20,000 newlines took 2.8 s in the
    "Answer:" fallback. Twice the repeats may now take at most 4x the time, ten times at most 30x."""
    def caller(text):  # what eval.py's vote and grade_batch's timeout path run in the caller's process
        return normalize(extract_answer(text, "lenient", tuple(FALLBACKS)) or "")
    box = lambda k: "\\boxed{12 sq ft" + " sq ft" * k + " x}"  # noqa: E731
    t20, t40 = _times(caller, [box(20), box(40)], 4)
    assert t40 <= 4 * t20, (t20, t40)
    t2k, t20k = _times(caller, ["\n" * 2_000, "\n" * 20_000], GROWTH)
    assert t20k <= GROWTH * t2k, (t2k, t20k)


def _patterns(name, value):
    """(name, pattern) for every compiled regex in `value`, looking inside dicts, lists and tuples."""
    if isinstance(value, re.Pattern):
        yield name, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _patterns(f"{name}[{k!r}]", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _patterns(f"{name}[{i}]", v)


def test_every_pattern_has_a_fuzz_case():
    found = {name for var, value in vars(verifier).items() for name, _ in _patterns(var, value)}
    named = {p for case in CASES for p in case[0]}
    assert found - named == set(), "patterns of verifier.py with no fuzz case: add one to CASES"
    assert named - found == set(), "fuzz cases naming patterns verifier.py no longer has"


def test_every_pattern_is_compiled_at_module_level():
    """A pattern written inside a function (re.sub(r"...", ...)) would escape the list above."""
    with open(verifier.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    inline = [f"line {call.lineno}: re.{call.func.attr}" for node in ast.walk(tree)
              if isinstance(node, (ast.FunctionDef, ast.Lambda, ast.ClassDef))
              for call in ast.walk(node) if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
              and isinstance(call.func.value, ast.Name) and call.func.value.id == "re"]
    assert inline == [], "compile these patterns at module level (and give each a fuzz case)"
