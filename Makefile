# The README's two commands. Each installs what is missing and starts the local stack (Kafka + Redis) first.
.PHONY: demo test stack-up stack-down bootstrap lint

bootstrap:
	bash scripts/bootstrap.sh

stack-up: bootstrap
	tagstream stack up

stack-down:
	tagstream stack down

demo: stack-up
	tagstream demo

test: stack-up
	python3 -m pytest -q

lint:
	ruff check . && ruff format --check .
