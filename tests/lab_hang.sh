# In the lab (kvmlockprof lab --kernel /boot/vmlinuz-6.1.* --console console.log -- sh
# tests/lab_hang.sh TAG N [record options]): N runs of the gpc/srcu lab test's workload,
# under `record` with the options given, else alone. A run still going after 240 s is
# a hang: its workload's threads' kernel stacks go to TAG-hangI.txt, sysrq l/w to the
# console; result.txt says which runs finished and how long they took, and which of
# those had a vCPU the workload had to kick out of KVM_RUN at its stop.
# Controls that are nothing of ours: a first extra argument --hog runs two busy shell
# loops beside each run (started before it, killed after; any record options follow,
# e.g. `sh $T hog 6 --hog`), --perf runs the workload under Debian's perf recording the
# lock contention tracepoints (`perf record -e lock:contention_begin,lock:contention_end
# -a`, no BPF; data in the guest's /tmp), e.g. `sh $T perf 6 --perf`. At a hang the
# kvm and kvmmmu tracepoints (ftrace) are on for 3 s and the trace's tail goes to
# TAG-hangI.txt too.
tag=$1; n=$2; shift 2
mode=
case $1 in --hog|--perf) mode=${1#--}; shift;; esac
for i in $(seq "$n"); do
  hogs=
  if [ "$mode" = hog ]; then
    for k in 1 2; do sh -c 'while :; do :; done' & hogs="$hogs $!"; done
  fi
  if [ "$mode" = perf ]; then
    perf record -e lock:contention_begin,lock:contention_end -a -o "/tmp/$tag$i.data" -- \
      kvmlockprof workload --vcpus 2 --duration 6 --kvmclock --churn > "$tag$i.log" 2>&1 &
  elif [ $# -gt 0 ]; then
    kvmlockprof record -q -f -o "$tag$i.parquet" "$@" -- \
      kvmlockprof workload --vcpus 2 --duration 6 --kvmclock --churn > "$tag$i.log" 2>&1 &
  else
    kvmlockprof workload --vcpus 2 --duration 6 --kvmclock --churn > "$tag$i.log" 2>&1 &
  fi
  t=0
  while kill -0 $! 2>/dev/null && [ $t -lt 240 ]; do sleep 1; t=$((t+1)); done
  if ! kill -0 $! 2>/dev/null; then
    [ -z "$hogs" ] || kill $hogs
    k=; grep -q "kicked out" "$tag$i.log" && k=" (a vCPU stuck in KVM_RUN, kicked out)"
    echo "$tag ok run $i: $t s$k" >> result.txt
    continue
  fi
  wl=
  for p in $(pgrep -f "kvmlockprof workload"); do
    grep -q record "/proc/$p/cmdline" || wl=$p        # the workload, not record
  done
  echo "$tag HANG run $i after $t s (workload pid $wl)" >> result.txt
  for j in 1 2 3; do
    for tk in /proc/"$wl"/task/*; do
      echo "== $j $tk $(cat "$tk/comm") wchan=$(cat "$tk/wchan")"; cat "$tk/stack"
    done
    sleep 2
  done > "$tag-hang$i.txt" 2>&1
  tr=/sys/kernel/tracing
  [ -d $tr/events ] || mount -t tracefs nodev $tr
  echo > $tr/trace; echo 1 > $tr/events/kvm/enable; echo 1 > $tr/events/kvmmmu/enable
  sleep 3; echo 0 > $tr/events/kvm/enable; echo 0 > $tr/events/kvmmmu/enable
  { echo "== kvm/kvmmmu tracepoints, 3 s: events by name, then the last 400"
    grep -v '^#' $tr/trace | awk '{print $5}' | sort | uniq -c; tail -n 400 $tr/trace
  } >> "$tag-hang$i.txt" 2>&1
  echo 1 > /proc/sys/kernel/sysrq; echo l > /proc/sysrq-trigger; echo w > /proc/sysrq-trigger
  [ -z "$hogs" ] || kill $hogs
  kill -INT $!; sleep 30; kill -9 "$wl" $! 2>/dev/null
  break
done
