# Convenience targets; README's two commands are the canonical entry points.
.PHONY: setup demo test lint dup
setup:
	./scripts/setup_env.sh
demo: setup
	.venv/bin/python -m vispec_vllm.demo
test: setup
	.venv/bin/python -m pytest -q tests
lint:
	.venv/bin/ruff check vispec_vllm kernels tests benchmarks scripts
dup:
	duplicates --change
