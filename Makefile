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

# DPHuBERT claim on the built-in data, 3 seeds; resumable (re-run to continue).
.PHONY: reproduce-dphubert
reproduce-dphubert: install
	for seed in $(SEEDS); do \
	  $(BIN)/distillery experiment=dphubert_compare seed=$$seed logger=csv \
	    trainer.enable_progress_bar=false run_dir=experiments/dphubert/runs/seed$$seed || exit 1; \
	done
	$(BIN)/python experiments/dphubert/report.py

# Self-distillation with partial labels and CoSS read the frozen encoder of one SSL teacher
# run (trained by whichever target runs first; the runner skips it afterwards).
PLL_TEACHER_RUN := experiments/pll/runs/teacher
.PHONY: pll-teacher reproduce-pll reproduce-coss
pll-teacher: install
	$(BIN)/distillery experiment=pll_teacher seed=0 logger=csv run_dir=$(PLL_TEACHER_RUN)

reproduce-pll: pll-teacher
	for seed in $(SEEDS); do \
	  $(BIN)/distillery experiment=pll_noise seed=$$seed logger=csv \
	    pipeline.stages.gce_00.module.pretrained=$(PLL_TEACHER_RUN)/ssl/encoder.pt \
	    run_dir=experiments/pll/runs/seed$$seed || exit 1; \
	done
	$(BIN)/python experiments/pll/report.py experiments/pll/runs

reproduce-coss: pll-teacher
	for seed in $(SEEDS); do \
	  $(BIN)/distillery experiment=coss_compare seed=$$seed logger=csv \
	    pipeline.stages.cosine_random.module.teacher=$(PLL_TEACHER_RUN)/ssl/encoder.pt \
	    run_dir=experiments/coss/runs/seed$$seed || exit 1; \
	done
	$(BIN)/python experiments/coss/report.py experiments/coss/runs $(PLL_TEACHER_RUN)

# KRR-ST claim on the built-in data: one SSL teacher (the runner skips it once done), then
# distilled vs random-subset vs no pretraining at each synthetic-set size N (5% and 1% of the
# 560 training clips), 3 seeds each; resumable.
KRR_TEACHER_RUN := experiments/krr_st/runs/teacher
KRR_SIZES ?= 28 6
.PHONY: reproduce-krr-st
reproduce-krr-st: install
	$(BIN)/distillery experiment=krr_st_teacher seed=0 logger=csv run_dir=$(KRR_TEACHER_RUN)
	for size in $(KRR_SIZES); do for seed in $(SEEDS); do \
	  $(BIN)/distillery experiment=krr_st_compare seed=$$seed logger=csv \
	    pipeline.stages.distill.module.teacher=$(KRR_TEACHER_RUN)/ssl/encoder.pt \
	    pipeline.stages.distill.module.size=$$size \
	    run_dir=experiments/krr_st/runs/n$$size/seed$$seed || exit 1; \
	done; done
	# A 5x longer distillation (400 outer steps) at N = 28.
	for seed in $(SEEDS); do \
	  $(BIN)/distillery experiment=krr_st_compare seed=$$seed logger=csv \
	    pipeline.stages.distill.module.teacher=$(KRR_TEACHER_RUN)/ssl/encoder.pt \
	    pipeline.stages.distill.trainer.max_epochs=50 \
	    run_dir=experiments/krr_st/runs/n28_steps400/seed$$seed || exit 1; \
	done
	# Wall times compared back to back: the teacher again, then one comparison run.
	$(BIN)/distillery experiment=krr_st_teacher seed=0 logger=csv run_dir=experiments/krr_st/runs/timing/teacher
	$(BIN)/distillery experiment=krr_st_compare seed=0 logger=csv \
	  pipeline.stages.distill.module.teacher=$(KRR_TEACHER_RUN)/ssl/encoder.pt \
	  run_dir=experiments/krr_st/runs/timing/n28
	$(BIN)/python experiments/krr_st/report.py experiments/krr_st/runs

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
