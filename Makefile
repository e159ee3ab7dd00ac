# lpd-relay: `make run` starts the relay on its embedded default, `make test`
# runs the whole suite. Both set up what they need themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SRC    := pyproject.toml setup.py $(wildcard relay/*.pyx relay/*.pxi)

.PHONY: run test bench lint typecheck peers install clean man completions deb deb-deps test-deb-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel

$(STAMP): $(BIN)/python $(SRC)
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# The real LPD peers the suite talks to (LPRng, rlpr, p910nd, promtool):
# installed with apt-get when root, otherwise those tests skip with a reason.
peers:
	@bash scripts/install-peers.sh

run: install
	$(BIN)/lpd-relay serve

lint: install
	$(BIN)/ruff check relay tests benchmarks

typecheck: install
	$(BIN)/mypy relay

# The suite runs in TEST_JOBS worker processes (pytest-xdist): it mostly waits
# on sockets, subprocesses and peers, so more workers than cores pay off.
# Tests sharing a machine-wide resource (tests/conftest.py XDIST_GROUPS) run
# one after another on one worker; those marked exclusive (reserved ports
# they count) run afterwards, alone.  TEST_JOBS=0 runs the first part
# serially.  The benchmark smoke run stays serial: one process keeps its table.
TEST_JOBS ?= 4
test: install peers test-deb-deps lint typecheck
	$(BIN)/python -m pytest -q -m "not slow and not exclusive" -n $(TEST_JOBS) --dist loadgroup tests
	$(BIN)/python -m pytest -q -m "not slow and exclusive" tests
	LPD_BENCH_SCALE=0.01 $(BIN)/python -m pytest -q --benchmark-disable benchmarks

# Benchmarks, then the slow soak tests; the targets table (medians of 3
# alternating rounds, docs/benchmarks.md) is printed again at the end and
# kept in benchmarks/results/latest.md and .json.
# The table is printed even when a benchmark or a slow test failed (its row
# says so); the exit status still reports the failure.  The benchmarks run
# one at a time (side by side within a row, nothing else beside them); the
# slow tests, pass/fail soaks with no ratio to distort, run afterwards in
# two processes at once (the long soak alone, the rest together), each
# test bounded by --timeout.  test_bench_pg.py's one-round printout is left
# out: the table's PostgreSQL rows measure the same three cases, 3 rounds.
SLOW_TIMEOUT ?= 900
bench: install peers
	@status=0; start=$$(date +%s); mkdir -p build; \
	$(BIN)/python -m pytest -q -p no:cacheprovider --benchmark-only \
	  --benchmark-columns=min,median,mean,ops,rounds --durations=12 \
	  --ignore=benchmarks/test_bench_pg.py benchmarks || status=1; \
	mid=$$(date +%s); \
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow --timeout=$(SLOW_TIMEOUT) \
	  --durations=5 tests/test_soak.py > build/bench-slow-soak.log 2>&1 & soak=$$!; \
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow --timeout=$(SLOW_TIMEOUT) \
	  --durations=5 --ignore=tests/test_soak.py tests || status=1; \
	wait $$soak || status=1; cat build/bench-slow-soak.log; \
	cat benchmarks/results/latest.md; \
	echo "make bench: benchmarks $$((mid - start)) s, slow tests $$(($$(date +%s) - mid)) s"; \
	exit $$status

# Man pages lpd-relay(8) and lpd-relay.toml(5), generated from the parser and
# the config key tables; shell completions generated from the parser.
man: install
	$(BIN)/python -m relay.manpage build/man

completions: install
	@mkdir -p build/completions
	$(BIN)/lpd-relay completion bash > build/completions/lpd-relay.bash
	$(BIN)/lpd-relay completion zsh > build/completions/_lpd-relay

# The Debian package into dist/ (docs/packaging.md); its build dependencies
# are installed with apt-get when root. `make test` installs them too (never
# failing without root: the package tests then skip), so the
# package tests (build, lintian, install into a throwaway root) run there.
deb-deps:
	@bash scripts/install-deb-deps.sh

test-deb-deps:
	@bash scripts/install-deb-deps.sh --optional

deb: install
	@bash scripts/build-deb.sh $(DEB_FLAGS)

clean:
	rm -rf build relay/_core.c relay/_core*.so relay/_loadgen.c relay/_loadgen*.so relay/_dirio.c relay/_dirio*.so relay/_fastloop.c relay/_fastloop*.so *.egg-info .pytest_cache .mypy_cache .ruff_cache
