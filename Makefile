# Set-up is idempotent: apt runs only for missing packages, the venv is
# rebuilt only when the package metadata changes.
VENV    := .venv
PY      := $(VENV)/bin/python
KLP     := $(VENV)/bin/kvmlockprof
RUFF    := $(VENV)/bin/ruff
STAMP   := $(VENV)/.installed
APT_PKGS := bpfcc-tools python3-bpfcc libbpfcc linux-headers-amd64 python3-venv bpftool chromium tmux dwarves linux-perf
# The lab: QEMU and virtme-ng's static busybox; kernels below.
LAB_PKGS := qemu-system-x86 busybox-static
LAB_STAMP := $(VENV)/.lab
DEMO_S  ?= 10

# The arm64 lab: QEMU's aarch64 emulator; the root (Debian arm64) is built from packages.
LAB_ARM64_PKGS := qemu-system-arm qemu-user-static mmdebstrap arch-test
LAB_ARM64_STAMP := $(VENV)/.lab-arm64

.PHONY: setup apt demo test bench peer viewers lab lab-apt lab-test lab-arm64 lab-arm64-test \
	lab-lockdep lab-lockdep-test deb clean

setup: $(STAMP)

# $(call apt-install,packages[,apt-get options]): install those not installed yet.
define apt-install
	@missing=$$(for p in $(1); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq $(2) $$missing; \
	fi
endef

apt:
	$(call apt-install,$(APT_PKGS))

# The real peer, `perf lock contention -b`: Debian's linux-perf has no BPF skeletons, so
# bench/peer.py builds perf from Debian's kernel source (the newest whose skeleton loads
# here), cached in /var/cache/kvmlockprof/peer: a second run builds nothing.
PEER_PKGS := clang llvm libelf-dev libdw-dev libtraceevent-dev libcap-dev flex bison \
	pkg-config libzstd-dev linux-source-6.1
peer: setup
	$(call apt-install,$(PEER_PKGS),--no-install-recommends)
	-@dpkg-query -W -f='$${Status}\n' linux-source-6.12 2>/dev/null | grep -q '^install ok' || \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  linux-source-6.12 || echo "linux-source-6.12 not available: perf 6.1 only"
	$(PY) bench/peer.py

# Benchmarks (bench/README.md): the peers to compare with, then every benchmark.
BENCH_PKGS := bpftrace
bench: setup peer
	$(call apt-install,$(BENCH_PKGS),--no-install-recommends)
	$(PY) bench/overhead.py
	$(PY) bench/overhead.py --workload "--vcpus 2 --churn --churn-rate 250" \
	  -o bench/results/overhead-moderate.json
	$(PY) bench/overhead_toggle.py
	$(PY) bench/overhead_toggle.py --sample-every 1 --windows 600 \
	  -o bench/results/overhead-toggle-stream.json
	$(PY) bench/ingest.py
	$(PY) bench/analysis_speed.py
	$(PY) bench/compare_calibration.py

# Lab kernels: bookworm's 6.1 (the "old kernel": the image matching the 6.1 headers
# make setup installed, so bcc compiles against an exact match) and, the default,
# bookworm-backports' linux-image-amd64 (KVM_XEN, kprobes, BTF), with its headers.
lab-apt: $(STAMP)
	$(call apt-install,$(LAB_PKGS),--no-install-recommends)
	@old=$$(dpkg-query -W -f='$${Package}\n' 'linux-headers-6.1.*-amd64' 2>/dev/null \
	        | head -n1 | sed 's/headers/image/'); \
	test -n "$$old" || { echo "no 6.1 kernel headers: run make setup"; exit 1; }; \
	dpkg-query -W -f='$${Status}\n' $$old 2>/dev/null | grep -q '^install ok installed' || \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$old
	@$(PY) -m kvmlockprof.backports --write
	@dpkg-query -W -f='$${Version}\n' linux-image-amd64 2>/dev/null | grep -q bpo || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends -t bookworm-backports linux-image-amd64 linux-headers-amd64; }

