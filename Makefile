# distillery: `make demo` runs the main pipeline on built-in data, `make test` the fast tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR ?= outputs/demo

.PHONY: install demo test test-full test-cluster lint reproduce-unfused bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/distillery experiment=unfused run_dir=$(RUN_DIR)

test: install
	$(BIN)/pytest -m "not slow and not cluster" -q

test-full: install
	$(BIN)/pytest -q

# A one-node SLURM cluster (root; installs slurm-wlm and munge if missing), the tests marked
# `cluster` on it, then the cluster stopped again.
test-cluster: install
	command -v slurmctld >/dev/null || tests/cluster/slurm.sh install
	tests/cluster/slurm.sh start
	SLURM_CONF=/tmp/distillery-slurm/slurm.conf $(BIN)/pytest -m cluster -q -s tests/cluster; \
	  status=$$?; tests/cluster/slurm.sh stop; exit $$status

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

# The reproductions (experiments/*/README.md): every seed on every built-in data set, under
# the few-label protocol (conf/protocol/few_label.yaml); resumable (re-run to continue).
SEEDS ?= 0 1 2 3 4
DATASETS ?= synthetic_hard speech
PROTOCOL ?= few_label
REPRODUCE := protocol=$(PROTOCOL) logger=csv trainer.enable_progress_bar=false

reproduce-unfused: install
	for data in $(DATASETS); do for seed in $(SEEDS); do \
	  $(BIN)/distillery experiment=unfused_compare data=$$data seed=$$seed $(REPRODUCE) \
	    run_dir=experiments/unfused/runs/$$data/seed$$seed || exit 1; \
	done; done
	$(BIN)/python experiments/unfused/report.py

# The UnFuSeD pseudo-label study (experiments/unfused/README.md): every k x preprocessing,
# the student finetuned with 5% of the labels over LABEL_SEEDS, the pseudo-label NMI alone
# over NMI_SEEDS too. Each seed's teacher is trained once and reused from the stage cache
# (clear it with rm -r $(LABEL_RUNS)/stage_cache). Resumable (re-run to continue).
LABEL_KS ?= 16 32 64
LABEL_PREPS ?= whiten pca l2
LABEL_SEEDS ?= 0 1 2
NMI_SEEDS ?= 3 4
LABEL_RUNS := experiments/unfused/runs/labels
PSEUDO := pipeline.stages.pseudo_label.callbacks.pseudo_labeler
.PHONY: reproduce-unfused-labels
reproduce-unfused-labels: install
	for seed in $(LABEL_SEEDS) $(NMI_SEEDS); do \
	  case " $(LABEL_SEEDS) " in *" $$seed "*) nmi_only="";; \
	    *) nmi_only="pipeline.order=[ssl,pseudo_label] ~pipeline.stages.self_distill ~pipeline.stages.student_few";; esac; \
	  for k in $(LABEL_KS); do for prep in $(LABEL_PREPS); do \
	    case $$prep in whiten) p="pca_dim=128 $(PSEUDO).eig_power=-0.5";; \
	      pca) p="pca_dim=128 $(PSEUDO).eig_power=0";; l2) p="pca_dim=null";; \
	      *) echo "unknown preprocessing $$prep (whiten, pca or l2)"; exit 1;; esac; \
	    set -f; $(BIN)/distillery experiment=unfused_labels seed=$$seed logger=csv $$nmi_only \
	      trainer.enable_progress_bar=false stage_cache=$(LABEL_RUNS)/stage_cache \
	      $(PSEUDO).k=$$k $(PSEUDO).$$p run_dir=$(LABEL_RUNS)/k$$k-$$prep/seed$$seed || exit 1; \
	  done; done; \
	done
	$(BIN)/python experiments/unfused/report_labels.py

# DPHuBERT claim, every seed on every data set; resumable (re-run to continue).
.PHONY: reproduce-dphubert
reproduce-dphubert: install
	for data in $(DATASETS); do for seed in $(SEEDS); do \
	  $(BIN)/distillery experiment=dphubert_compare data=$$data seed=$$seed $(REPRODUCE) \
	    run_dir=experiments/dphubert/runs/$$data/seed$$seed || exit 1; \
	done; done
	$(BIN)/python experiments/dphubert/report.py

# Self-distillation with partial labels and CoSS read the frozen encoder of one SSL teacher
# per data set (seed 0; trained by whichever target runs first, skipped by the runner
# afterwards). $$data is the recipe's loop variable.
PLL_TEACHER_RUN := experiments/pll/runs/$$data/teacher
.PHONY: pll-teacher reproduce-pll reproduce-coss
pll-teacher: install
	for data in $(DATASETS); do \
	  $(BIN)/distillery experiment=pll_teacher data=$$data seed=0 $(REPRODUCE) \
	    run_dir=$(PLL_TEACHER_RUN) || exit 1; \
	done

