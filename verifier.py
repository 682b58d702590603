"""Outcome verifier for math answers: extraction, normalisation, equivalence; no torch.

    python verifier.py FILE.jsonl --response-field response --answer-field answer

Model text is untrusted: it is never passed to eval/exec/sympify/parse_expr. A small recursive-descent
parser turns LaTeX into sympy objects directly, with bounds on length, nesting, exponent size, factorials
and matrix size; every verdict runs in a worker process with a hard wall-clock limit (default 1 s), so
even a sympy call stuck in C code cannot stall RL or evaluation. What also runs in the calling process
(extraction, normalisation: eval.py votes on normalised answers) is regexes that take time linear in
the text, whatever a model wrote (tests/test_verifier_fuzz.py holds each pattern to that).

Equivalence, in order: normalised strings equal (MATH/Minerva-style normalisation: \\left, \\!, \\dfrac,
degrees, percent, units, `x =`, thousands separators, trailing zeros); structure (sets and solution lists
unordered, tuples/points and intervals ordered with their brackets, matrices elementwise, equations and
inequalities side by side); then numbers (exact for rationals, relative tolerance 1e-6, or 1e-4 when a
decimal is written) and expressions (equal at random points of their free symbols).
"""
import json
import math
import os
import random
import re
import sys
from dataclasses import asdict, dataclass

MAX_ANSWER_CHARS = 1000    # longer extracted answers are not parsed (still compared as text)
MAX_RESPONSE_CHARS = 4_000_000  # longer responses are cut (answers beyond are not seen)
MAX_BOXED_CHARS = 20_000  # an extracted answer longer than this is unparseable, not normalised
MAX_DEPTH = 60             # nesting of braces/parentheses the parser follows
MAX_DIGITS = 10_000        # largest number (in decimal digits) a power may produce
MAX_FACTORIAL = 1000
MAX_ITEMS = 400            # elements of a list/set/tuple or cells of a matrix
STATUSES = ("correct", "incorrect", "no_answer", "unparseable", "timeout")


# ----------------------------------------------------------------------------- extraction