# bcc's Python bindings come from python3-bpfcc: link just that package into the
# venv instead of --system-site-packages, which would pull in everything else.
$(STAMP): setup.cfg pyproject.toml | apt
	/usr/bin/python3 -m venv $(VENV)
	ln -sfn /usr/lib/python3/dist-packages/bcc \
	  "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/bcc"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

demo: setup
	$(KLP) doctor || true
	$(KLP) record -o demo.parquet --force -- \
	  $(KLP) workload --duration $(DEMO_S) --vcpus 2 --churn
	$(KLP) report demo.parquet --limit 15
	$(KLP) report demo.parquet --limit 50 --stacks -o demo-report.txt \
	  --html demo-report.html --force
	@echo "reports written to demo-report.txt and demo-report.html (recording: demo.parquet)"

# A Debian package for hosts (contrib/deb/build.py): dist/kvmlockprof_VERSION-1_amd64.deb
deb: setup
	$(PY) contrib/deb/build.py dist

# A real viewer the export formats are tested in (tests/test_viewers.py): speedscope,
# from npm (its release is a static page that headless Chromium opens).
SPEEDSCOPE_VERSION := 1.25.0
SPEEDSCOPE := /var/cache/kvmlockprof/speedscope-$(SPEEDSCOPE_VERSION)
viewers: $(SPEEDSCOPE)/package/dist/release/index.html
$(SPEEDSCOPE)/package/dist/release/index.html:
	@command -v npm > /dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm; }
	mkdir -p $(SPEEDSCOPE)
	cd $(SPEEDSCOPE) && npm pack --silent speedscope@$(SPEEDSCOPE_VERSION) > /dev/null && \
	  tar xzf speedscope-$(SPEEDSCOPE_VERSION).tgz

# A real Prometheus server scrapes the exporter in tests/test_live_exporter.py (the test
# runs its own on 127.0.0.1; the package's service is not used).
# Lint, then the tests that need no root (-x: a broken import stops it in seconds), then
# those that do (marked live: real BPF, /dev/kvm; tests/conftest.py).
TEST_PKGS := prometheus lintian systemd
test: setup viewers peer
	$(call apt-install,$(TEST_PKGS),--no-install-recommends)
	$(RUFF) check .
	$(PY) -m pytest -ra -x -m "not lab and not live"
	$(PY) -m pytest -ra -m "not lab and live"

$(LAB_STAMP): $(STAMP) | lab-apt
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,lab]'
	touch $@

# The kernel lab: boots the newest Debian lab kernel under QEMU and checks it works.
lab: setup $(LAB_STAMP)
	$(KLP) lab -- kvmlockprof doctor

lab-test: setup $(LAB_STAMP)
	$(PY) -m pytest -ra -m "lab and not arm64 and not lockdep" -s

# Lockdep's verdicts: two kernels from Debian's linux-source-6.12, one with
# CONFIG_PROVE_LOCKING and one with a production config (kvmlockprof/labkernel.py),
# ~20 min each on 2 cores, cached in /var/cache/kvmlockprof/kernels.
LOCKDEP_PKGS := linux-source-6.12 bc bison flex libelf-dev libssl-dev dwarves cpio patch
lab-lockdep: setup $(LAB_STAMP)
	$(call apt-install,$(LOCKDEP_PKGS),--no-install-recommends)
	$(PY) -m kvmlockprof.labkernel lockdep prod

lab-lockdep-test: lab-lockdep
	$(PY) -m pytest -ra -m "lab and lockdep" -s

# arm64: builds the root once (/var/cache/kvmlockprof/arm64, ~25 min here), then boots it.
$(LAB_ARM64_STAMP): $(LAB_STAMP)
	$(call apt-install,$(LAB_ARM64_PKGS),--no-install-recommends)
	$(PY) -m kvmlockprof.labroot
	touch $@

lab-arm64: setup $(LAB_ARM64_STAMP)
	$(KLP) lab --arch arm64 -- kvmlockprof doctor

lab-arm64-test: setup $(LAB_ARM64_STAMP)
	$(PY) -m pytest -ra -m "lab and arm64" -s

clean:
	rm -rf $(VENV) demo.parquet demo-report.txt demo-report.html .pytest_cache .ruff_cache
