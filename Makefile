# moe-cluster: the two commands for a fresh Debian/Ubuntu machine are `make run` and `make test`.
# Every target installs missing Debian packages first (scripts/install-deps.sh).

JOBS ?= $(shell nproc)
BUILD ?= build
CMAKE_FLAGS ?=
FUZZ_SECONDS ?= 30
RUN_DIR ?= $(BUILD)/run

.PHONY: all deps configure build test test-unit fuzz run bench test-asan test-compose clean

all: build

deps:
	@bash scripts/install-deps.sh

$(BUILD)/CMakeCache.txt:
	@$(MAKE) --no-print-directory deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo $(CMAKE_FLAGS)

configure: $(BUILD)/CMakeCache.txt

build: deps configure
	cmake --build $(BUILD) -j $(JOBS)

# Every test: unit and integration tests through ctest, then the fuzzers for FUZZ_SECONDS each.
test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)
	@$(MAKE) --no-print-directory fuzz

test-unit: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

fuzz: deps
	@test -f build-fuzz/CMakeCache.txt || \
	  CC=clang CXX=clang++ cmake -S . -B build-fuzz -DMOE_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	    -DMOE_FUZZ_SECONDS=$(FUZZ_SECONDS)
	cmake --build build-fuzz -j $(JOBS)
	cd build-fuzz && ctest --output-on-failure -j $(JOBS)

# ASan + UBSan build of every test, in build-asan/.
test-asan: deps
	@test -f build-asan/CMakeCache.txt || \
	  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_SANITIZE=address,undefined
	cmake --build build-asan -j $(JOBS)
	cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  ctest --output-on-failure -j $(JOBS) -LE slow

# The container path: the image from deploy/docker/Dockerfile, docker-compose.yml on the host's
# network, token batches checked against the in-process layer (tests/deploy/compose_smoke.sh).
# Starts a Docker engine if none runs.
test-compose: build
	@bash scripts/install-deps.sh compose
	bash tests/deploy/compose_smoke.sh $(BUILD)

# The demo: a 16-expert checkpoint, a local cluster of 4 shards (hybrid placement), ~20 s of
# Zipf-skewed load, the summary and the placement table; serves until Ctrl-C.
run: build
	bash scripts/run-demo.sh $(BUILD)

bench: build
	@bash scripts/install-deps.sh bench
	bash bench/run_all.sh $(BUILD)

clean:
	rm -rf $(BUILD) build-asan build-fuzz
