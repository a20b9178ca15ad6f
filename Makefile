# The two commands a newcomer needs (see README.md). Both set everything up first (idempotent).
.PHONY: demo test setup

setup:
	scripts/bootstrap.sh

demo: setup
	.venv/bin/qvla demo

test: setup
	.venv/bin/python -m pytest -q test
