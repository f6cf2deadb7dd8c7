# moe-cluster: the two commands for a fresh Debian/Ubuntu machine are `make run` and `make test`.
# Every target installs missing Debian packages first (scripts/install-deps.sh).

JOBS ?= $(shell nproc)
BUILD ?= build
CMAKE_FLAGS ?=
FUZZ_SECONDS ?= 30
RUN_DIR ?= $(BUILD)/run
CONFIGURE = cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo $(CMAKE_FLAGS)

.PHONY: all deps configure build test test-unit fuzz run bench test-asan test-tsan test-compose clean

all: build

deps:
	@bash scripts/install-deps.sh

$(BUILD)/CMakeCache.txt:
	@$(MAKE) --no-print-directory deps
	$(CONFIGURE)

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

# ThreadSanitizer build of every test, in build-tsan/, with suppressions only for the
# uninstrumented Debian libraries (tests/tsan.supp says what that leaves checked). The tests that
# start clusters of instrumented processes (TSAN_SERIAL: cluster, fault, ring, security, PyTorch,
# Python client and CLI tests) run one at a time after the others, so that TSan's slowdown on two
# cores does not break their wall-clock bounds (failure detection within 2 s, a ring's deadline +
# 1.5 s). Left out: the deployment checks (no service code), the rolling restart (it counts
# requests lost to an overloaded machine's keepalive timeouts), the 96 MiB memory cgroup
# (TSan's shadow memory) and the in-process copy of a 3 MiB expert in several 1 MiB pieces
# (ATrainedExpertStillBeingReadBack: TSan starts a race report on a piece's 1 MiB copy, whose
# writer it cannot see through the uninstrumented gRPC, and the report does not finish within
# the test's 60 s); `make test` and `make test-asan` run them. A serial test that fails is run
# once more (their wall-clock bounds still flake now and then under TSan's pauses), but a
# ThreadSanitizer report in any attempt fails the target: ctest's log keeps every attempt.
TSAN_SERIAL = ClusterTest|StrategyTest|FaultTest|GrpcRing|SecurityTest|torch_|python_|cli_
TSAN_EXCLUDE = deploy_|RollingRestartOfEveryShard|MemoryLimitedShard|ATrainedExpertStillBeingReadBack
TSAN_ENV = OMP_NUM_THREADS=1 \
  TSAN_OPTIONS="suppressions=$(CURDIR)/tests/tsan.supp halt_on_error=1 second_deadlock_stack=1"
# Fails when ctest's log of the last run (every attempt of every test, with the output of the
# processes it started) holds a ThreadSanitizer report, or is missing.
TSAN_LOG = build-tsan/Testing/Temporary/LastTest.log
TSAN_NO_REPORT = test -f $(TSAN_LOG) || { echo "test-tsan: no $(TSAN_LOG)"; exit 1; }; \
  ! grep -n "WARNING: ThreadSanitizer" $(TSAN_LOG) || \
  { echo "test-tsan: ThreadSanitizer reported the lines above (in $(TSAN_LOG))"; exit 1; }
test-tsan: deps
	@test -f build-tsan/CMakeCache.txt || \
	  cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_SANITIZE=thread
	cmake --build build-tsan -j $(JOBS)
	cd build-tsan && $(TSAN_ENV) ctest --output-on-failure -j $(JOBS) -E "$(TSAN_SERIAL)|$(TSAN_EXCLUDE)"
	@$(TSAN_NO_REPORT)
	cd build-tsan && $(TSAN_ENV) ctest --output-on-failure -j 1 --repeat until-pass:2 \
	  -R "$(TSAN_SERIAL)" -E "$(TSAN_EXCLUDE)"
	@$(TSAN_NO_REPORT)

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

# The peers (Gloo, Open MPI) are found when CMake configures: install them first, then configure
# again so that a build directory made before they were installed builds them too.
bench: deps
	@bash scripts/install-deps.sh bench
	$(CONFIGURE)
	@$(MAKE) --no-print-directory build
	bash bench/run_all.sh $(BUILD)

clean:
	rm -rf $(BUILD) build-asan build-fuzz build-tsan