_BRACE = re.compile(r"\\[{}]|[{}]")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*(\{|[^\s{$\\])")
_BOX_WORD = re.compile(r"[^\s$]+")


def _closing_braces(text, start=0):
    """{index of each '{' at or after `start`: index of its matching '}'} in one pass over the braces
    alone (escaped \\{ \\} are literal), so that finding every box costs O(len(text)) even when boxes
    nest thousands deep. (Braces before `start` cannot change how later ones pair.)"""
    pairs, stack = {}, []
    for m in _BRACE.finditer(text, start):
        c = m.group()
        if c == "{":
            stack.append(m.start())
        elif c == "}" and stack:
            pairs[stack.pop()] = m.start()
    return pairs


def boxed_spans(text):
    """(start, end) of the contents of every \\boxed{...} / \\fbox{...} / `\\boxed x`, in order: positions,
    not copies, so that thousands of nested boxes cost linear time."""
    out, pairs = [], None
    for m in _BOX.finditer(text):
        if m.group(1) == "{":
            pairs = _closing_braces(text, m.start(1)) if pairs is None else pairs
            end = pairs.get(m.start(1))
            if end is not None:
                out.append((m.start(1) + 1, end))
        else:  # \boxed 2  (no braces): up to the next space or $ (matched in place: a slice would copy the rest)
            out.append((m.start(1), _BOX_WORD.match(text, m.start(1)).end()))
    return out


def boxed_answers(text):
    """Contents of every \\boxed{...} / \\fbox{...} / `\\boxed x`, in order."""
    return [text[a:b] for a, b in boxed_spans(text)]


_FINAL_ANSWER = re.compile(r"final answer is[:\s]*(.+?)(?:\.\s|\.?$|\n)", re.IGNORECASE)
# "Answer:" and "####" take the rest of the line from its first to its last non-blank character,
# \S(?:[^\n]*\S)?, where a lazy (.+?)\s*$ rescanned the rest of the line at every character (quadratic on
# a line of spaces); with only blanks up to the end of the text, one blank (an empty answer, as before).
# The blanks before "Answer" are those after its line's newline: \s* there let every newline of a run of
# blank lines start a scan to the end of the run (quadratic in blank lines). Same matches as before.
_ANSWER_COLON = re.compile(r"(?:^|\n)[^\S\n]*\**answer\**\s*:\s*(\S(?:[^\n]*\S)?|[^\S\n](?=\n*\Z))\s*(?:\n|$)",
                           re.IGNORECASE)
_THE_ANSWER_IS = re.compile(r"answer is[:\s]*(.+?)(?:\.\s|\.?$|\n)", re.IGNORECASE)
_GSM8K = re.compile(r"####\s*(\S(?:[^\n]*\S)?|[^\S\n](?=\n*\Z))")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")

FALLBACKS = {
    "final_answer": lambda t: _last(_FINAL_ANSWER.findall(t)),
    "answer_colon": lambda t: _last(_ANSWER_COLON.findall(t)),
    "the_answer_is": lambda t: _last(_THE_ANSWER_IS.findall(t)),
    "gsm8k": lambda t: _last(_GSM8K.findall(t)),
    "last_number": lambda t: _last(_NUMBER.findall(t)),
}
# Named extraction modes: where to look, in order. `strict` is the RL default; `paper` is the
# Qwen2.5-Math harness the RLSP authors evaluated with (box, else "the answer is", else the last number).
MODES = {
    "last_boxed": ("last_boxed",),
    "strict": ("last_boxed",),
    "first_boxed": ("first_boxed",),
    "paper": ("last_boxed", "the_answer_is", "last_number"),
    "gsm8k": ("gsm8k", "last_boxed", "last_number"),
    "lenient": ("last_boxed", "final_answer", "answer_colon", "the_answer_is"),
}


def _last(xs):
    return xs[-1] if xs else None


def split_thinking(text):
    """(thinking, answer) of a reasoning model's response: the thinking runs up to and including the
    last `</think>`; a `<think>` never closed (cut off at the token limit) is all thinking; a response
    without think tags is all answer."""
    i = text.rfind("</think>")
    if i >= 0:
        return text[:i + len("</think>")], text[i + len("</think>"):]
    return (text, "") if "<think>" in text else ("", text)


def extract_answer(text, mode="last_boxed", fallbacks=()):
    """The answer a response commits to, or None. `mode` names a sequence of places to look (see
    MODES); `fallbacks` adds more ("final_answer", "answer_colon", "the_answer_is", "gsm8k",
    "last_number"). Surrounding $, \\( \\), \\[ \\], \\text{} and trailing punctuation are stripped.
    Only the answer after a thinking block counts (split_thinking): a box drafted while thinking is not
    the answer, and thinking cut off before its end has none."""
    if not isinstance(text, str) or not text:
        return None
    text = split_thinking(text[:MAX_RESPONSE_CHARS])[1]
    for where in MODES[mode] + tuple(fallbacks):
        if where in ("last_boxed", "first_boxed"):
            spans = boxed_spans(text)
            found = text[slice(*spans[-1 if where == "last_boxed" else 0])] if spans else None
        else:
            found = FALLBACKS[where](text)
        if found is not None:
            found = strip_wrappers(found)
            if found:
                return found
    return None


_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{(.*)\}", re.DOTALL)


def strip_wrappers(s):
    s = s.strip()
    for _ in range(5):
        before = s
        s = s.strip().rstrip(".,;:").strip()
        for a, b in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**")):
            if s.startswith(a) and s.endswith(b) and len(s) >= len(a) + len(b):
                s = s[len(a):len(s) - len(b)].strip()
        m = _TEXT_WRAPPER.fullmatch(s)
        if m and _closing_braces(s, m.start(1) - 1).get(m.start(1) - 1) == len(s) - 1:  # one group, not {a} x {b}
            s = m.group(1).strip()
        if s == before:
            break
    return s


# ----------------------------------------------------------------------------- normalisation

# A unit phrase must match one way only: with "sq ft" both one unit and "sq" then "ft", every repeat of it
# doubled the ways to try (a looping model's "sq ft sq ft ..." never finished). "sq ft" is two units;
# only "sq.ft", "sq. ft" and "sqft" are one.
UNITS = ("units?|square|sq|cubic|cm|centimeters?|mm|millimeters?|m|meters?|km|kilometers?|inch(?:es)?|in|feet|foot|ft|"
         "yards?|miles?|mph|hours?|hrs?|minutes?|mins?|seconds?|secs?|s|days?|weeks?|months?|years?|degrees?|"
         "dollars?|cents?|pounds?|lbs?|ounces?|oz|grams?|g|kg|kilograms?|liters?|litres?|l|ml|gallons?|people|"
         "students?|points?|ways?|times|percent|sq(?:\\.\\s*)?(?:units?|ft|in)")
_UNITS = r"(?:" + UNITS + r")(?:\s+(?:per\s+)?(?:" + UNITS + r"))*"  # two-word and compound: square units, inches per second
_UNIT_TEXT = re.compile(r"\\(?:text|textnormal|textbf|mbox|mathrm)\{\s*" + _UNITS + r"(?:\s*\^?\{?[23]\}?)?\s*\}(?:\^\{?[23]\}?)?")
_UNIT_WORD = re.compile(r"(?<=[\d}])\s*" + _UNITS + r"(?:\^?\{?[23]\}?)?\s*$")
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"), None)  # zero-width characters
_VARIABLE = r"[a-zA-Z](?:_\{?\w+\}?)?|\\[a-zA-Z]+"
_LABEL = re.compile(  # x, f(x), (p,q)
    rf"[a-zA-Z](?:_\{{?\w+\}}?)?(?:\([a-z]\))?|\\[a-zA-Z]+|\((?:(?:{_VARIABLE}),)+(?:{_VARIABLE})\)")
# normalize's rewrites, in the order it applies them
_SIZING = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])")
_SPACING = re.compile(r"\\(?:displaystyle|quad|qquad)(?![a-zA-Z])")
_FRAC_STYLE = re.compile(r"\\[dtc]frac")
_FRAC_SPACED = re.compile(r"\\frac\s*(\d)\s*(\d)")  # \frac 59, \frac 1 2
_FRAC_SPACE = re.compile(r"\\frac\s+")
_DEGREE = re.compile(r"\^\s*(?:\{\s*)?\\circ\s*\}?|\\circ|°|\\degree")  # ^{ \circ}: one way to read the blanks
_OR_AND = re.compile(r"\\(?:text|textnormal|textbf|mbox|mathrm)\{\s*(?:or|and)\s*\}"
                     r"|(?<![a-zA-Z\\])(?:or|and)(?![a-zA-Z])|;")
