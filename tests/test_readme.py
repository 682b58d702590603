"""The README's commands on a fresh clone (the tracked files copied to a new folder, the offline data
folder as $RLSP_DATA_DIR): each one is run, except the installs (.ci/run runs them), the test suite
itself, and the commands that take minutes (the demo, which tests/test_demo.py runs; the 100-problem
evals), whose flags are checked by their own parsers and whose files must exist after the commands
shown before them."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    """Each shell command of the README's ```bash blocks, continuation lines joined, comments dropped."""
    text = open(os.path.join(ROOT, "README.md")).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                commands.append(line)
    return commands


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """What a clone holds: the files git tracks (and, before a commit, the new ones it does not ignore)."""
    folder = tmp_path_factory.mktemp("clone")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs((folder / f).parent, exist_ok=True)
            shutil.copy(os.path.join(ROOT, f), folder / f)
    return folder


def test_readme_commands_run_on_a_fresh_clone(clone, smollm2):
    import eval as evaluation
    import train
    env = {k: v for k, v in os.environ.items() if k not in ("RLSP_TEST_CACHE", "PYTHONPATH")}
    seen = []
    for command in readme_commands():
        argv = shlex.split(command)
        if argv[:3] == ["python3", "-m", "venv"] or argv[0] == "pip" or argv[:4] == ["python", "-m", "pytest", "-q"]:
            seen.append("installs / the suite")  # .ci/run installs and runs the suite on a fresh clone
            continue
        assert argv[0] == "python", command
        if argv[1] == "-c":  # the SmolLM2 conversion: its cache seeded with the suite's converted folder
            shutil.copytree(smollm2, clone / ".cache" / "tests" / "SmolLM2-135M-Instruct", dirs_exist_ok=True)
        script = argv[1]
        if script == "train.py" and "--tiny" not in argv:
            args = train.parse_args(argv[2:])  # the demo: tests/test_demo.py runs it
            assert not args.model and args.out == os.path.join("runs", "demo")
            seen.append("demo")
            continue
        if script == "eval.py":
            args = evaluation.parser().parse_args(argv[2:])
            assert os.path.isdir(clone / args.model), f"{command}: {args.model} does not exist after the commands before it"
            seen.append("eval")
            continue
        p = subprocess.run([sys.executable, *argv[1:]], cwd=clone, env=env, capture_output=True, text=True,
                           timeout=900)  # a hang guard only
        assert p.returncode == 0, f"{command}\n{p.stderr[-3000:]}"
        seen.append(script)
    assert {"installs / the suite", "demo", "eval", "-c", "train.py"} <= set(seen), seen
