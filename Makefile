# make demo   install what is missing, run the default benchmark, write reports/demo/
# make test   install, start a local SLURM cluster + MLflow server, run all tests, stop them
# make test-fast  static checks + the tests that need no services (-m "not slow")
# make lint   ruff (lint, format) and mypy --strict on the pruning interface and baselines
# make test-recipes  only the paper recipes' smoke runs, every method of every recipe
# make setup  only install (apt packages when root, Python packages into .venv)
.PHONY: demo test test-fast lint test-recipes setup clean

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

test-fast:
	bash scripts/test.sh --fast

lint:
	bash scripts/lint.sh

test-recipes:
	bash scripts/test.sh -m recipes --all-methods

setup:
	bash scripts/setup.sh

clean:
	rm -rf runs reports/demo mlflow.db .cache