_TEXT = re.compile(r"\\(?:text|textnormal|textbf|mathrm|mathbf|mbox|textit|operatorname)\{([^{}]*)\}")
_FRAC_DIGITS = re.compile(r"\\frac(\d)(\d)")
_FRAC_DIGIT_BRACE = re.compile(r"\\frac(\d)\{")
_FRAC_BRACE_DIGIT = re.compile(r"\\frac\{([^{}]*)\}(\d)")
_SQRT_DIGITS = re.compile(r"\\sqrt(\d+)")
_LE = re.compile(r"\\(?:le|leq|leqslant)(?![a-zA-Z])|<=")
_GE = re.compile(r"\\(?:ge|geq|geqslant)(?![a-zA-Z])|>=")
_NE = re.compile(r"\\(?:ne|neq)(?![a-zA-Z])|!=")
_LT = re.compile(r"\\lt(?![a-zA-Z])")
_GT = re.compile(r"\\gt(?![a-zA-Z])")
_SCRIPT_SPACE = re.compile(r"([_^])(\w)\s+")
_COMMAND_SPACE = re.compile(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])")
_BLANKS = re.compile(r"\s+")
_LONE_LETTER = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z](?![a-zA-Z])")
_MEMBER = re.compile(rf"(?:{_VARIABLE})\\in(.+)")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_LEADING_POINT = re.compile(r"(?<![\d.])\.(\d)")
# A run of digits is tried from its first digit only, and the decimals kept are "up to the last non-zero
# one": a lazy \d*? before 0+ retried the zeros at every digit (quadratic on 1.000...0001, as was starting
# \d+ inside a long run of digits).
_TRAILING_ZEROS = re.compile(r"(?<!\d)(\d+\.(?:\d*[1-9])?)0+(?!\d)")
_TRAILING_POINT = re.compile(r"(\d)\.(?!\d)")
_CHOICE = re.compile(r"\(([A-Ea-e])\)")
_MIXED = re.compile(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")


def normalize(s):
    """Canonical string form of an answer (MATH `strip_string` + Minerva's normalisation)."""
    s = strip_wrappers(str(s).translate(_INVISIBLE).replace("\u2212", "-").replace("\u2013", "-"))
    s = s.replace("\n", " ").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "")
    s = _SIZING.sub("", s)
    s = _SPACING.sub(" ", s)
    s = _FRAC_STYLE.sub(r"\\frac", s).replace("\\dbinom", "\\binom").replace("\\tbinom", "\\binom")
    s = _FRAC_SPACED.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_SPACE.sub(r"\\frac", s)
    s = _DEGREE.sub("", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = _UNIT_TEXT.sub("", s)
    s = _UNIT_WORD.sub("", s)
    s = _OR_AND.sub(",", s)  # "1 or 2", "1 \text{ and } 2", "1; 2": a list of solutions
    s = _TEXT.sub(r"\1", s)
    s = s.replace("{,}", "")
    s = _FRAC_DIGITS.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_DIGIT_BRACE.sub(r"\\frac{\1}{", s)
    s = _FRAC_BRACE_DIGIT.sub(r"\\frac{\1}{\2}", s)
    s = _SQRT_DIGITS.sub(r"\\sqrt{\1}", s)
    s = _LE.sub("≤", s)
    s = _GE.sub("≥", s)
    s = _NE.sub("≠", s)
    s = _LT.sub("<", s)
    s = _GT.sub(">", s)
    s = _SCRIPT_SPACE.sub(r"\1{\2}", s)  # \log_2 8: the subscript is one character
    s = _COMMAND_SPACE.sub("\\1\0", s)  # keep "\cdot x" from becoming "\cdotx"
    s = _BLANKS.sub("", s).replace("\0", " ")
    # a leading "x =" / "f(x)=" / "\theta =" / "(p,q) =" when it is the answer's only equals sign and what
    # follows has no variable of its own (y = 2x+1 stays an equation: _equal compares it either way); "x \in"
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        if rhs and _LABEL.fullmatch(lhs) and not _LONE_LETTER.search(rhs):
            s = rhs
    m = _MEMBER.fullmatch(s)
    if m:
        s = m.group(1)
    if _THOUSANDS.fullmatch(s):  # thousands separators
        s = s.replace(",", "")
    s = _LEADING_POINT.sub(r"0.\1", s)
    s = _TRAILING_ZEROS.sub(r"\1", s)  # trailing zeros: 2.50 -> 2.5, 3.0 -> 3.
    s = _TRAILING_POINT.sub(r"\1", s)
    m = _CHOICE.fullmatch(s)  # multiple choice (C) -> C; a bare e stays Euler's number
    if m:
        s = m.group(1).upper()
    m = _MIXED.fullmatch(s)  # mixed number 2\frac{1}{2} (of a sane length: int() refuses 4,300 digits)
    if m and len(s) <= MAX_ANSWER_CHARS:
        whole, num, den = int(m.group(2)), int(m.group(3)), int(m.group(4))
        s = f"{m.group(1)}\\frac{{{whole * den + num}}}{{{den}}}"
    return s


# ----------------------------------------------------------------------------- safe LaTeX -> sympy

class ParseError(ValueError):
    pass


_TOKEN = re.compile(r"\d+\.\d*|\.\d+|\d+|\\[a-zA-Z]+|\\[{}|]|[a-zA-Z]|\S")
FUNCS = {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
         "ln", "log", "exp"}
GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "lambda",
         "mu", "nu", "xi", "rho", "sigma", "tau", "phi", "varphi", "chi", "psi", "omega", "Gamma", "Delta",
         "Theta", "Lambda", "Sigma", "Phi", "Psi", "Omega"}
SKIP = {"\\cdot": "*", "\\times": "*", "\\div": "/", "\\ast": "*"}


