# One command per job; CI runs scripts/test, which runs the same steps.
.PHONY: check interop fuzz test fmt bench
check:
	scripts/install-deps --python
	.venv/bin/ruff check nbdquorum tests
	.venv/bin/mypy nbdquorum
	.venv/bin/pytest -q tests/unit
interop:
	.venv/bin/pytest -q tests/interop
fuzz:
	.venv/bin/pytest -q tests/fuzz
test:
	scripts/test
fmt:
	.venv/bin/ruff format nbdquorum tests
	.venv/bin/ruff check --fix nbdquorum tests
bench:
	scripts/bench
