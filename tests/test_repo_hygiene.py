"""The README's commands are the ones CI runs, and the layout the user asked for exists."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    command = ci_lines[-1]
    assert "pytest" in command
    readme = (ROOT / "README.md").read_text()
    assert f"\n{command}\n" in readme


def test_readme_has_a_demo_command():
    readme = (ROOT / "README.md").read_text()
    assert "./scripts/setup_env.sh && .venv/bin/python -m vispec_vllm.demo" in readme


def test_requested_layout():
    for name in ("vispec_vllm", "kernels", "configs", "tests", "benchmarks", "setup.py", "README.md"):
        assert (ROOT / name).exists(), name
