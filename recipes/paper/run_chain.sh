#!/usr/bin/env bash
# The whole paper chain for one (encoder, LLM) pair, from the YAMLs that recipes/paper/generate.py writes under
# recipes/paper/stages/<pair>/:
#   1a  Stage 1a: projector pretraining (LCS-558K)                       recipes/sft.py  1a_projector.yaml
#   1b  Stage 1b: full finetuning (OneVision single-image)               recipes/sft.py  1b_finetune.yaml
#   2   Stage 2 on the 20K MMPR rows: SFT control, PIVOT (DPO), and MPO  recipes/sft.py  2_sft.yaml
#       where the pair has a 2_mpo.yaml (Table E)                        recipes/dpo.py  2_pivot.yaml [2_mpo.yaml]
#   export  the SFT and PIVOT encoders (+ projector)                     recipes/export_encoder.py
#   3   Stage 3: each exported encoder, frozen, in a fresh Qwen2.5-1.5B  recipes/sft.py  stage3/3{a,b}_reuse1.yaml
#       (Table I "1+1": the PIVOT projector's first layer reused)
#   eval  the 16 benchmarks on the Stage-3 MLLMs and on the Stage-2 MLLMs  recipes/eval_mllm.py
# Paper hardware: 8 GPUs (H100), global batch 256 per stage; Stage 2 runs ZeRO-3, the other stages ZeRO-2.
#
# Usage: bash recipes/paper/run_chain.sh [--dry-run] <pair> [step...]
#   <pair>     <encoder>+<llm>, a folder under recipes/paper/stages/ (run without arguments to list them)
#   step...    any of: 1a 1b 2 export 3 eval (`1` = 1a 1b); default: all. Steps run in chain order, whatever the
#              order given, so `bash recipes/paper/run_chain.sh siglip2-so400m+qwen2.5-1.5b export 2` resumes at
#              Stage 2. Each step reads the previous one's folder under runs/paper/<pair>/.
#   --dry-run  print the commands, one a line, without running them.
# Python steps run on $PYTHON (e.g. PYTHON="$(command -v python)" inside a venv), and so do the `accelerate launch`
# steps when it is set (`$PYTHON -m accelerate.commands.launch`: one interpreter for the whole chain, never a mix).
# Unset: `python` and the `accelerate` found first on PATH, as a user's shell would.
set -euo pipefail
if [[ -n "${PYTHON:-}" ]]; then
  LAUNCH=("$PYTHON" -m accelerate.commands.launch)
else
  PYTHON=python
  LAUNCH=(accelerate launch)
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STAGES_DIR="$HERE/stages"
ALL_STEPS=(1a 1b 2 export 3 eval)
DRY_RUN=0

usage() {
  echo "usage: bash recipes/paper/run_chain.sh [--dry-run] <pair> [step...]   (steps: ${ALL_STEPS[*]}; 1 = 1a 1b)" >&2
  echo "pairs:" >&2
  for dir in "$STAGES_DIR"/*/; do
    [[ -f "$dir/1a_projector.yaml" ]] && echo "  $(basename "$dir")" >&2
  done
  exit 2
}

ARGS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage ;;
    *) ARGS+=("$arg") ;;
  esac
done
[[ ${#ARGS[@]} -ge 1 ]] || usage
PAIR="${ARGS[0]}"
if [[ "$PAIR" == */* || ! -f "$STAGES_DIR/$PAIR/1a_projector.yaml" ]]; then
  echo "error: unknown pair '$PAIR' (no recipes/paper/stages/$PAIR/1a_projector.yaml)." >&2
  usage
fi

REQUESTED=" "
for step in "${ARGS[@]:1}"; do
  case "$step" in
    1) REQUESTED+="1a 1b " ;;
    1a | 1b | 2 | export | 3 | eval) REQUESTED+="$step " ;;
    *)
      echo "error: unknown step '$step'; steps are: ${ALL_STEPS[*]} (1 = 1a 1b)." >&2
      exit 2
      ;;
  esac
done
[[ "$REQUESTED" == " " ]] && REQUESTED=" ${ALL_STEPS[*]} "
want() { [[ "$REQUESTED" == *" $1 "* ]]; }

run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    echo "$*"
  else
    echo "+ $*" >&2
    "$@"
  fi
}

CFG="recipes/paper/stages/$PAIR"
BASE="runs/paper/$PAIR"
Z2=("${LAUNCH[@]}" --config_file accelerate_configs/zero2.yaml)
Z3=("${LAUNCH[@]}" --config_file accelerate_configs/zero3.yaml)
EVAL=("${LAUNCH[@]}" --num_processes 8 recipes/eval_mllm.py --tasks all --batch_size 8 --dtype bfloat16)
# The Hub encoder Stage 1a composed: the export records it as the model card's base model.
BASE_ENCODER="$(sed -n 's/^vision_model_name_or_path: *//p' "$STAGES_DIR/$PAIR/1a_projector.yaml")"

# Paths are relative to the repository root, as in the YAMLs.
cd "$HERE/../.."

if want 1a; then run "${Z2[@]}" recipes/sft.py --config "$CFG/1a_projector.yaml"; fi
if want 1b; then run "${Z2[@]}" recipes/sft.py --config "$CFG/1b_finetune.yaml"; fi
if want 2; then
  run "${Z3[@]}" recipes/sft.py --config "$CFG/2_sft.yaml"
  run "${Z3[@]}" recipes/dpo.py --config "$CFG/2_pivot.yaml"
  if [[ -f "$CFG/2_mpo.yaml" ]]; then run "${Z3[@]}" recipes/dpo.py --config "$CFG/2_mpo.yaml"; fi
fi
if want export; then
  for post in pivot sft; do
    run "$PYTHON" recipes/export_encoder.py --model_name_or_path "$BASE/2_$post" --output_dir "$BASE/encoder_$post" \
      --export_projector --base_model "$BASE_ENCODER"
  done
fi
if want 3; then
  for post in pivot sft; do
    run "${Z2[@]}" recipes/sft.py --config recipes/paper/stage3/3a_reuse1.yaml \
      --vision_model_name_or_path "$BASE/encoder_$post" --projector_init_from "$BASE/encoder_$post" \
      --output_dir "$BASE/stage3_$post/3a_projector"
    run "${Z2[@]}" recipes/sft.py --config recipes/paper/stage3/3b_reuse1.yaml \
      --model_name_or_path "$BASE/stage3_$post/3a_projector" --projector_init_from "$BASE/encoder_$post" \
      --output_dir "$BASE/stage3_$post/3b_finetune"
  done
fi
if want eval; then
  for post in pivot sft; do
    run "${EVAL[@]}" --model_name_or_path "$BASE/stage3_$post/3b_finetune" --output_dir "eval/paper/$PAIR/stage3_$post"
    # Section 3's numbers (Fig. 2/3, Tables R/S/T) evaluate the Stage-2 MLLM itself.
    run "${EVAL[@]}" --model_name_or_path "$BASE/2_$post" --output_dir "eval/paper/$PAIR/2_$post"
  done
fi