class Parser:
    """Recursive descent over LaTeX math, building sympy objects (never evaluating strings).

    expr := term (('+'|'-') term)* ; term := unary ((op | implicit) unary)* ; unary := ('-'|'+') unary | power
    power := postfix ('^' atom)? ; postfix := atom '!'* ; atom := number | symbol | group | command"""

    def __init__(self, text):
        import sympy
        self.sp = sympy
        self.toks = [SKIP.get(t, t) for t in _TOKEN.findall(text)]
        if len(self.toks) > 2 * MAX_ANSWER_CHARS:
            raise ParseError("too many tokens")
        self.i = 0
        self.depth = 0

    def parse(self):
        e = self.expr()
        if self.i != len(self.toks):
            raise ParseError(f"unexpected {self.toks[self.i]!r}")
        return e

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, want=None):
        t = self.peek()
        if t is None or (want is not None and t != want):
            raise ParseError(f"expected {want!r}, got {t!r}")
        self.i += 1
        return t

    def expr(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError("nesting too deep")
        e = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            t = self.term()
            e = self.sp.Add(e, t if op == "+" else -t)
        self.depth -= 1
        return e

    def term(self):
        e = self.unary()
        while True:
            t = self.peek()
            if t in ("*", "/"):
                self.take()
                rhs = self.unary()
                if t == "/":
                    if rhs == 0:
                        raise ParseError("division by zero")
                    rhs = self.sp.Pow(rhs, -1)
                e = self.sp.Mul(e, rhs)
            elif t is not None and self.starts_atom(t):
                e = self.sp.Mul(e, self.power())  # implicit multiplication: 2x, 2\pi, (a)(b)
            else:
                return e

    def starts_atom(self, t):
        return (t[0].isdigit() or t[0] == "." or t.isalpha() or t in ("(", "{", "\\{")
                or (t.startswith("\\") and t[1:] in FUNCS | GREEK | {"frac", "sqrt", "pi", "infty", "binom", "exp"}))

    def unary(self):
        if self.peek() == "-":
            self.take()
            return -self.unary()
        if self.peek() == "+":
            self.take()
            return self.unary()
        return self.power()

    def power(self):
        base = self.postfix()
        if self.peek() == "^":
            self.take()
            exp = self.unary() if self.peek() in ("-", "+") else self.postfix()
            return self.pow(base, exp)
        return base

    def postfix(self):
        e = self.atom()
        while self.peek() == "!":
            self.take()
            e = self.factorial(e)
        return e

    def pow(self, base, exp):
        sp = self.sp
        if base.is_number and exp.is_number:
            try:
                fexp = abs(float(exp))
                mag = digits(base)
            except (TypeError, OverflowError, ValueError):
                raise ParseError("exponent too large")
            if fexp * max(mag, 1.0) > MAX_DIGITS:
                raise ParseError("exponent too large")
        return sp.Pow(base, exp)

    def factorial(self, e):
        if not (e.is_Integer and 0 <= int(e) <= MAX_FACTORIAL):
            raise ParseError("factorial too large or not of a small integer")
        return self.sp.factorial(e)

    def group(self):
        """{...} or a single token argument (\\frac12 style)."""
        if self.peek() == "{":
            self.take("{")
            e = self.expr()
            self.take("}")
            return e
        return self.atom()

    def atom(self):
        sp = self.sp
        t = self.peek()
        if t is None:
            raise ParseError("unexpected end")
        if t[0].isdigit() or t[0] == ".":
            self.take()
            if "." in t:
                whole, frac = t.split(".")
                return sp.Rational(int(whole or "0") * 10 ** len(frac) + int(frac or "0"), 10 ** len(frac))
            return sp.Integer(int(t))
        if t in ("(", "[", "{", "\\{"):
            close = {"(": ")", "[": "]", "{": "}", "\\{": "\\}"}[t]
            self.take()
            e = self.expr()
            self.take(close)
            return e
        if t == "|":
            self.take()
            e = self.expr()
            self.take("|")
            return sp.Abs(e)
        if t.isalpha() and len(t) == 1:
            self.take()
            if t == "i":
                return sp.I
            if t == "e":
                return sp.E
            name = t
            if self.peek() == "_":
                self.take()
                sub = self.take() if self.peek() != "{" else self.braced_text()
                name = f"{t}_{sub}"
            return sp.Symbol(name)
        if t.startswith("\\"):
            name = t[1:]
            self.take()
            if name == "frac":
                num = self.group()
                den = self.group()
                if den == 0:
                    raise ParseError("division by zero")
                return sp.Mul(num, sp.Pow(den, -1))
            if name == "sqrt":
                if self.peek() == "[":
                    self.take("[")
                    n = self.expr()
                    self.take("]")
                    return sp.root(self.group(), n)
                return sp.sqrt(self.group())
            if name == "binom":
                n, k = self.group(), self.group()
                if n.is_number and (not n.is_Integer or abs(int(n)) > 10 * MAX_FACTORIAL):
                    raise ParseError("binomial too large")
                return sp.binomial(n, k)
            if name == "pi":
                return sp.pi
            if name == "infty":
                return sp.oo
            if name in GREEK:
                return sp.Symbol(name)
            if name in FUNCS:
                return self.function(name)
        raise ParseError(f"cannot parse {t!r}")

    def braced_text(self):
        self.take("{")
        out = []
        while self.peek() not in ("}", None):
            out.append(self.take())
        self.take("}")
        return "".join(out)

    def function(self, name):
        sp = self.sp
        power = None
        base = None
        if name == "log" and self.peek() == "_":
            self.take()
            base = self.group()
        if self.peek() == "^":
            self.take()
            power = self.group()
        arg = self.power() if self.peek() not in ("(", "{") else self.atom()
        fn = {"sin": sp.sin, "cos": sp.cos, "tan": sp.tan, "cot": sp.cot, "sec": sp.sec, "csc": sp.csc,
              "arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan, "sinh": sp.sinh, "cosh": sp.cosh,
              "tanh": sp.tanh, "ln": sp.log, "exp": sp.exp}.get(name)
        if name == "log":
            value = sp.log(arg, base) if base is not None else sp.log(arg)
        else:
            value = fn(arg)
        return self.pow(value, power) if power is not None else value


def digits(x):
    """log10 |x| for a sympy number, without computing huge values."""
    if x.is_Integer:
        return abs(int(x)).bit_length() * 0.30103
    if x.is_Rational:
        return max(abs(x.p).bit_length(), abs(x.q).bit_length()) * 0.30103
    v = abs(complex(x.evalf(15)))
    return math.log10(v) if v > 0 else 0.0


def parse_latex(s):
    """sympy object for a normalised answer string; ParseError if outside the grammar or the bounds."""
    if len(s) > MAX_ANSWER_CHARS:
        raise ParseError("answer too long")
    return Parser(s).parse()


# ----------------------------------------------------------------------------- equivalence

def split_top(s, seps=(",",)):
    """Split at separators outside (), [], {} (and \\{ \\})."""
    parts, depth, cur, i = [], 0, "", 0
    while i < len(s):
        if s.startswith("\\{", i) or s.startswith("\\}", i):
            depth += 1 if s[i + 1] == "{" else -1
            cur += s[i:i + 2]
            i += 2
            continue
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        sep = next((x for x in seps if s.startswith(x, i)), None) if depth == 0 else None
        if sep:
            parts.append(cur)
            cur = ""
            i += len(sep)
            continue
        cur += c
        i += 1
    parts.append(cur)
    if len(parts) > MAX_ITEMS:
        raise ParseError("too many items")
    return parts


def _unordered_equal(xs, ys):
    if len(xs) != len(ys):
        return False
    left = list(ys)
    for x in xs:
        j = next((j for j, y in enumerate(left) if _equal(x, y)), None)
        if j is None:
            return False
        left.pop(j)
    return True


_MATRIX = re.compile(r"\\begin\{([pbvBV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}")


def _matrix(s):
    m = _MATRIX.fullmatch(s)
    if not m:
        return None
    rows = [r for r in m.group(2).split("\\\\") if r]
    if sum(r.count("&") + 1 for r in rows) > MAX_ITEMS:
        raise ParseError("matrix too large")
    return [r.split("&") for r in rows]


def _enclosed(s):
    """(opening, inner, closing) when s is one bracketed group like (1,2] or \\{1,2\\}."""
    for o, c in (("\\{", "\\}"), ("(", ")"), ("[", "]"), ("(", "]"), ("[", ")")):
        if s.startswith(o) and s.endswith(c) and len(s) > len(o) + len(c):
            inner = s[len(o):-len(c)]
            depth = 0
            for ch in inner:
                depth += ch in "([{" and 1 or (-1 if ch in ")]}" else 0)
                if depth < 0:
                    return None
            if depth == 0:
                return o, inner, c
    return None


def _equal(a, b):
    """a, b normalised strings."""
    if a == b:
        return True
    if not a or not b:
        return False
    if "\\pm" in a or "\\pm" in b or "\\mp" in a or "\\mp" in b:
        a, b = _expand_pm(a), _expand_pm(b)
    ma, mb = _matrix(a), _matrix(b)
    if ma is not None or mb is not None:
        return (ma is not None and mb is not None and [len(r) for r in ma] == [len(r) for r in mb]
                and all(_equal(x, y) for ra, rb in zip(ma, mb) for x, y in zip(ra, rb)))
    ua, ub = split_top(a, ("\\cup",)), split_top(b, ("\\cup",))
    if len(ua) > 1 or len(ub) > 1:
        return len(ua) == len(ub) and all(_equal(x, y) for x, y in zip(ua, ub))
    ea, eb = _enclosed(a), _enclosed(b)
    set_a, set_b = bool(ea and ea[0] == "\\{"), bool(eb and eb[0] == "\\{")
    la, lb = split_top(a), split_top(b)
    if set_a != set_b:  # a set equals a list of two or more solutions, never a single value ({0} is not 0)
        items, other = (split_top(ea[1]), lb) if set_a else (split_top(eb[1]), la)
        return len(other) > 1 and _unordered_equal(items, other)
    if ea and eb and (len(split_top(ea[1])) > 1 or set_a):
        if set_a:  # sets: unordered
            return _unordered_equal(split_top(ea[1]), split_top(eb[1]))
        xs, ys = split_top(ea[1]), split_top(eb[1])  # tuples, points, intervals: ordered, brackets matter
        if (ea[0], ea[2]) == (eb[0], eb[2]) and len(xs) == len(ys) and all(map(_equal, xs, ys)):
            return True
        interval = _as_interval(b if ea[0] + ea[2] in _INTERVAL_BRACKETS else a)
        return interval is not None and _equal(interval, a if ea[0] + ea[2] in _INTERVAL_BRACKETS else b)
    if len(la) > 1 or len(lb) > 1:  # a list of solutions: unordered
        return _unordered_equal(la, lb)
    for side, other in ((a, eb), (b, ea)):  # an inequality against the interval it describes
        if other and other[0] + other[2] in _INTERVAL_BRACKETS and len(split_top(other[1])) == 2:
            interval = _as_interval(side)
            if interval is not None:
                return _equal(interval, b if side is a else a)
    for ops in (("=",), ("≤", "≥", "<", ">", "≠")):
        sa, sb = _relation(a, ops), _relation(b, ops)
        if ops == ("=",) and bool(sa) != bool(sb):  # y = 2x+1 against 2x+1: the labelled side's value
            labelled = sa or sb
            return bool(_LABEL.fullmatch(labelled[0])) and _equal(*((labelled[2], b) if sa else (a, labelled[2])))
        if sa or sb:
            if not (sa and sb and sa[1] == sb[1]):
                return False
            return (_equal(sa[0], sb[0]) and _equal(sa[2], sb[2])) or _proportional(sa, sb)
    return _scalar_equal(a, b)


def _expand_pm(s):
    """`a \\pm b` as the list "a+b,a-b" (one \\pm or \\mp at most; else unchanged)."""
    if s.count("\\pm") + s.count("\\mp") != 1:
        return s
    sign = ("+", "-") if "\\pm" in s else ("-", "+")
    op = "\\pm" if "\\pm" in s else "\\mp"
    return ",".join(s.replace(op, x, 1) for x in sign)


_INTERVAL_BRACKETS = ("()", "[]", "(]", "[)")
# DOTALL: (.+) always reaches the end, so a failed fullmatch is never retried from each bound (quadratic
# on a long text ending in a newline; normalised answers hold no newline, so verdicts are the same)
_CHAIN = re.compile(rf"(.+?)([<≤>≥])(?:{_VARIABLE})([<≤>≥])(.+)", re.DOTALL)
_ONE_SIDED = re.compile(rf"({_VARIABLE})([<≤>≥])(.+)|(.+?)([<≤>≥])({_VARIABLE})", re.DOTALL)


def _as_interval(s):
    """The interval a one-variable inequality describes, as a normalised string: x<3 -> (-\\infty,3),
    -2≤x≤7 -> [-2,7], 5>x -> (-\\infty,5); None for anything else."""
    low = {"<": "(", "≤": "["}
    high = {"<": ")", "≤": "]"}
    flip = {">": "<", "≥": "≤"}
    m = _CHAIN.fullmatch(s)
    if m and (m.group(2) in low) == (m.group(3) in low):  # a chain, both one way
        lo, op1, op2, hi = m.group(1), m.group(2), m.group(3), m.group(4)
        if op1 in flip:
            lo, hi, op1, op2 = hi, lo, flip[op2], flip[op1]
        return f"{low[op1]}{lo},{hi}{high[op2]}"
    m = _ONE_SIDED.fullmatch(s)
    if not m:
        return None
    if m.group(1):
        op, bound = m.group(2), m.group(3)
    else:  # 3 > x reads x < 3
        op, bound = {"<": ">", "≤": "≥", ">": "<", "≥": "≤"}[m.group(5)], m.group(4)
    if op in low:
        return f"(-\\infty,{bound}{high[op]}"
    return f"{low[flip[op]]}{bound},\\infty)"


def _relation(s, ops):
    """(lhs, op, rhs) with > and >= flipped into < and <=, or None."""
    for op in ops:
        parts = split_top(s, (op,))
        if len(parts) == 2:
            lhs, rhs = parts
            flip = {">": "<", "≥": "≤"}
            return (rhs, flip[op], lhs) if op in flip else (lhs, op, rhs)
    return None


def _proportional(ra, rb):
    """Two relations of the same kind whose sides differ, as the same relation: lhs - rhs of one is a
    constant non-zero multiple of the other's (2x+4y-3=0 and y=-x/2+3/4), positive for < and ≤ (so -x<-1
    is not x<1 but -x>-1 is). Checked at random points of the free symbols."""
    da = parse_latex(ra[0]) - parse_latex(ra[2])
    db = parse_latex(rb[0]) - parse_latex(rb[2])
    symbols = sorted(da.free_symbols | db.free_symbols, key=str)
    if not symbols:
        return False
    ratios = []
    for point in _points(symbols, seed=1, exact=True):
        try:
            u, v = complex(da.subs(point).evalf(30)), complex(db.subs(point).evalf(30))
        except (TypeError, ValueError, ZeroDivisionError):
            continue
        if abs(v) < 1e-9 or abs(u) < 1e-9:
            continue
        ratios.append(u / v)
        if len(ratios) >= 5:
            break
    if len(ratios) < 3 or any(abs(r.imag) > 1e-9 for r in ratios):
        return False
    first = ratios[0].real
    same = all(abs(r.real - first) <= 1e-6 * max(1.0, abs(first)) for r in ratios)
    return same and (first > 0 or ra[1] in ("=", "≠"))


def _points(symbols, seed, exact=False, tries=12):
    """`tries` random points in [0.5, 2.5] for `symbols` (exact tenths with `exact`), the same ones for a
    given seed: where expressions with free symbols are compared numerically."""
    import sympy
    rng = random.Random(seed)
    for _ in range(tries):
        yield {s: sympy.Rational(rng.randint(5, 25), 10) if exact else rng.uniform(0.5, 2.5) for s in symbols}


_DECIMAL_POINT = re.compile(r"\d\.\d")
_DECIMAL = re.compile(r"-?\d*\.\d+")
_BASE = re.compile(r"\d+_\{?\d+\}?")  # 1011_2: digits + base


def _has_decimal(s):
    return bool(_DECIMAL_POINT.search(s))


def _places(decimal):
    return len(decimal.split(".")[1])


def _rounds_to(decimal, value, value_text=None):
    """A decimal someone wrote matches a value when the value, rounded to the decimal's number of places,
    is that decimal: 0.3333 matches 1/3 and 3.14 matches pi, but 9999.857 does not match 10000 and
    4.0000000001 does not match 4. (`value_text`: the value's own decimal form, when it has one.)"""
    from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
    import sympy
    places = _places(decimal)
    try:
        exact = Decimal(value_text) if value_text else Decimal(str(sympy.N(value, places + 25)))
        return exact.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP) == Decimal(decimal)
    except (InvalidOperation, ValueError, TypeError):
        return False


