# make demo   install what is missing, run the default benchmark, write reports/demo/
# make test   install, start a local SLURM cluster + MLflow server, run all tests, stop them
# make test-recipes  only the paper recipes' smoke runs, every method of every recipe
# make setup  only install (apt packages when root, Python packages into .venv)
.PHONY: demo test test-fast test-recipes setup services-start services-stop clean

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

test-fast:
	bash scripts/test.sh -m "not slow"

test-recipes:
	bash scripts/test.sh -m recipes --all-methods

setup:
	bash scripts/setup.sh

clean:
	rm -rf runs reports/demo mlflow.db .cache
