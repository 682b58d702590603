"""verifier.py: equivalence tables, extraction, real datasets, adversarial inputs, throughput, CLI."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import verifier
from verifier import extract_answer, grade, grade_batch, is_equiv, normalize, split_thinking

# (category, prediction, gold, expected)
EQUIV = [
    # integers
    ("int", "42", "42", True), ("int", "042", "42", True), ("int", "-7", "-7", True), ("int", "+5", "5", True),
    ("int", "42", "43", False), ("int", "-7", "7", False), ("int", "0", "-0", True), ("int", "10", "1", False),
    # decimals
    ("decimal", "0.5", "0.50", True), ("decimal", ".5", "0.5", True), ("decimal", "2.50", "2.5", True),
    ("decimal", "3.0", "3", True), ("decimal", "3.14", "3.15", False), ("decimal", "0.3333", "\\frac{1}{3}", True),
    ("decimal", "0.33", "\\frac{1}{3}", True), ("decimal", "1.25", "\\frac54", True), ("decimal", "0.1", "0.01", False),
    ("decimal", "12.000", "12", True),
    # fractions
    ("frac", "\\frac{1}{2}", "0.5", True), ("frac", "\\frac12", "\\frac{1}{2}", True), ("frac", "\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("frac", "\\tfrac{3}{4}", "0.75", True), ("frac", "1/2", "\\frac{1}{2}", True), ("frac", "\\frac{2}{4}", "\\frac{1}{2}", True),
    ("frac", "\\frac{1}{3}", "\\frac{1}{2}", False), ("frac", "-\\frac{1}{2}", "\\frac{-1}{2}", True),
    ("frac", "\\frac{1}{2}", "-\\frac{1}{2}", False), ("frac", "\\frac{10}{3}", "\\frac{3}{10}", False),
    ("frac", "\\frac{x}{2}", "\\frac{1}{2}x", True), ("frac", "\\frac{x+1}{2}", "\\frac{x}{2}+1", False),
    # mixed numbers
    ("mixed", "2\\frac{1}{2}", "\\frac{5}{2}", True), ("mixed", "2\\frac{1}{2}", "2.5", True),
    ("mixed", "1\\frac{3}{4}", "\\frac{7}{4}", True), ("mixed", "2\\frac{1}{2}", "1", False),
    ("mixed", "3\\frac{1}{3}", "\\frac{10}{3}", True), ("mixed", "3\\frac{1}{3}", "\\frac{11}{3}", False),
    # radicals
    ("radical", "\\sqrt{2}", "\\sqrt2", True), ("radical", "2\\sqrt{2}", "\\sqrt{8}", True),
    ("radical", "\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True), ("radical", "\\sqrt{3}", "\\sqrt{2}", False),
    ("radical", "\\sqrt[3]{8}", "2", True), ("radical", "\\sqrt[3]{9}", "3", False), ("radical", "3\\sqrt{5}", "\\sqrt{45}", True),
    ("radical", "\\sqrt{12}", "3\\sqrt{2}", False), ("radical", "\\frac{3+\\sqrt{5}}{2}", "\\frac{3}{2}+\\frac{\\sqrt{5}}{2}", True),
    ("radical", "\\frac{3-\\sqrt{5}}{2}", "\\frac{3+\\sqrt{5}}{2}", False),
    # powers
    ("power", "2^{10}", "1024", True), ("power", "2^10", "1024", True), ("power", "x^2", "x\\cdot x", True),
    ("power", "x^{2}", "x^3", False), ("power", "2^{-1}", "\\frac{1}{2}", True), ("power", "(x+1)^2", "x^2+2x+1", True),
    ("power", "(x+1)^2", "x^2+1", False), ("power", "4^{1/2}", "2", True), ("power", "10^{3}", "1000", True),
    ("power", "3^4", "81", True), ("power", "3^4", "64", False),
    # pi, e
    ("const", "2\\pi", "2 \\pi", True), ("const", "\\pi", "3.14159", True), ("const", "\\frac{\\pi}{2}", "\\frac{1}{2}\\pi", True),
    ("const", "\\pi", "3", False), ("const", "e^2", "e\\cdot e", True), ("const", "e", "2.71828", True),
    ("const", "2\\pi", "\\pi", False), ("const", "\\pi r^2", "r^2\\pi", True), ("const", "e^{2}", "e^{3}", False),
    # complex
    ("complex", "3+4i", "4i+3", True), ("complex", "i", "\\sqrt{-1}", True), ("complex", "1-i", "1+i", False),
    ("complex", "-i", "i", False), ("complex", "\\frac{1}{2}+\\frac{\\sqrt{3}}{2}i", "\\frac{1+i\\sqrt{3}}{2}", True),
    ("complex", "2i", "i+i", True), ("complex", "3-4i", "3+4i", False),
    # trig and logs
    ("trig", "\\sin(\\frac{\\pi}{6})", "\\frac{1}{2}", True), ("trig", "\\cos 0", "1", True), ("trig", "\\tan(\\frac{\\pi}{4})", "1", True),
    ("trig", "\\sin^2 x + \\cos^2 x", "1", True), ("trig", "\\sin x", "\\cos x", False), ("trig", "\\sin(\\frac{\\pi}{6})", "\\frac{\\sqrt{3}}{2}", False),
    ("trig", "\\arctan 1", "\\frac{\\pi}{4}", True), ("trig", "\\sec x", "\\frac{1}{\\cos x}", True),
    ("log", "\\log_2 8", "3", True), ("log", "\\ln e", "1", True), ("log", "\\log_2 8", "4", False), ("log", "\\ln(e^3)", "3", True),
    ("log", "\\log_3 81", "4", True), ("log", "2\\ln 2", "\\ln 4", True), ("log", "\\ln 2", "\\ln 3", False),
    # binomials
    ("binom", "\\binom{5}{2}", "10", True), ("binom", "\\dbinom{6}{3}", "20", True), ("binom", "\\binom{5}{2}", "\\binom{5}{3}", True),
    ("binom", "\\binom{5}{2}", "5", False), ("binom", "\\tbinom{4}{2}", "6", True), ("binom", "\\binom{7}{1}", "6", False),
    # factorials
    ("factorial", "5!", "120", True), ("factorial", "5!", "24", False), ("factorial", "\\frac{6!}{4!}", "30", True),
    ("factorial", "3!\\cdot 2!", "12", True), ("factorial", "0!", "1", True), ("factorial", "4!", "4", False),
    # scientific notation
    ("sci", "3\\times10^{5}", "300000", True), ("sci", "3 \\times 10^5", "300000", True), ("sci", "1.5\\times10^{3}", "1500", True),
    ("sci", "3\\times10^{5}", "30000", False), ("sci", "2.5\\times 10^{-2}", "0.025", True), ("sci", "6.02\\times10^{23}", "6.02\\times10^{22}", False),
    # percentages
    ("percent", "50\\%", "50", True), ("percent", "50%", "50", True), ("percent", "50\\%", "5", False), ("percent", "12.5\\%", "12.5", True),
    ("percent", "25\\%", "30\\%", False), ("percent", "100\\%", "100", True),
    # degrees
    ("degree", "30^\\circ", "30", True), ("degree", "30^{\\circ}", "30", True), ("degree", "45^\\circ", "30", False),
    ("degree", "90°", "90", True), ("degree", "120^\\circ", "120^{\\circ}", True), ("degree", "60\\text{ degrees}", "60", True),
    ("degree", "60^\\circ", "120^\\circ", False),
    # units and text wrappers
    ("units", "5\\text{ cm}", "5", True), ("units", "12 \\text{ inches}", "12", True), ("units", "\\$18.90", "18.90", True),
    ("units", "7\\text{ units}", "8", False), ("units", "15 \\mbox{ cm}^2", "15", True), ("units", "3\\text{ feet}", "3", True),
    ("units", "100 \\text{ dollars}", "10", False), ("units", "4\\text{ hours}", "4", True),
    # thousands separators
    ("thousands", "1,000", "1000", True), ("thousands", "1{,}000", "1000", True), ("thousands", "12,345,678", "12345678", True),
    ("thousands", "1,000", "100", False), ("thousands", "1,000,000", "10^6", True), ("thousands", "2,500.5", "2500.5", True),
    # leading variable
    ("leading_var", "x=5", "5", True), ("leading_var", "x = 5", "5", True), ("leading_var", "y=2x+1", "2x+1", True),
    ("leading_var", "x=5", "6", False), ("leading_var", "k = \\frac{1}{2}", "0.5", True), ("leading_var", "f(x)=x^2", "x^2", True),
    ("leading_var", "\\theta = 30^\\circ", "30", True), ("leading_var", "a=3", "b=3", True),
    # equations
    ("equation", "y = 2x+1", "2x+1", True), ("equation", "y=2x+1", "y=1+2x", True), ("equation", "y=2x+1", "y=2x-1", False),
    ("equation", "x+y=5", "y+x=5", True), ("equation", "x+y=5", "x-y=5", False), ("equation", "x^2+y^2=1", "y^2+x^2=1", True),
    ("equation", "2x+3y=6", "3y+2x=6", True), ("equation", "y=x", "y=-x", False),
    # inequalities
    ("inequality", "x<3", "x < 3", True), ("inequality", "x\\le 3", "x\\leq3", True), ("inequality", "x>2", "2<x", True),
    ("inequality", "x\\geq 2", "2\\leq x", True), ("inequality", "x<3", "x\\le3", False), ("inequality", "x<3", "x>3", False),
    ("inequality", "x<\\frac{1}{2}", "x<0.5", True), ("inequality", "x\\ne 1", "x\\neq 1", True),
    # intervals
    ("interval", "(1,2)", "(1,2)", True), ("interval", "[1,2]", "[1, 2]", True), ("interval", "(1,2]", "(1,2)", False),
    ("interval", "[1,2)", "(1,2)", False), ("interval", "(-\\infty, 3)", "(-\\infty,3)", True), ("interval", "(-\\infty, 3]", "(-\\infty,3)", False),
    ("interval", "(0,\\infty)", "(0, \\infty)", True), ("interval", "(-\\infty,0)\\cup(1,\\infty)", "(-\\infty, 0) \\cup (1, \\infty)", True),
    ("interval", "(-\\infty,0)\\cup(1,\\infty)", "(-\\infty,0)\\cup[1,\\infty)", False), ("interval", "[\\frac{1}{2}, 3)", "[0.5,3)", True),
    ("interval", "(1,2)\\cup(3,4)", "(1,2)", False), ("interval", "\\left[ 2, 5 \\right)", "[2,5)", True),
    # sets (unordered)
    ("set", "\\{1,2,3\\}", "\\{3,2,1\\}", True), ("set", "\\{1,2\\}", "\\{1,2,3\\}", False), ("set", "\\{1,2\\}", "\\{1,3\\}", False),
    ("set", "\\{\\frac12, 2\\}", "\\{2, 0.5\\}", True), ("set", "\\{-1, 1\\}", "\\{1, -1\\}", True), ("set", "\\{1,1,2\\}", "\\{1,2,2\\}", False),
    # lists of solutions (unordered)
    ("list", "1, 2", "2, 1", True), ("list", "1,2,3", "3,1,2", True), ("list", "1, 2", "1, 3", False),
    ("list", "-2, 3", "3, -2", True), ("list", "\\sqrt{2}, -\\sqrt{2}", "-\\sqrt2,\\sqrt2", True), ("list", "1, 2", "1", False),
    ("list", "x=1, x=2", "1, 2", True), ("list", "1,-1", "-1,1", True),
    # tuples / points (ordered)
    ("tuple", "(1,2)", "(2,1)", False), ("tuple", "(1, 2, 3)", "(1,2,3)", True), ("tuple", "(\\frac{1}{2}, 3)", "(0.5, 3)", True),
    ("tuple", "(1,2,3)", "(1,2)", False), ("tuple", "(-1, \\sqrt{3})", "(-1,\\sqrt3)", True), ("tuple", "(3, -4)", "(3,4)", False),
    ("tuple", "(0, 0)", "(0,0)", True),
    # vectors and matrices
    ("matrix", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("matrix", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}", False),
    ("matrix", "\\begin{pmatrix} 1 & 0 \\\\ 0 & 1 \\end{pmatrix}", "\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}", True),
    ("matrix", "\\begin{pmatrix} \\frac{1}{2} \\\\ 0.25 \\end{pmatrix}", "\\begin{pmatrix} 0.5 \\\\ \\frac14 \\end{pmatrix}", True),
    ("matrix", "\\begin{pmatrix} 1 & 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),
    ("matrix", "\\begin{bmatrix} 1 & 2 \\\\ 3 & 4 \\end{bmatrix}", "\\begin{bmatrix} 1 & 2 \\\\ 3 & 5 \\end{bmatrix}", False),
    ("matrix", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "(1,2)", False),
    # base subscripts
    ("base", "1011_2", "1011_2", True), ("base", "1011_{2}", "1011_2", True), ("base", "1011", "1011_2", True),
    ("base", "1010_2", "1011_2", False), ("base", "11", "1011_2", False), ("base", "2A_{16}", "2A_{16}", True),
    # text answers
    ("text", "\\text{Monday}", "Monday", True), ("text", "monday", "\\text{Monday}", True), ("text", "Tuesday", "Monday", False),
    ("text", "\\text{(C)}", "C", True), ("text", "(C)", "\\text{(C)}", True), ("text", "(B)", "(C)", False),
    ("text", "\\textbf{yes}", "yes", True), ("text", "no", "yes", False), ("text", "\\text{even}", "\\text{odd}", False),
    ("text", "C", "(C)", True),
    # expressions
    ("expr", "2x+3", "3+2x", True), ("expr", "x^2-1", "(x-1)(x+1)", True), ("expr", "2(x+1)", "2x+2", True),
    ("expr", "2x+3", "2x-3", False), ("expr", "ab", "ba", True), ("expr", "a+b", "ab", False),
    ("expr", "\\frac{x^2-1}{x-1}", "x+1", True), ("expr", "x_1+x_2", "x_2+x_1", True), ("expr", "x_1", "x_2", False),
    ("expr", "\\alpha+\\beta", "\\beta+\\alpha", True), ("expr", "|x-1|", "|1-x|", True), ("expr", "|-3|", "3", True),
    # more of each, from MATH-style answers
    ("frac", "\\frac{7}{2}", "3.5", True), ("frac", "\\frac{22}{7}", "\\pi", False), ("frac", "\\frac{-3}{4}", "-0.75", True),
    ("radical", "\\sqrt{50}", "5\\sqrt{2}", True), ("radical", "4\\sqrt{3}", "\\sqrt{48}", True), ("radical", "\\sqrt{2}+\\sqrt{3}", "\\sqrt{5}", False),
    ("power", "x^{-2}", "\\frac{1}{x^2}", True), ("power", "2^{3}\\cdot 2^{2}", "2^5", True), ("power", "2^{3}\\cdot 2^{2}", "2^6", False),
    ("const", "\\frac{4}{3}\\pi", "\\frac{4\\pi}{3}", True), ("const", "\\pi^2", "2\\pi", False),
    ("trig", "\\cos^2 x", "1-\\sin^2 x", True), ("trig", "\\cos(\\pi)", "1", False),
    ("int", "1000000", "10^6", True), ("int", "999", "1000", False),
    ("tuple", "(2, \\frac{\\pi}{3})", "(2,\\frac{\\pi}{3})", True), ("tuple", "(2, \\frac{\\pi}{3})", "(2,\\frac{2\\pi}{3})", False),
    ("set", "\\{0\\}", "\\{0\\}", True), ("set", "\\{0\\}", "0", False),
    ("expr", "x^3+3x^2+3x+1", "(x+1)^3", True), ("expr", "(x+1)^3", "x^3+1", False), ("expr", "\\frac{a}{b}", "a b^{-1}", True),
    ("sci", "5\\times10^{-3}", "0.005", True), ("sci", "5\\times10^{-3}", "0.05", False),
    ("percent", "0.5\\%", "0.5", True), ("percent", "150\\%", "15", False),
    ("log", "\\log_{10} 1000", "3", True), ("log", "\\log_{10} 100", "3", False),
    # abs and misc arithmetic
    ("arith", "2\\cdot 3", "6", True), ("arith", "2\\times 3", "6", True), ("arith", "6\\div 2", "3", True), ("arith", "(2)(3)", "6", True),
    ("arith", "2\\cdot 3", "5", False), ("arith", "\\frac{1}{0}", "1", False), ("arith", "", "1", False), ("arith", "1", "", False),
    # forms real models and real gold answers use (issue 13); each category has positives and negatives
    ("frac-space", "\\frac{5}{9}", "\\frac 59", True), ("frac-space", "\\frac{3}{4}", "\\frac 34", True),
    ("frac-space", "\\frac{1}{2}", "\\frac 1 2", True), ("frac-space", "\\cfrac{1}{2}", "\\frac12", True),
    ("frac-space", "\\frac{5}{8}", "\\frac 59", False), ("frac-space", "\\frac 1 3", "\\frac12", False),
    ("wrapper", "\\left( \\frac{1}{3} \\right)", "\\frac13", True), ("wrapper", "(7)", "7", True),
    ("wrapper", "x \\in [-2,7]", "[-2, 7]", True), ("wrapper", "(p,q)=(3,2)", "(3,2)", True),
    ("wrapper", "(a, b) = (1, -4)", "(1,-4)", True), ("wrapper", "\\$10", "10", True), ("wrapper", "−4", "-4", True),
    ("wrapper", "4\u200b", "4", True), ("wrapper", "x \\in [-2,7]", "[-2, 7)", False),
    ("wrapper", "(p,q)=(2,3)", "(3,2)", False), ("wrapper", "−4", "4", False), ("wrapper", "\\left( \\frac{1}{3} \\right)", "3", False),
    ("units2", "10 \\text{ square units}", "10", True), ("units2", "5 \\textnormal{ inches per second}", "5", True),
    ("units2", "12\\textbf{ cm}", "12", True), ("units2", "3 \\mbox{ square feet}", "3", True),
    ("units2", "10 \\text{ square units}", "100", False), ("units2", "5 \\textnormal{ inches per second}", "6", False),
    ("units2", "12 sq ft", "12", True), ("units2", "12 sq. ft", "12", True), ("units2", "8 sq units", "8", True),
    ("units2", "6 \\text{ sq in}", "6", True), ("units2", "8 sq units", "9", False), ("units2", "6 \\text{ sq in}", "7", False),
    ("relation", "x \\geq 2", "x\\ge 2", True), ("relation", "x \\lt 1", "x<1", True), ("relation", "x <= 1", "x \\le 1", True),
    ("relation", "x != 1", "x \\neq 1", True), ("relation", "-x > -1", "x<1", True), ("relation", "3 \\neq x", "x\\ne 3", True),
    ("relation", "-x < -1", "x<1", False), ("relation", "x \\gt 1", "x<1", False), ("relation", "x <= 1", "x<1", False),
    ("ineq-interval", "x<1", "(-\\infty,1)", True), ("ineq-interval", "-2\\le x\\le 7", "[-2,7]", True),
    ("ineq-interval", "[3,\\infty)", "x \\geq 3", True), ("ineq-interval", "5 > x", "(-\\infty, 5)", True),
    ("ineq-interval", "x\\le 1", "(-\\infty,1)", False), ("ineq-interval", "-2< x\\le 7", "[-2,7]", False),
    ("eq-rearranged", "2x+4y-3=0", "y=-\\frac{x}{2}+\\frac34", True), ("eq-rearranged", "x^2+y^2=1", "y^2+x^2-1=0", True),
    ("eq-rearranged", "2x+2y+2z=6", "x+y+z=3", True), ("eq-rearranged", "y=2x+1", "2x+1", True),
    ("eq-rearranged", "2x+4y-3=0", "y=-\\frac{x}{2}+\\frac35", False), ("eq-rearranged", "y=2x", "x=2y", False),
    ("eq-rearranged", "2x=10", "5", False),
    ("matrix-env", "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True),
    ("matrix-env", "\\begin{array}{cc}1&2\\\\3&4\\end{array}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True),
    ("matrix-env", "\\begin{bmatrix}1&2\\\\4&3\\end{bmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", False),
    ("solution-set", "1 \\text{ or } 2", "1, 2", True), ("solution-set", "2; 1", "1,2", True), ("solution-set", "\\{1,2\\}", "2, 1", True),
    ("solution-set", "3 \\text{ and } -3", "\\pm 3", True), ("solution-set", "x = 1 or x = 2", "2, 1", True),
    ("solution-set", "1 \\text{ or } 3", "1, 2", False), ("solution-set", "\\{0\\}", "0", False), ("solution-set", "1; 2; 3", "1,2", False),
    ("pm", "\\pm 2", "2,-2", True), ("pm", "1\\pm\\sqrt{2}", "1+\\sqrt2, 1-\\sqrt 2", True), ("pm", "-2, 2", "\\pm 2", True),
    ("pm", "\\pm 2", "2", False), ("pm", "1\\pm\\sqrt{2}", "1+\\sqrt2", False),
    ("rounding", "0.3333", "\\frac13", True), ("rounding", "3.14", "\\pi", True), ("rounding", "-0.6667", "-\\frac23", True),
    ("rounding", "0.333", "0.33", True), ("rounding", "\\frac{1}{2}", "0.5", True), ("rounding", "1.4142", "\\sqrt 2", True),
    ("rounding", "9999.857142857143", "10000", False), ("rounding", "4.0000000001", "4", False), ("rounding", "0.3334", "\\frac13", False),
    ("rounding", "0.33", "0.333", False), ("rounding", "3.15", "\\pi", False), ("rounding", "\\frac{2}{5}", "0.3", False),
]


def test_table_size_and_balance():
    cats = {}
    for cat, _, _, want in EQUIV:
        cats.setdefault(cat, set()).add(want)
    assert len(EQUIV) >= 250
    assert all(v == {True, False} for v in cats.values()), [c for c, v in cats.items() if v != {True, False}]


@pytest.mark.parametrize("cat,pred,gold,want", EQUIV)
def test_equivalence_table(cat, pred, gold, want):
    assert is_equiv(pred, gold) is want
    if gold and pred:
        assert is_equiv(gold, pred) is want or cat in ("leading_var", "equation", "list", "base", "text", "rounding")


EXTRACT = [
    ("The answer is $\\boxed{5}$.", "last_boxed", "5"),
    ("\\boxed{\\frac{1}{2}}", "last_boxed", "\\frac{1}{2}"),
    ("nested \\boxed{\\frac{\\sqrt{3}}{\\{2\\}}} end", "last_boxed", "\\frac{\\sqrt{3}}{\\{2\\}}"),
    ("first \\boxed{1} then \\boxed{2}", "last_boxed", "2"),
    ("first \\boxed{1} then \\boxed{2}", "first_boxed", "1"),
    ("no box here, the answer is 7.", "last_boxed", None),
    ("no box here, the answer is 7.", "paper", "7"),
    ("we get 3 and then 12 apples", "paper", "12"),
    ("\\boxed 9 is it", "last_boxed", "9"),
    ("so $\\boxed{\\text{Monday}}$", "last_boxed", "Monday"),
    ("\\fbox{42}", "last_boxed", "42"),
    ("\\boxed{$x=3$}.", "last_boxed", "x=3"),
    ("Final: \\boxed{(1,2]}", "last_boxed", "(1,2]"),
    ("The final answer is $\\frac{3}{4}$. I hope", "lenient", "\\frac{3}{4}"),
    ("Answer: 17", "lenient", "17"),
    ("step\n#### 1,234", "gsm8k", "1,234"),
    ("step\n####   42   \nmore", "gsm8k", "42"),
    ("Answer:   \n\n 17  \n", "lenient", "17"),
    ("there are 5 apples and 6 pears", "gsm8k", "6"),
    ("\\boxed{}", "last_boxed", None),
    ("\\boxed{unbalanced", "last_boxed", None),
    ("", "last_boxed", None),
    # reasoning models: only the answer after the thinking block counts
    ("<think>maybe \\boxed{3}? no, wait</think>So the answer is \\boxed{4}.", "last_boxed", "4"),
    ("<think>it is \\boxed{3}</think>I could not decide.", "last_boxed", None),
    ("<think>it is \\boxed{3}, let me check", "last_boxed", None),  # cut off while thinking
    ("Okay, so 2+2. \\boxed{3}?</think>\n\n\\boxed{4}", "last_boxed", "4"),  # R1: <think> in the prompt
]


@pytest.mark.parametrize("text,mode,want", EXTRACT)
def test_extract(text, mode, want):
    assert extract_answer(text, mode) == want


def test_split_thinking():
    assert split_thinking("<think>a</think>b<think>c</think> d") == ("<think>a</think>b<think>c</think>", " d")
    assert split_thinking("<think>never closed") == ("<think>never closed", "")
    assert split_thinking("plain answer") == ("", "plain answer")
    assert grade("<think>\\boxed{5}</think>\\boxed{4}", "4").correct and not grade("<think>\\boxed{4}</think>", "4").correct


def test_fallbacks_selectable():
    text = "Answer: 17"
    assert extract_answer(text, "last_boxed") is None
    assert extract_answer(text, "last_boxed", fallbacks=("answer_colon",)) == "17"


def test_normalize_examples():
    assert normalize("\\left( 1, 2 \\right)") == "(1,2)"
    assert normalize("\\$1,000.50") == "1000.5"
    assert normalize("x = \\dfrac{1}{2}") == "\\frac{1}{2}"


def test_grade_statuses():
    assert grade("so \\boxed{4}", "4").status == "correct"
    v = grade("so \\boxed{5}", "4")
    assert (v.correct, v.answer, v.status) == (False, "5", "incorrect")
    assert grade("I think it is 4", "4").status == "no_answer"
    assert grade("\\boxed{4}", "").status == "unparseable"  # a bad gold never yields correct
    assert grade("\\boxed{}", "").correct is False
    assert grade("\\boxed{9^{9^{9^{9}}}}", "1").status == "unparseable"


def test_math500_reference_solutions_grade_correct(data_dir):
    rows = [json.loads(line) for line in open(os.path.join(data_dir, "math500.jsonl"))]
    assert len(rows) == 500
    verdicts = grade_batch([r["solution"] for r in rows], [r["answer"] for r in rows], workers=2)
    failures = [(r["unique_id"], v) for r, v in zip(rows, verdicts) if not v.correct]
    assert not failures, failures[:5]
    assert all(is_equiv(r["answer"], r["answer"]) for r in rows)


# Items of our benchmarks that fail the self-consistency test below, each with its status and reason.
SELF_CONSISTENCY_EXCEPTIONS = {
    ("math_train solution", "train/number_theory/7115.json"): (
        "no_answer", "the reference solution ends in an empty \\boxed{}; data.py sets the answer to 0 (choice A)"),
    ("math_train solution", "train/number_theory/7117.json"): (
        "no_answer", "the reference solution ends in an empty \\boxed{}; data.py sets the answer to 0 (choice A)"),
}


def test_every_gold_answer_matches_itself_boxed(data_dir):
    """For every item of every benchmark we ship: the gold answer, boxed, grades correct against the gold
    answer; and for MATH train and test the last box of the reference solution grades equal to `answer`."""
    from data import load_dataset
    failures = {}
    for name in ("math500", "math_train", "aime24", "amc23", "minerva_math", "olympiadbench", "gsm8k", "gsm8k_train"):
        records = load_dataset(name, data_dir)
        verdicts = grade_batch(["\\boxed{" + r.answer + "}" for r in records], [r.answer for r in records], workers=2)
        failures.update({(name, r.id): v.status for r, v in zip(records, verdicts) if not v.correct})
        if name in ("math500", "math_train"):
            verdicts = grade_batch([r.meta["solution"] for r in records], [r.answer for r in records], workers=2)
            failures.update({(name + " solution", r.id): v.status for r, v in zip(records, verdicts) if not v.correct})
    assert failures == {k: status for k, (status, _) in SELF_CONSISTENCY_EXCEPTIONS.items()}


def test_deeply_nested_boxes_stay_within_the_bound():
    """Thousands of nested \\boxed{ used to cost quadratic time in extraction (seconds per verdict)."""
    for depth in (3000, 20000):
        v = grade("\\boxed{" * depth + "1" + "}" * depth, "1", timeout=1.0)
        assert v.status == "correct"
    v = grade("\\boxed{" * 20000 + "1", "1", timeout=1.0)  # never closed
    assert v.status == "no_answer"


def test_one_grading_path():
    """grade, grade_batch and is_equiv give the same verdict: all go through one comparison."""
    pairs = [(p, g) for _, p, g, _ in EQUIV[::7]]
    in_process = [verifier._verdict("\\boxed{" + p + "}", g) for p, g in pairs]
    batched = grade_batch(["\\boxed{" + p + "}" for p, g in pairs], [g for _, g in pairs], workers=2)
    assert [v.correct for v in in_process] == [v.correct for v in batched]
    assert [v.correct for v in in_process] == [is_equiv(verifier.strip_wrappers(p), g) if p else False
                                             for p, g in pairs]


def test_gsm8k_final_lines(data_dir):
    rows = [json.loads(line) for line in open(os.path.join(data_dir, "gsm8k_test.jsonl"))]
    assert len(rows) == 1319
    golds = [r["answer"].split("####")[-1].strip() for r in rows]
    wrong = [str(int(g.replace(",", "")) + 1) for g in golds]
    pos = grade_batch([r["answer"] for r in rows], golds, mode="gsm8k", workers=2)
    neg = grade_batch([r["answer"] for r in rows], wrong, mode="gsm8k", workers=2)
    assert [g for g, v in zip(golds, pos) if not v.correct] == []
    assert [g for g, v in zip(golds, neg) if v.correct] == []


ADVERSARIAL = [
    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "x" * 1_000_000 + "\\boxed{1}",
    "\\boxed{9^{9^{9^{9^{9}}}}}",
    "\\boxed{10^{10^{100}}}",
    "\\boxed{100000!}",
    "\\boxed{\\begin{pmatrix}" + "\\\\".join(["&".join(["1"] * 1000)] * 1000) + "\\end{pmatrix}}",
    "\\boxed{__import__('os').system('touch /tmp/rlsp_pwned')}",
    "\\boxed{lambda: 1}",
    "\\boxed{{{}",
    "\\boxed{}",
    "\\boxed{π ≈ 3.14 ✓ 答案}",
    "\\boxed{(((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((1)))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))}",
    "\\boxed{2^{2^{2^{2^{2^{2}}}}}}",
    "\\boxed{\\binom{100000}{50000}}",
    "\\boxed{\\sqrt[100000]{2}^{100000}}",
]


def test_adversarial_inputs_return_within_bound():
    golds = ["1"] * len(ADVERSARIAL)
    t0 = time.monotonic()
    verdicts = grade_batch(ADVERSARIAL, golds, workers=2, timeout=1.0)
    elapsed = time.monotonic() - t0
    assert all(v.status in verifier.STATUSES for v in verdicts)
    assert not os.path.exists("/tmp/rlsp_pwned")
    assert verdicts[1].correct  # a long response with a real answer at the end still grades
    assert all(not v.correct for i, v in enumerate(verdicts) if i not in (1, 11))
    assert elapsed < 10.0 * len(ADVERSARIAL)  # bounded: unbounded, a power tower or 100000! would take hours


def test_timeout_kills_stuck_worker():
    """A job stuck for 30 s (time.sleep stands in for sympy blocking in C) costs its timeout, no more;
    the worker is replaced and later jobs run normally."""
    pool = verifier.Pool(workers=1, timeout=0.5, fn=time.sleep)
    try:
        t0 = time.monotonic()
        out = pool.map([(0,), (30,), (0,), (0.01,)])
        elapsed = time.monotonic() - t0
    finally:
        pool.close()
    assert out[0] is None and isinstance(out[1], verifier.Timeout) and out[2] is None and out[3] is None
    assert elapsed < 25  # well below the stuck job's 30 s: it was cut off, not waited for


def test_grades_math500_references_with_workers(data_dir):
    """All 500 MATH-500 reference solutions graded correct and 500 mismatched answers not, through two worker
    processes (the speed of this, ~4,900 verdicts/s, is measured by the README's command, not asserted)."""
    rows = [json.loads(line) for line in open(os.path.join(data_dir, "math500.jsonl"))]
    responses = [r["solution"] for r in rows] * 2
    golds = [r["answer"] for r in rows] + [rows[(i + 1) % 500]["answer"] for i in range(500)]
    verdicts = grade_batch(responses, golds, workers=2)
    assert sum(v.correct for v in verdicts[:500]) == 500
    assert sum(v.correct for v in verdicts[500:]) <= 10  # a few neighbouring problems share an answer


def test_cli(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"response": "\\boxed{2}", "answer": "2"}) + "\n" +
                 json.dumps({"response": "\\boxed{3}", "answer": "2"}) + "\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "verifier.py"), str(f)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "accuracy 0.5000" in out.stdout
    lines = [json.loads(x) for x in open(tmp_path / "r.verdicts.jsonl")]
    assert [x["status"] for x in lines] == ["correct", "incorrect"]
    f.write_text(json.dumps({"response": "x", "answer": "1"}) + "\n{bad json\n")
    out = subprocess.run([sys.executable, os.path.join(root, "verifier.py"), str(f)], capture_output=True, text=True)
    assert out.returncode != 0 and f"{f}:2: not valid JSON" in out.stderr


def test_no_torch_import():
    out = subprocess.run([sys.executable, "-c", "import sys, verifier; print('torch' in sys.modules)"],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "False"


def test_workers_never_import_from_the_working_directory(tmp_path, monkeypatch):
    """Issue 24: workers ran `python -c "import verifier"`, so a verifier.py, sympy.py or json.py in the
    working directory ran inside them. Now they start with python -I and the project folder on their path;
    a fresh Pool started from such a directory grades as usual."""
    for name in ("verifier", "sympy", "json"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('{name}.py of the working directory ran')\n")
    monkeypatch.chdir(tmp_path)
    pool = verifier.Pool(workers=1, timeout=10.0)
    try:
        out = pool.map([("so \\boxed{\\frac{1}{2}}", "0.5", "last_boxed")])
    finally:
        pool.close()
    assert out == [{"correct": True, "answer": "\\frac{1}{2}", "status": "correct", "reason": ""}]


def test_default_workers_share_this_process_cpus_among_local_ranks(monkeypatch, tmp_path):
    """Issue 24: each torchrun rank started os.cpu_count() workers. Now: the CPUs of the affinity mask,
    capped by the cgroup v2 quota, divided among LOCAL_WORLD_SIZE ranks, at least one."""
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(verifier, "CGROUP_CPU_MAX", str(quota))
    for text, ranks, want in [(None, None, 16), ("max 100000\n", None, 16), ("400000 100000\n", None, 4),
                              ("150000 100000\n", None, 1), ("50000 100000\n", None, 1), ("unreadable", None, 16),
                              (None, "8", 2), (None, "32", 1), ("800000 100000\n", "4", 2)]:
        if text is None:
            quota.unlink(missing_ok=True)
        else:
            quota.write_text(text)
        if ranks is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
        assert verifier.default_workers() == want, (text, ranks)
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS: no affinity mask, the CPU count
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert verifier.default_workers() == 1  # 6 CPUs (under the quota of 8) among 4 ranks


def test_workers_run_under_memory_and_cpu_limits():
    """Each worker maps at most WORKER_MEMORY, writes no core file, and may use ceil(timeout) + 1 s of CPU
    per job: a limit moved before each job, since RLIMIT_CPU counts the worker's whole life (a fixed one
    would end a long-lived worker once its jobs added up to it)."""
    import resource
    pool = verifier.Pool(workers=1, timeout=10.0, fn=resource.getrlimit)
    try:
        (memory, _), (core, _), (cpu, _) = pool.map([(resource.RLIMIT_AS,), (resource.RLIMIT_CORE,),
                                                     (resource.RLIMIT_CPU,)])
        t0 = time.thread_time()
        sum(range(10**6))
        n = int(10**6 * 1.5 / (time.thread_time() - t0))  # ~1.5 s of CPU time
        pool.fn = sum
        assert pool.map([(range(n),)]) == [n * (n - 1) // 2]
        pool.fn = resource.getrlimit
        [(cpu_later, _)] = pool.map([(resource.RLIMIT_CPU,)])
    finally:
        pool.close()
    assert memory == verifier.WORKER_MEMORY and core == 0
    assert 11 <= cpu < cpu_later  # the CPU time used so far, plus 11 s


def test_a_runaway_worker_ends_at_its_cpu_limit():
    """The caller's timeout ends a stuck job; when the caller is gone (killed), the worker's CPU limit does.
    The job is sent past Pool.map here, so nothing else stops it; the dead worker is then replaced."""
    pool = verifier.Pool(workers=1, timeout=0.5, fn=sum)
    try:
        proc, (to_worker, _) = pool.procs[0]
        to_worker.send((sum, (range(10**15),)))  # hours of CPU time, without the limit
        assert proc.wait(timeout=300) == -signal.SIGXCPU  # after ceil(0.5) + 1 = 2 s of it
        assert pool.map([(range(4),)]) == [6]
    finally:
        pool.close()


def test_a_worker_that_dies_is_replaced():
    """A worker killed mid-job (as the kernel kills one at its limits) gives that job a Timeout and is
    replaced; one killed between jobs is replaced before the next: verdicts go on."""
    pool = verifier.Pool(workers=1, timeout=10.0, fn=os.kill)
    try:
        pid = pool.procs[0][0].pid
        out = pool.map([(pid, signal.SIGKILL), (os.getpid(), 0)])  # the worker kills itself; then a no-op
        assert isinstance(out[0], verifier.Timeout) and out[0].why == "worker died" and out[1] is None
        assert pool.procs[0][0].pid != pid
    finally:
        pool.close()
    proc = verifier._pool(1, 1.0).procs[0][0]  # the pool grade() uses
    proc.kill()
    proc.wait()
    assert grade("so \\boxed{4}", "4").correct
