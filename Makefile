# The two commands of the README: `make quickstart` (the offline pipeline) and `make test`;
# `make lock` refreshes constraints.txt (the versions both install) when the suite passes on the newest.
.PHONY: quickstart test lock

quickstart:
	bash scripts/setup.sh
	.venv/bin/distill run configs/quickstart.yaml

test:
	bash scripts/setup.sh --test
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

lock:
	bash scripts/refresh_lock.sh $(PYTEST_ARGS)