def _scalar_equal(a, b):
    """Numbers and expressions: exact rationals, else numerically close (at random points when free
    symbols remain)."""
    if _BASE.fullmatch(a) or _BASE.fullmatch(b):
        return a.replace("{", "").replace("}", "").split("_")[0] == b.replace("{", "").replace("}", "").split("_")[0]
    if a.isalpha() and b.isalpha() and max(len(a), len(b)) >= 3:  # words (Monday, yes), not products (ab)
        return a.lower() == b.lower()
    x, y = parse_latex(a), parse_latex(b)
    if x.is_Rational and y.is_Rational and not (_has_decimal(a) or _has_decimal(b)):
        return x == y
    da, db = _DECIMAL.fullmatch(a), _DECIMAL.fullmatch(b)
    if (da or db) and x.is_number and y.is_number:  # a is the prediction, b the gold answer
        if da and db:  # a rounded gold: the prediction may give more places, not fewer
            return _places(a) >= _places(b) and _rounds_to(b, x, a)
        return _rounds_to(a, y) if da else _rounds_to(b, x)
    tol = 1e-4 if _has_decimal(a) or _has_decimal(b) else 1e-6
    symbols = sorted(x.free_symbols | y.free_symbols, key=str)
    if not symbols:
        return _close(x, y, tol)
    tried = 0
    for point in _points(symbols, seed=0):
        try:
            ok = _close(x.subs(point), y.subs(point), tol)
        except ParseError:
            continue
        tried += 1
        if not ok:
            return False
        if tried >= 5:
            return True
    return False


