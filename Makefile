# tm — build, tests, demo. See README.md.
#
#   make              libcore + every tool (CUDA sources too when nvcc is present)
#   make CUDA=0       without CUDA
#   make SAN=1        ASan + UBSan build (in build-san/)
#   make test         GoogleTest suite + bats suite (installs missing packages first)
#   make demo         install, build, convert $(MODEL), check it
#   make test-gpu     GPU checks (run on the device machine)

SAN ?= 0
NVCC ?= /usr/local/cuda/bin/nvcc
CUDA_HOME ?= /usr/local/cuda
CUDA ?= $(if $(wildcard $(NVCC)),1,0)
MODEL ?= ../shared/models/tinytech-25m
JOBS ?= $(shell nproc 2>/dev/null || echo 2)

BUILD := build
ifeq ($(SAN),1)
BUILD := $(BUILD)-san
endif
ifeq ($(CUDA),0)
BUILD := $(BUILD)-nocuda
endif

CXX ?= g++
CXXFLAGS ?= -O2 -g
CXXFLAGS += -std=c++20 -Wall -Wextra -pthread -MMD -MP -Ilibcore/include -Ilibcore -march=x86-64-v3
LDFLAGS ?=
LDLIBS := -lsimdjson -l:libxxhash.a -l:libzstd.a -l:libpcre2-8.a -l:libutf8proc.a -pthread

ifeq ($(SAN),1)
CXXFLAGS += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined \
	-Wno-maybe-uninitialized  # GCC 12 false positives in <regex> under ASan
LDFLAGS += -fsanitize=address,undefined
endif

NVCCFLAGS := -std=c++20 -O2 -g -gencode arch=compute_90a,code=sm_90a -Ilibcore/include -Ilibcore -I. \
	-Xcompiler -Wall,-Wextra -MMD -MP
ifeq ($(CUDA),1)
# The CUDA runtime is linked statically; the driver (libcuda.so) is loaded at
# run time by cudart, so binaries start on machines without it.
LDLIBS += -L$(CUDA_HOME)/lib64 -l:libcudart_static.a -ldl -lrt
CXXFLAGS += -DTM_WITH_CUDA=1 -I$(CUDA_HOME)/include -I.
endif

CORE_CPP := $(shell find libcore -name '*.cpp' | sort)
CORE_CU := $(shell find libcore kernels -name '*.cu' | sort)
ifeq ($(CUDA),1)
CORE_CPP := $(filter-out libcore/backend/device_none.cpp,$(CORE_CPP))
else
CORE_CPP := $(filter-out libcore/backend/cuda/%,$(CORE_CPP))
CORE_CU :=
endif
CORE_OBJ := $(CORE_CPP:%.cpp=$(BUILD)/obj/%.o) $(CORE_CU:%.cu=$(BUILD)/obj/%.cu.o)
LIBCORE := $(BUILD)/libtmcore.a

