# The two commands of the README: `make quickstart` (the offline pipeline) and `make test`.
.PHONY: quickstart test setup

quickstart:
	bash scripts/setup.sh
	.venv/bin/distill run configs/quickstart.yaml

test:
	bash scripts/setup.sh --test
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)