def _close(x, y, tol):
    if x == y:
        return True
    import sympy
    if x.has(sympy.oo, -sympy.oo, sympy.zoo) or y.has(sympy.oo, -sympy.oo, sympy.zoo):
        return False
    try:
        u, v = complex(x.evalf(30)), complex(y.evalf(30))
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        raise ParseError("not a finite number")
    if any(map(math.isnan, (u.real, u.imag, v.real, v.imag))) or any(map(math.isinf, (u.real, v.real))):
        raise ParseError("not a finite number")
    return abs(u - v) <= tol * max(abs(u), abs(v), 1e-12) or abs(u - v) < 1e-12


def is_equiv(pred, gold):
    """True when answer `pred` is mathematically equivalent to `gold` (both answer strings, not
    responses). A gold answer that cannot be parsed matches only a textually identical prediction.
    The same comparison as every verdict (see compare)."""
    return compare(pred, gold).correct


# ----------------------------------------------------------------------------- verdicts

@dataclass
class Verdict:
    correct: bool
    answer: str | None  # the extracted answer, None when there was none
    status: str         # correct | incorrect | no_answer | unparseable | timeout
    reason: str = ""


def compare(answer, gold):
    """The verdict on an extracted answer against a gold answer: the one comparison behind grade,
    grade_batch, is_equiv, eval.py and the RL reward (computed in this process, with no time limit)."""
    b = None if gold is None else normalize(str(gold))
    if not b:
        return Verdict(False, answer, "unparseable", "empty or missing gold answer")
    if answer is None:
        return Verdict(False, None, "no_answer", "no answer found")
    answer = str(answer)
    if len(answer) > MAX_BOXED_CHARS:
        return Verdict(False, answer[:200], "unparseable", f"answer longer than {MAX_BOXED_CHARS} characters")
    try:
        ok = _equal(normalize(answer), b)
        return Verdict(ok, answer, "correct" if ok else "incorrect")
    except ParseError as e:
        return Verdict(False, answer, "unparseable", str(e))
    except RecursionError:
        return Verdict(False, answer, "unparseable", "nesting too deep")
    except Exception as e:  # sympy raises many kinds on odd input; none may crash a training run
        return Verdict(False, answer, "unparseable", f"{type(e).__name__}: {e}"[:200])