reproduce-pll: pll-teacher
	for data in $(DATASETS); do for seed in $(SEEDS); do \
	  $(BIN)/distillery experiment=pll_noise data=$$data seed=$$seed $(REPRODUCE) \
	    pipeline.stages.gce_00.module.pretrained=$(PLL_TEACHER_RUN)/ssl/encoder.pt \
	    run_dir=experiments/pll/runs/$$data/seed$$seed || exit 1; \
	done; done
	$(BIN)/python experiments/pll/report.py

reproduce-coss: pll-teacher
	for data in $(DATASETS); do for seed in $(SEEDS); do \
	  $(BIN)/distillery experiment=coss_compare data=$$data seed=$$seed $(REPRODUCE) \
	    pipeline.stages.cosine_random.module.teacher=$(PLL_TEACHER_RUN)/ssl/encoder.pt \
	    run_dir=experiments/coss/runs/$$data/seed$$seed || exit 1; \
	done; done
	$(BIN)/python experiments/coss/report.py

# KRR-ST claim, per data set: one SSL teacher (seed 0; the runner skips it once done), then
# distilled vs random-subset vs no pretraining at each synthetic-set size N, every seed; a
# 5x longer distillation (50 epochs) at the first N; and, for the cost comparison, the
# teacher and one comparison run again back to back (runs/<data>/timing). The sizes are
# 5% and 1% of the data set's training clips under protocol=few_label (synthetic_hard:
# 1640, speech: 270, the unlabelled validation clips included); another data set needs its
# own KRR_SIZES_<data>. Resumable.
KRR_SIZES_synthetic_hard ?= 82 16
KRR_SIZES_speech ?= 14 3
KRR_RUNS := experiments/krr_st/runs/$$data
KRR_COMPARE = $(BIN)/distillery experiment=krr_st_compare data=$$data $(REPRODUCE) \
  pipeline.stages.distill.module.teacher=$(KRR_RUNS)/teacher/ssl/encoder.pt
.PHONY: reproduce-krr-st
reproduce-krr-st: install
	for data in $(DATASETS); do \
	  case $$data in \
	    synthetic_hard) sizes="$(KRR_SIZES_synthetic_hard)";; speech) sizes="$(KRR_SIZES_speech)";; \
	    *) echo "no KRR-ST set sizes for data=$$data: add KRR_SIZES_$$data"; exit 1;; esac; \
	  first=$${sizes%% *}; \
	  $(BIN)/distillery experiment=krr_st_teacher data=$$data seed=0 $(REPRODUCE) \
	    run_dir=$(KRR_RUNS)/teacher || exit 1; \
	  for size in $$sizes; do for seed in $(SEEDS); do \
	    $(KRR_COMPARE) seed=$$seed pipeline.stages.distill.module.size=$$size \
	      run_dir=$(KRR_RUNS)/n$$size/seed$$seed || exit 1; \
	  done; done; \
	  for seed in $(SEEDS); do \
	    $(KRR_COMPARE) seed=$$seed pipeline.stages.distill.module.size=$$first \
	      pipeline.stages.distill.trainer.max_epochs=50 \
	      run_dir=$(KRR_RUNS)/n$${first}_epochs50/seed$$seed || exit 1; \
	  done; \
	  $(BIN)/distillery experiment=krr_st_teacher data=$$data seed=0 $(REPRODUCE) \
	    run_dir=$(KRR_RUNS)/timing/teacher || exit 1; \
	  $(KRR_COMPARE) seed=0 pipeline.stages.distill.module.size=$$first \
	    run_dir=$(KRR_RUNS)/timing/n$$first || exit 1; \
	done
	$(BIN)/python experiments/krr_st/report.py

# Every recipe x {1, 2 CPU processes} x accumulate_grad_batches {1, 2} x precision {32,
# bf16-mixed} at smoke size, through the CLI -> bench/ddp_matrix.md (slow: hours on 2 cores).
DDP_MATRIX_LOG ?= bench/ddp_matrix.jsonl
.PHONY: ddp-matrix
ddp-matrix: install
	rm -f $(DDP_MATRIX_LOG)
	DDP_MATRIX_LOG=$(DDP_MATRIX_LOG) $(BIN)/pytest -q -m slow tests/test_ddp_matrix.py; \
	  status=$$?; $(BIN)/python -m tests.ddp_matrix_report $(DDP_MATRIX_LOG) bench/ddp_matrix.md; \
	  exit $$status

# Benchmarks (each figure a ratio against a baseline of the same run) -> bench/results.{json,md}
bench: install
	$(BIN)/python -m distillery.bench

clean:
	rm -rf $(VENV) outputs multirun .cache .pytest_cache