TOOLS := $(patsubst tools/%.cpp,$(BUILD)/bin/%,$(wildcard tools/tm-*.cpp))
BENCHES := $(patsubst tests/bench/%_bench.cpp,$(BUILD)/bench/%_bench,$(wildcard tests/bench/*_bench.cpp))
EXAMPLES := $(patsubst examples/%.cpp,$(BUILD)/bin/example-%,$(wildcard examples/*.cpp))
UNIT_SRC := $(wildcard tests/unit/*.cpp)
UNIT_BIN := $(BUILD)/tests/unit-tests
GPU_TEST_SRC := $(wildcard tests/gpu/*.cpp)
GPU_TEST_BIN := $(BUILD)/tests/gpu-tests

.PHONY: all deps test test-unit test-bats demo clean format test-gpu
all: $(LIBCORE) $(TOOLS) $(EXAMPLES) $(BENCHES)

$(BUILD)/obj/%.o: %.cpp
	@mkdir -p $(@D)
	$(CXX) $(CXXFLAGS) -c $< -o $@

$(BUILD)/obj/%.cu.o: %.cu
	@mkdir -p $(@D)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@

# Boost.System 1.74's constexpr error categories trip UBSan's vptr check (a
# false positive in its headers, when an error code is built from an errno):
# the files that use Boost.Asio are built without that one check.
ifeq ($(SAN),1)
$(BUILD)/obj/libcore/serve/%.o $(BUILD)/obj/tools/tm-serve.o $(BUILD)/obj/tools/tm-client.o: CXXFLAGS += -fno-sanitize=vptr
endif

# The CPU kernels and row maths are compiled once per instruction set (picked at run time).
$(BUILD)/obj/libcore/backend/cpu/kernels_avx512.o: CXXFLAGS += -O3 -mavx512f -mavx512bw -mavx512vl -mavx512dq -Wno-psabi -Wno-maybe-uninitialized
$(BUILD)/obj/libcore/backend/cpu/kernels_avx2.o: CXXFLAGS += -O3 -Wno-psabi
$(BUILD)/obj/libcore/base/row_math_avx512.o: CXXFLAGS += -O3 -mavx512f -mavx512bw -mavx512vl -mavx512dq -Wno-psabi
$(BUILD)/obj/libcore/base/row_math_avx2.o: CXXFLAGS += -O3 -Wno-psabi

$(LIBCORE): $(CORE_OBJ)
	@mkdir -p $(@D)
	rm -f $@ && ar rcs $@ $^

$(BUILD)/bin/%: $(BUILD)/obj/tools/%.o $(LIBCORE)
	@mkdir -p $(@D)
	$(CXX) $(LDFLAGS) $< $(LIBCORE) $(LDLIBS) -o $@

$(BUILD)/bin/example-%: $(BUILD)/obj/examples/%.o $(LIBCORE)
	@mkdir -p $(@D)
	$(CXX) $(LDFLAGS) $< $(LIBCORE) $(LDLIBS) -o $@

$(BUILD)/bench/%: $(BUILD)/obj/tests/bench/%.o $(LIBCORE)
	@mkdir -p $(@D)
	$(CXX) $(LDFLAGS) $< $(LIBCORE) $(LDLIBS) -o $@

$(UNIT_BIN): $(UNIT_SRC:%.cpp=$(BUILD)/obj/%.o) $(LIBCORE)
	@mkdir -p $(@D)
	$(CXX) $(LDFLAGS) $(filter %.o,$^) $(LIBCORE) $(LDLIBS) -lgtest -lgtest_main -o $@

$(GPU_TEST_BIN): $(GPU_TEST_SRC:%.cpp=$(BUILD)/obj/%.o) $(LIBCORE)
	@mkdir -p $(@D)
	$(CXX) $(LDFLAGS) $(filter %.o,$^) $(LIBCORE) $(LDLIBS) -l:libgtest.a -l:libgtest_main.a -o $@

deps:
	@scripts/install-deps.sh

# ASan must not protect the shadow gap where the CUDA runtime maps memory.
export ASAN_OPTIONS := protect_shadow_gap=0:detect_leaks=1
export TM_SHARED := $(abspath ../shared)

test-unit: $(UNIT_BIN)
	$(UNIT_BIN)

test-bats: all
	TM_BIN=$(abspath $(BUILD)/bin) bats tests/bats

test: deps
	$(MAKE) -j$(JOBS) all $(UNIT_BIN)
	$(MAKE) test-unit test-bats

demo: deps
	$(MAKE) -j$(JOBS) all
	scripts/demo.sh "$(MODEL)" "$(abspath $(BUILD))"

test-gpu: all $(GPU_TEST_BIN)
	scripts/test-gpu.sh "$(abspath $(BUILD))"

format:
	clang-format -i $$(find libcore tools tests examples kernels -name '*.cpp' -o -name '*.hpp' -o -name '*.cu')

clean:
	rm -rf build build-*

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)