def _verdict(response, gold, mode="last_boxed"):
    """The verdict on a response, in this process, with no time limit (grade() adds one)."""
    return compare(extract_answer(response, mode), gold)


def _verdict_dict(response, gold, mode):
    return asdict(_verdict(response, gold, mode))


WORKER_MEMORY = 2 << 30  # bytes of address space a worker may map (RLIMIT_AS); it maps ~60 MB with sympy loaded
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # this container's CPU quota (cgroup v2), where it has one
_HERE = os.path.dirname(os.path.abspath(__file__))  # the project folder, where workers import verifier from


def default_workers():
    """Worker processes for grade_batch: the CPUs this process may use (its affinity mask, capped by its
    cgroup's CPU quota) shared among the ranks torchrun started on this machine (LOCAL_WORLD_SIZE), at
    least one. os.cpu_count() counts every core of the machine: 8 ranks on a 128-core node would start
    1,024 workers (~50 MB each), and under that contention correct answers would time out (reward 0)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open(CGROUP_CPU_MAX) as f:
            quota, period = f.read().split()  # "max 100000": no quota; "200000 100000": 2 CPUs
        if quota != "max":
            cpus = min(cpus, int(quota) // int(period))
    except (OSError, ValueError):  # no cgroup v2 quota to read here: the affinity mask decides
        pass
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1)))


def _serve(read_fd, write_fd, cpu_seconds):
    """Worker loop: receive (fn, args), send fn(*args). Runs in a fresh interpreter, so it never
    re-imports the caller's __main__ (as multiprocessing's spawn would) and never inherits locks
    or threads from a forked parent.

    It limits itself before the first job: WORKER_MEMORY of address space (sympy asked for something huge
    fails with MemoryError, which compare reports as unparseable, or the worker dies and the caller reports
    a timeout; the machine never swaps) and no core file. The caller's wall-clock timeout is what bounds a
    job; RLIMIT_CPU is the backstop for a worker stuck in a job whose caller is gone (killed with SIGKILL,
    so nobody kills the worker): the kernel ends it (SIGXCPU) after `cpu_seconds` more of CPU time. That
    limit counts CPU time over the process's whole life, so it is moved before each job to the time used
    so far plus `cpu_seconds`: a fixed one would end a long-lived worker after its first thousands of jobs."""
    import resource
    from multiprocessing.connection import Connection
    _soft_limit(resource.RLIMIT_AS, WORKER_MEMORY)
    _soft_limit(resource.RLIMIT_CORE, 0)
    sys.setrecursionlimit(10_000)
    reader, writer = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    import sympy  # noqa: F401  (imported before "ready", so start-up never counts against a verdict)
    writer.send("ready")
    while True:
        try:
            fn, args = reader.recv()
        except EOFError:
            return
        used = resource.getrusage(resource.RUSAGE_SELF)
        _soft_limit(resource.RLIMIT_CPU, math.ceil(used.ru_utime + used.ru_stime) + cpu_seconds)
        writer.send(fn(*args))


def _soft_limit(kind, value):
    """Set the soft resource limit `kind` to `value`, or to the hard limit where that is lower (a process
    cannot pass its hard limit)."""
    import resource
    hard = resource.getrlimit(kind)[1]
    resource.setrlimit(kind, (value if hard == resource.RLIM_INFINITY else min(value, hard), hard))


@dataclass
class Timeout:
    why: str


class Pool:
    """Worker processes that each run `fn(*job)` for one job at a time. A worker that overruns
    `timeout` seconds is killed and replaced, as is one that dies (killed, or at a limit _serve sets), and
    that job's result is a `Timeout`."""

    def __init__(self, workers=1, timeout=1.0, fn=_verdict_dict):
        self.timeout, self.fn = timeout, fn
        self.procs = [self._start() for _ in range(max(1, workers))]

    def _start(self):
        import subprocess
        from multiprocessing.connection import Connection
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # -I keeps the working directory (and PYTHONPATH, the user's site-packages) off the worker's sys.path,
        # so a verifier.py, sympy.py or json.py lying there never runs in a worker. The worker gets the
        # project folder and this process's absolute sys.path instead, and imports what this process does
        # ('' and relative entries, which name the working directory, are left out). CPU time per job: a
        # worker runs one thread, so ceil(timeout) + 1 seconds of it never end a job the caller waits for.
        path = [_HERE] + [p for p in sys.path if os.path.isabs(p)]
        code = (f"import sys; sys.path[:0] = {path!r}; import verifier; "
                f"verifier._serve({to_child_r}, {from_child_w}, {math.ceil(self.timeout) + 1})")
        p = subprocess.Popen([sys.executable, "-I", "-c", code], pass_fds=(to_child_r, from_child_w),
                             stdin=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        conns = (Connection(to_child_w, readable=False), Connection(from_child_r, writable=False))
        try:
            ready = conns[1].poll(120) and conns[1].recv() == "ready"
        except EOFError:
            ready = False
        if not ready:
            self._stop(p, conns)
            raise RuntimeError(f"verifier worker process did not start ({sys.executable} -I, import verifier)")
        return p, conns

    def map(self, jobs):
        import time
        from multiprocessing.connection import wait
        results = [None] * len(jobs)
        todo = list(range(len(jobs)))[::-1]
        busy = {}  # worker index -> (job index, deadline)
        while todo or busy:
            for w in range(len(self.procs)):
                if w not in busy and todo:
                    j = todo.pop()
                    try:
                        self.procs[w][1][0].send((self.fn, jobs[j]))
                    except OSError:  # the worker died between jobs
                        self._restart(w)
                        self.procs[w][1][0].send((self.fn, jobs[j]))
                    busy[w] = (j, time.monotonic() + self.timeout)
            conns = {self.procs[w][1][1]: w for w in busy}
            nearest = min(d for _, d in busy.values())
            for c in wait(list(conns), timeout=max(0.0, nearest - time.monotonic())):
                w = conns[c]
                try:
                    results[busy[w][0]] = c.recv()
                except (EOFError, OSError):  # the worker died mid-job (e.g. out of memory)
                    results[busy[w][0]] = Timeout("worker died")
                    self._restart(w)
                del busy[w]
            now = time.monotonic()
            for w, (j, deadline) in list(busy.items()):
                if now >= deadline:
                    results[j] = Timeout(f"over {self.timeout:g} s")
                    self._restart(w)
                    del busy[w]
        return results

    def _restart(self, w):
        self._stop(*self.procs[w])
        self.procs[w] = self._start()

    @staticmethod
    def _stop(p, conns):
        p.kill()
        p.wait()
        for c in conns:
            c.close()

    def close(self):
        for p, conns in self.procs:
            self._stop(p, conns)


_pools = {}


def _pool(workers, timeout):
    key = (workers, timeout)
    if key not in _pools:
        _pools[key] = Pool(workers, timeout)
    return _pools[key]


def grade(response, gold, mode="last_boxed", timeout=1.0):
    """Verdict for one response against a gold answer, within `timeout` seconds of wall clock
    (None: in this process, no limit)."""
    if timeout is None:
        return _verdict(response, gold, mode)
    return grade_batch([response], [gold], mode, workers=1, timeout=timeout)[0]


def grade_batch(responses, golds, mode="last_boxed", workers=None, timeout=1.0):
    """Verdicts for many responses, spread over `workers` processes (default: default_workers()). A verdict
    that runs out of time keeps the answer extracted here (extraction is linear-time, safe in this process)."""
    if len(responses) != len(golds):
        raise ValueError(f"grade_batch: {len(responses)} responses but {len(golds)} gold answers")
    workers = workers or default_workers()
    out = _pool(workers, timeout).map([(r, g, mode) for r, g in zip(responses, golds)])
    return [Verdict(False, extract_answer(r, mode), "timeout", x.why) if isinstance(x, Timeout) else Verdict(**x)
            for r, x in zip(responses, out)]


# ----------------------------------------------------------------------------- behaviour proxies

# Keyword proxies for the behaviours RLSP is about. They count phrases, not reasoning: a response
# that says "wait" has not necessarily backtracked. Reported as rates of responses with any match.
BEHAVIOURS = {
    "backtracking": re.compile(r"\b(wait|actually|hmm|let me re-?(?:think|consider|evaluate|do)|i made a mistake|"
                               r"that's (?:not right|wrong|incorrect)|on second thought|scratch that)\b", re.I),
    "verification": re.compile(r"\b(let me (?:check|verify|double-check)|double-check|verif(?:y|ying|ication)|"
                               r"check(?:ing)? (?:our|my|the) (?:answer|work|result)|plug(?:ging)? (?:it |this )?back|"
                               r"substitut(?:e|ing) back|sanity check)\b", re.I),
    "alternatives": re.compile(r"\b(alternatively|another (?:approach|way|method)|a different (?:approach|way|method)|"
                               r"let(?:'s| us| me) try (?:a different|another))\b", re.I),
}


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    from cli import Parser, number, positive
    p = Parser(description="Grade a JSONL file of responses against gold answers.")
    p.add_argument("file", help="a JSONL file, one response and its gold answer per line")
    p.add_argument("--response-field", default="response", help="the response's field")
    p.add_argument("--answer-field", default="answer", help="the gold answer's field")
    p.add_argument("--mode", default="last_boxed", choices=sorted(MODES), help="how the answer is extracted")
    p.add_argument("--timeout", type=number(float, 0, low_open=True), default=1.0, help="seconds per verdict")
    p.add_argument("--workers", type=positive, default=None,
                   help="worker processes (default: the CPUs this process may use, over torchrun's local ranks)")
    p.add_argument("--out", default=None, help="where the verdicts go (default: FILE with .verdicts.jsonl)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.file):
        raise FileNotFoundError(f"{args.file} not found")
    rows = []
    with open(args.file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{args.file}:{n}: not valid JSON ({e.msg})") from None
            for k in (args.response_field, args.answer_field):
                if not isinstance(row, dict) or k not in row:
                    raise ValueError(f"{args.file}:{n}: missing field {k!r}")
            rows.append(row)
    verdicts = grade_batch([r[args.response_field] for r in rows], [r[args.answer_field] for r in rows],
                           args.mode, args.workers, args.timeout)
    out = args.out or args.file.removesuffix(".jsonl") + ".verdicts.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for v in verdicts:
            f.write(json.dumps(asdict(v)) + "\n")
    counts = {s: sum(v.status == s for v in verdicts) for s in STATUSES}
    n = max(len(verdicts), 1)
    print(f"{len(verdicts)} graded: accuracy {counts['correct'] / n:.4f} | " +
          " ".join(f"{s} {c}" for s, c in counts.items()) + f" | verdicts in {out}")


if __name__ == "__main__":
    import cli
    import verifier  # run as the importable module, so worker processes can unpickle its functions
    cli.run(verifier.main)
